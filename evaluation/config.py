"""The ``probe`` section: mid-training MTEB probes of every (layer × dim × rank) cell."""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts.config_error import check_at_least


@dataclass
class FinalEvalConfig:
    """The final evaluation (the end-of-training probe and ``make probe``): sets sized for 1-point differences, with
    per-query scores kept; the mid-training probes keep the cheap settings of the ``probe`` section."""

    enabled: bool = True
    """False: the final probe uses the mid-training settings."""
    tasks: list[str] = field(default_factory=lambda: ["GettextBitextMining", "GettextRetrieval", "ManpageRetrieval"])
    """The final evaluation's tasks (ManpageRetrieval is left out, with one log line, on a machine without translated
    manual pages: ``make manpages``)."""
    locales: list[str] = field(default_factory=lambda: ["de", "fr", "ru", "es", "pt", "ja", "uk", "pl", "it", "gl"])
    """Locales of the built-in tasks (the default ten have ≥ 200 held-out pairs each in the system catalogs)."""
    max_pairs_per_locale: int = 200
    every_manpage_language: bool = True
    """ManpageRetrieval queries every language with translated manual pages on this machine (``make manpages``
    installs Debian's), not only ``locales``."""
    max_pages_per_language: int = 100
    """ManpageRetrieval's queries per language (the 29 languages here: 1,965 queries in all)."""
    whole_pool: bool = True
    """GettextRetrieval searches every held-out English sentence of the locales, not only the sampled pairs'."""
    every_probe: bool = False
    """Every probe, not only the last, is the final evaluation: learning curves of the scores the verdicts use (each
    probe then costs a final evaluation; ``make paper``'s long MEL pair)."""
    drop_training_overlap: bool = True
    """Leave out probe pairs and pool sentences whose text (case, punctuation and whitespace normalised) occurs in
    the training split of the run's ``data.locales``; the counts are logged and kept in the table."""

    def __post_init__(self) -> None:
        check_at_least("final.max_pairs_per_locale", self.max_pairs_per_locale, 0, exclusive=True)
        check_at_least("final.max_pages_per_language", self.max_pages_per_language, 0, exclusive=True)


@dataclass
class ProbeConfig:
    """Mid-training MTEB probes of every (layer × dim × rank) cell (:class:`~evaluation.probing.ProbeSession`, run
    by :class:`~callbacks.probe_schedule.ProbeCallback`)."""

    enabled: bool = True
    every_n_steps: int = 50
    """Probe every N optimizer steps, besides the start and the end of training (0: only those)."""
    at_start: bool = True
    at_end: bool = True
    tasks: list[str] = field(default_factory=lambda: ["GettextBitextMining", "GettextRetrieval"])
    """Built-in offline tasks on the corpus's held-out probe split, or mteb registry task names (run when their
    data is in the local hub cache; otherwise one log line says so and the probe goes on)."""
    locales: list[str] = field(default_factory=lambda: ["de", "fr", "ru", "ar", "hi", "ta", "kk", "eu", "gl", "si"])
    """Locales of the built-in tasks (low-resource ones included); a locale without probe pairs is skipped."""
    max_pairs_per_locale: int = 24
    batch_size: int = 64
    """Texts per forward on each device."""
    scoring_processes: int = 2
    """Processes that score the cells on each CPU device: this one and forked helpers, capped at the usable cores
    (mteb scores in one Python thread; training waits for the probe, so the other cores are free). 1: no helpers."""
    metrics: list[str] = field(default_factory=lambda: ["recall_at_1"])
    """Scores logged per cell besides each task's main score (when a task reports them)."""
    corpus_dir: str | None = None
    """Corpus with the probe split; null: ``data.dir`` for gettext/django corpora, else ``data/gettext``."""
    final: FinalEvalConfig = field(default_factory=FinalEvalConfig)
    """The final evaluation's larger sets (see :class:`FinalEvalConfig`)."""

    def __post_init__(self) -> None:
        check_at_least("every_n_steps", self.every_n_steps, 0)
        check_at_least("max_pairs_per_locale", self.max_pairs_per_locale, 0, exclusive=True)
        check_at_least("batch_size", self.batch_size, 0, exclusive=True)
        check_at_least("scoring_processes", self.scoring_processes, 1)
