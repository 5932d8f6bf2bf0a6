"""The Lightning callback that runs MTEB probes at the start, every N steps and at the end of training."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from callbacks.probe import report
from callbacks.probe.config import ProbeConfig
from callbacks.probe.prober import Prober, preserved_rng
from contracts.config_error import ConfigError
from datamodules import probe_corpus

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from lightning_modules.embedding_model import TextTokenizer

log = logging.getLogger(__name__)


def probe_corpus_dir(config: DictConfig) -> str:
    """The corpus whose probe split feeds the built-in tasks (see ``probe.corpus_dir``)."""
    if config.probe.corpus_dir:
        return config.probe.corpus_dir
    return config.data.dir if config.data.corpus in ("gettext", "django") else "data/gettext"


def check_tasks(config: ProbeConfig) -> None:
    """Raises ConfigError naming ``probe.tasks`` for a name that is neither built-in nor in mteb's registry."""
    with preserved_rng():  # importing mteb and creating tasks reseed the global generators
        from callbacks.probe.tasks import check_task_names

        problem = check_task_names(list(config.tasks))
    if problem:
        raise ConfigError("probe.tasks", problem)


class ProbeCallback(L.Callback):
    """Scores every deployable cell (layer, dim, rank) on mteb tasks while training runs.

    Probes run at the start, every ``every_n_steps`` optimizer steps and at the end (see
    :class:`~callbacks.probe.config.ProbeConfig`); every device encodes a shard of the texts, global rank 0 logs
    ``probe/<task>/<metric>/layer_<l>/dim_<d>/rank_<r>``, ``probe/mean_main_score/{full,cheapest}`` and
    ``probe/seconds`` to MLflow at the training step, and writes the table (JSON, CSV) and one heatmap per rank
    to ``<run_dir>/probe/`` and to the MLflow run's artifacts ``probe/step_<n>/``; at the end, the last table also as
    ``probe_final.csv`` and ``probe_final_<group>.png`` at the MLflow run's root with its ``final/...`` summary
    metrics (see :func:`~callbacks.probe.report.log_final`). A failing task is logged with
    its name and left out; training goes on. Weights, RNG streams and the data position are left untouched, so
    a run's losses are the same with and without probes.

    Args:
        config: the ``probe`` section.
        corpus_dir: the corpus with the held-out probe split.
        catalog_dir: gettext catalogs, to build ``corpus_dir`` if it does not exist yet.
        run_dir: the run folder (tables and heatmaps go to ``run_dir/probe``).
        tokenize: the run's batch tokenizer (tokenizer and e5 prefixes).
        model_name: names the model in mteb results (``organisation/name``).

    Example:
        ``make exp NAME=quickstart ARGS="probe.every_n_steps=20 probe.locales=[de,kk,ta]"``
    """

    def __init__(self, config: ProbeConfig, corpus_dir: str, catalog_dir: str, run_dir: str | Path,
                 tokenize: TextTokenizer, model_name: str = "matryoshka-lab/probe") -> None:
        check_tasks(config)
        self.config, self.corpus_dir, self.catalog_dir = config, corpus_dir, catalog_dir
        self.run_dir, self.tokenize, self.model_name = Path(run_dir), tokenize, model_name
        self.prober: Prober | None = None
        self.disabled = False
        self.probed: set[int] = set()
        self.last_table: dict | None = None
        self.seconds = 0.0
        self.started = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.config.at_start:
            self.probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        every = self.config.every_n_steps
        if every and trainer.global_step % every == 0:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.config.at_end:
            self.probe(trainer, pl_module)
        if trainer.is_global_zero and self.last_table is not None:
            self._log_final(trainer)
        if trainer.is_global_zero and self.probed:
            wall = time.perf_counter() - self.started
            log.info("probe: %d probes took %.1f s, %.1f %% of %.1f s of training wall time", len(self.probed),
                     self.seconds, 100 * self.seconds / wall, wall)
            self._log(trainer, {"probe/seconds_total": self.seconds, "probe/wall_share": self.seconds / wall}, [])

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict | None:
        """One probe at the current global step (once per step); returns its table."""
        step = trainer.global_step
        if step in self.probed or self.disabled:
            return None
        self.probed.add(step)
        if self.prober is None and not self._setup(trainer, pl_module):
            return None
        table = self.prober.run(step, trainer.precision_plugin.predict_step_context,
                                progress=trainer.is_global_zero and trainer.progress_bar_callback is not None)
        self.seconds += table["seconds"]
        self.last_table = table
        if trainer.is_global_zero:
            files = report.write(table, self.run_dir / report.PROBE_DIR, self._run_name(trainer))
            self._log(trainer, report.metrics(table, list(self.config.metrics)), files)
            summary = table["summary"].get("full", {})
            log.info("probe at step %d: %.1f s, mean main score %.4f at %s", step, table["seconds"],
                     summary.get("mean_main_score", float("nan")), summary.get("cell", "-"))
        return table

    def _setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Builds the tasks once (and the corpus if needed); False, with one error line, if that fails: the
        probes are then off for this run and training goes on."""
        try:
            with preserved_rng():
                from callbacks.probe.tasks import build_tasks

                if not probe_corpus.corpus_built(self.corpus_dir):
                    if trainer.is_global_zero:
                        probe_corpus.build_corpus(self.corpus_dir, self.catalog_dir)
                    trainer.strategy.barrier("probe corpus")
                tasks = build_tasks(list(self.config.tasks), self.corpus_dir, list(self.config.locales),
                                    self.config.max_pairs_per_locale)
        except Exception as error:  # noqa: BLE001 - probes must not stop training
            log.error("probe: no probes in this run: cannot build the probe tasks (%s: %s)", type(error).__name__,
                      error)
            self.disabled = True
            return False
        self.prober = Prober(pl_module, self.tokenize, tasks, self.config.batch_size, self.model_name,
                             pl_module.device, self.config.scoring_processes)
        return True

    def _run_name(self, trainer: L.Trainer) -> str:
        """The MLflow run's name, else the run folder's ``<experiment>-<timestamp>`` (MLflow's default name)."""
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                return logger.experiment.get_run(logger.run_id).info.run_name
        return f"{self.run_dir.parent.name}-{self.run_dir.name}"

    def _log_final(self, trainer: L.Trainer) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]
        for logger in loggers:
            report.log_final(logger.experiment, logger.run_id, self.last_table, self.run_dir / report.PROBE_DIR,
                             self._run_name(trainer))
        if not loggers:
            report.write(self.last_table, self.run_dir / report.PROBE_DIR, self._run_name(trainer), report.FINAL_STEM,
                         json_table=False)

    def _log(self, trainer: L.Trainer, logged: dict[str, float], files: list[Path]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                try:
                    report.log_to_mlflow(logger.experiment, logger.run_id, logged, trainer.global_step, files)
                except Exception as error:  # noqa: BLE001 - a tracking server that does not answer must not stop it
                    log.error("probe: step %d not logged to MLflow (%s: %s); its files are in %s", trainer.global_step,
                              type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
                              files[0].parent if files else "the run folder")
            else:
                logger.log_metrics(logged, step=trainer.global_step)
