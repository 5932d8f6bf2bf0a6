"""The ``data`` section: which corpus to train on and how batches are drawn from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from contracts.config_error import ConfigError, check_at_least
from datamodules.sources import TASKS


@dataclass
class DataConfig:
    corpus: Literal["gettext", "django", "folder"] = "gettext"
    """``gettext`` (built once from the catalogs under ``catalog_dir``), ``django`` (built once from the
    catalogs of the optional ``django==5.2.19`` package), both one source per locale; or ``folder``: every
    ``*.parquet`` / ``*.jsonl`` file in ``dir`` is one source with fields ``query``, ``passage`` and optional
    ``negative_1`` … ``negative_N``, and an optional ``dir/sources.yaml`` declares each source's ``task``
    (retrieval | clustering | classification) and ``language``."""
    catalog_dir: str = "/usr/share/locale"
    dir: str = "data/${data.corpus}"
    """Where a built-in corpus is built once (git-ignored), or the folder of a ``folder`` corpus."""
    locales: list[str] = field(default_factory=lambda: ["de", "fr", "es", "ru", "ar", "hi"])
    """Built-in corpora: the locales to train on."""
    sources: list[str] | None = None
    """``folder`` corpus: the sources (file stems) to train on; null: every file."""
    direction: Literal["xx2en", "en2xx", "both"] = "xx2en"
    """Built-in corpora: ``xx2en`` (query in the locale, passage English), ``en2xx``, or ``both`` (a random
    direction per batch)."""
    batch_size: int = 32
    sampling_alpha: float = 1.0
    """Source probability ∝ size^alpha (1: the paper; < 1 up-weights low-resource locales; 0: uniform)."""
    max_examples: int | None = None
    """Cap every source at this many rows per pass, and its sampling size at the cap; null: no cap."""
    caps: dict[str, int] = field(default_factory=dict)
    """Per-source caps ``{source: rows}``, overriding ``max_examples``."""
    negatives: dict[str, int] = field(
        default_factory=lambda: {"retrieval": 7, "clustering": 9, "classification": 1})
    """Hard negatives drawn per row, by the source's task, from its ``negative_*`` fields (reference: 7 of 24
    for retrieval); a source with fewer fields uses all it has."""
    bucketing: bool = False
    """Sort each pool of ``pool_batches`` batches by length before cutting it into batches: less padding, but
    batches of equal-length texts make harder in-batch negatives (the reference does not bucket)."""
    pool_batches: int = 16
    """Batches per pool: the span of within-source shuffling and length bucketing."""
    strict: bool = False
    """Stop at the first unusable row (naming file and line) instead of skipping and counting it."""
    num_workers: int = 0
    """DataLoader worker processes that read and tokenize (0: in the training process)."""
    packing: bool = True
    """Pack each training batch's texts into a few rows with per-text attention (no padding compute; the same
    batches, pooled embeddings and losses as padded ones, up to float rounding; dropout masks differ). The probe
    packs its forwards too; export encodes padded batches. ``false``: one padded row per text."""

    def __post_init__(self) -> None:
        """Value checks; the names of sources and locales are checked against the data by
        :func:`datamodules.pairs.check_data_config`, the files themselves when the DataModule is set up."""
        if not self.locales:
            raise ConfigError("locales", "needs at least one locale, e.g. [de, fr, sw]")
        check_at_least("batch_size", self.batch_size, 0, exclusive=True)
        check_at_least("sampling_alpha", self.sampling_alpha, 0, note="0: uniform, 1: ∝ size")
        check_at_least("pool_batches", self.pool_batches, 1)
        check_at_least("num_workers", self.num_workers, 0)
        if self.max_examples is not None:
            check_at_least("max_examples", self.max_examples, 1, note="or null: no cap")
        for name, cap in self.caps.items():
            check_at_least(f"caps.{name}", cap, 1)
        for task, count in self.negatives.items():
            if task not in TASKS:
                raise ConfigError(f"negatives.{task}", f"unknown task; allowed: {', '.join(TASKS)}")
            check_at_least(f"negatives.{task}", count, 0)
