"""What a probe during training does, for :class:`~callbacks.probe_schedule.ProbeCallback` (which decides when): build the
tasks once, score every cell, write the tables and heatmaps, log them to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from contracts.config_error import ConfigError
from datamodules import probe_corpus
from evaluation import report
from evaluation.config import ProbeConfig
from evaluation.scoring import Prober, preserved_rng

if TYPE_CHECKING:
    import lightning as L
    from omegaconf import DictConfig

    from lightning_modules.embedding_model import TextTokenizer

log = logging.getLogger(__name__)


def probe_corpus_dir(config: DictConfig) -> str:
    """The corpus whose probe split feeds the built-in tasks (see ``probe.corpus_dir``)."""
    if config.probe.corpus_dir:
        return config.probe.corpus_dir
    return config.data.dir if config.data.corpus in ("gettext", "django") else "data/gettext"


def check_tasks(config: ProbeConfig) -> None:
    """Raises ConfigError naming ``probe.tasks`` (or ``probe.final.tasks``) for a name that is neither built-in nor
    in mteb's registry."""
    with preserved_rng():  # importing mteb and creating tasks reseed the global generators
        from evaluation.tasks import check_task_names

        problems = {key: check_task_names(list(names)) for key, names in (("probe.tasks", config.tasks),
                                                                          ("probe.final.tasks", config.final.tasks))}
    for key, problem in problems.items():
        if problem:
            raise ConfigError(key, problem)


def final_tasks(config: ProbeConfig, corpus_dir: str, training_locales: list[str]) -> list:
    """The final evaluation's tasks (:class:`~evaluation.config.FinalEvalConfig`; the mid-training settings when
    it is off). Call inside :func:`~evaluation.scoring.preserved_rng`."""
    from evaluation.tasks import build_tasks

    final = config.final
    if not final.enabled:
        return build_tasks(list(config.tasks), corpus_dir, list(config.locales), config.max_pairs_per_locale)
    return build_tasks(list(final.tasks), corpus_dir, list(final.locales), final.max_pairs_per_locale,
                       final.whole_pool, list(training_locales) if final.drop_training_overlap else None,
                       final.every_manpage_language, final.max_pages_per_language)


class ProbeSession:
    """The probes of one training run: the tasks, the :class:`~evaluation.scoring.Prober` and the run's report files.
    The final probe is the final evaluation: its own, larger tasks (``probe.final``), built when it comes.

    Args:
        config: the ``probe`` section (its task names are checked here, before training starts).
        corpus_dir: the corpus with the held-out probe split.
        catalog_dir: gettext catalogs, to build ``corpus_dir`` if it does not exist yet.
        run_dir: the run folder (tables and heatmaps go to ``run_dir/probe``).
        tokenize: the run's batch tokenizer (tokenizer and e5 prefixes).
        model_name: names the model in mteb results (``organisation/name``).
        training_locales: the run's training locales, whose training split the final evaluation's texts must not
            overlap.
    """

    def __init__(self, config: ProbeConfig, corpus_dir: str, catalog_dir: str, run_dir: str | Path,
                 tokenize: TextTokenizer, model_name: str = "matryoshka-lab/probe",
                 training_locales: list[str] = ()) -> None:
        check_tasks(config)
        self.config, self.corpus_dir, self.catalog_dir = config, corpus_dir, catalog_dir
        self.probe_dir, self.tokenize, self.model_name = Path(run_dir) / report.PROBE_DIR, tokenize, model_name
        self.training_locales = list(training_locales)
        self.prober: Prober | None = None
        self.final_prober: Prober | None = None

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Builds the tasks once (and the corpus if needed); False, with one error line, if that fails: the
        probes are then off for this run and training goes on."""
        if self.prober is not None:
            return True
        try:
            with preserved_rng():
                from evaluation.tasks import build_tasks

                if not probe_corpus.corpus_built(self.corpus_dir):
                    if trainer.is_global_zero:
                        probe_corpus.build_corpus(self.corpus_dir, self.catalog_dir)
                    trainer.strategy.barrier("probe corpus")
                tasks = build_tasks(list(self.config.tasks), self.corpus_dir, list(self.config.locales),
                                    self.config.max_pairs_per_locale)
        except Exception as error:  # noqa: BLE001 - probes must not stop training
            log.error("probe: no probes in this run: cannot build the probe tasks (%s: %s)", type(error).__name__,
                      error)
            return False
        self.prober = Prober(pl_module, self.tokenize, tasks, self.config.batch_size, self.model_name,
                             pl_module.device, self.config.scoring_processes)
        return True

    def run(self, step: int, predict_context, final: bool = False, progress: bool = False) -> dict:
        """Scores every cell at ``step`` (all ranks take part); the table of :meth:`Prober.run`. The ``final`` one
        (every one with ``probe.final.every_probe``) is the final evaluation: its tasks, with per-query scores.
        ``progress``: show the probe's bar."""
        if not (final or self.config.final.every_probe):
            return self.prober.run(step, predict_context, progress=progress)
        if self.final_prober is None:
            with preserved_rng():
                tasks = final_tasks(self.config, self.corpus_dir, self.training_locales)
            self.final_prober = Prober(self.prober.module, self.tokenize, tasks, self.config.batch_size,
                                       self.model_name, self.prober.device, self.config.scoring_processes)
        return self.final_prober.run(step, predict_context, query_scores=True, progress=progress)

    def write(self, table: dict, run_name: str) -> tuple[dict[str, float], list[Path]]:
        """Writes the step's table and heatmaps; the metrics to log and the files written."""
        files = report.write(table, self.probe_dir, run_name)
        return report.metrics(table, list(self.config.metrics)), files

    def write_final(self, table: dict, run_name: str) -> None:
        """The last table as ``probe_final.*`` in the run folder (runs without MLflow)."""
        report.write(table, self.probe_dir, run_name, report.FINAL_STEM, json_table=False, per_task=True)

    def log_to_mlflow(self, client, run_id: str, logged: dict[str, float], step: int, files: list[Path]) -> None:
        report.log_to_mlflow(client, run_id, logged, step, files)

    def log_final(self, client, run_id: str, table: dict, run_name: str) -> None:
        """The last table's ``final/...`` metrics and files at the MLflow run's root."""
        report.log_final(client, run_id, table, self.probe_dir, run_name)
