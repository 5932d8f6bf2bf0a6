"""The Lightning callback that runs MTEB probes at the start, every N steps and at the end of training.

It decides when; what a probe does (tasks, scoring, report files) is the evaluation package's
:class:`~evaluation.probing.ProbeSession`, handed in by the run, so this package imports nothing above it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)


class ProbeRunner(Protocol):
    """What the callback asks of a probe (:class:`~evaluation.probing.ProbeSession` is the one in use)."""

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool: ...
    def run(self, step: int, predict_context, final: bool = False, progress: bool = False) -> dict: ...
    def write(self, table: dict, run_name: str) -> tuple[dict[str, float], list[Path]]: ...
    def write_final(self, table: dict, run_name: str) -> None: ...
    def log_to_mlflow(self, client, run_id: str, logged: dict[str, float], step: int, files: list[Path]) -> None: ...
    def log_final(self, client, run_id: str, table: dict, run_name: str) -> None: ...


class ProbeCallback(L.Callback):
    """Scores every deployable cell (layer, dim, rank) on mteb tasks while training runs.

    Probes run at the start, every ``every_n_steps`` optimizer steps and at the end (see
    :class:`~evaluation.config.ProbeConfig`); every device encodes a shard of the texts, global rank 0 logs
    ``<task>/<cell>`` (e.g. ``GettextRetrieval/layer_4/dim_64/rank_128``, see :func:`~evaluation.report.metrics`)
    and ``probe/seconds`` (the final evaluation: ``probe/final_seconds``) to MLflow at the training step, and writes
    the table (JSON, CSV) and one heatmap per model-side setting to ``<run_dir>/probe/`` and to the MLflow run's
    artifacts ``probe/step_<n>/``; at the end, the last table also as ``probe_final.csv``, ``probe_final_table.json``
    and ``probe_final_<task>_<setting>.png`` at the MLflow run's root with its ``final/...`` headline metrics (see
    :func:`~evaluation.report.log_final`). A failing task is logged with its name and left out; training goes on.
    Weights, RNG streams and the data position are left untouched, so a run's losses are the same with and without
    probes.

    Args:
        runner: builds the tasks, scores the cells and writes the report files.
        run_dir: the run folder (names the run when no MLflow logger does).
        every_n_steps, at_start, at_end: when to probe (the ``probe`` section's keys of those names).

    Example:
        ``make exp NAME=quickstart ARGS="probe.every_n_steps=20 probe.locales=[de,kk,ta]"``
    """

    def __init__(self, runner: ProbeRunner, run_dir: str | Path, every_n_steps: int, at_start: bool = True,
                 at_end: bool = True) -> None:
        self.runner, self.run_dir = runner, Path(run_dir)
        self.every_n_steps, self.at_start, self.at_end = every_n_steps, at_start, at_end
        self.disabled = False
        self.probed: set[int] = set()
        self.last_table: dict | None = None
        self.seconds = 0.0  # mid-training probes (probe/wall_share)
        self.final_seconds = 0.0  # the final evaluation (probe/final_seconds)
        self.started = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start:
            self.probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        every = self.every_n_steps
        if every and trainer.global_step % every == 0:
            self.probe(trainer, pl_module, final=0 < trainer.max_steps <= trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end:
            self.probe(trainer, pl_module, final=True)
        if trainer.is_global_zero and self.last_table is not None:
            self._log_final(trainer)
        if trainer.is_global_zero and self.probed:
            wall = time.perf_counter() - self.started - self.final_seconds
            mid_training = len(self.probed) - (self.final_seconds > 0)
            log.info("probe: %d mid-training probes took %.1f s, %.1f %% of %.1f s of training wall time; the final "
                     "evaluation %.1f s", mid_training, self.seconds, 100 * self.seconds / wall, wall,
                     self.final_seconds)
            totals = {"probe/wall_share": self.seconds / wall}
            if mid_training > 1:  # one mid-training probe: its probe/seconds already says it
                totals["probe/seconds_total"] = self.seconds
            self._log(trainer, totals, [])

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> dict | None:
        """One probe at the current global step (once per step); returns its table. The ``final`` one (the
        last step) also keeps per-query scores."""
        step = trainer.global_step
        if step in self.probed or self.disabled:
            return None
        self.probed.add(step)
        if not self.runner.prepare(trainer, pl_module):
            self.disabled = True
            return None
        table = self.runner.run(step, trainer.precision_plugin.predict_step_context, final,
                                progress=trainer.is_global_zero and trainer.progress_bar_callback is not None)
        if final:  # the final evaluation is sized for the verdicts, not held to the mid-training probes' budget
            self.final_seconds += table["seconds"]
        else:
            self.seconds += table["seconds"]
        self.last_table = table
        if trainer.is_global_zero:
            logged, files = self.runner.write(table, self._run_name(trainer))
            if final:  # the final evaluation's time has its own name (not a mid-training probe's probe/seconds)
                logged["probe/final_seconds"] = logged.pop("probe/seconds")
            self._log(trainer, logged, files)
            summary = table["summary"].get("full", {})
            log.info("probe at step %d: %.1f s, mean main score %.4f at %s", step, table["seconds"],
                     summary.get("mean_main_score", float("nan")), summary.get("cell", "-"))
        return table

    def _run_name(self, trainer: L.Trainer) -> str:
        """The MLflow run's name, else the run folder's ``<experiment>-<timestamp>`` (MLflow's default name)."""
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                return logger.experiment.get_run(logger.run_id).info.run_name
        return f"{self.run_dir.parent.name}-{self.run_dir.name}"

    def _log_final(self, trainer: L.Trainer) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]
        for logger in loggers:
            self.runner.log_final(logger.experiment, logger.run_id, self.last_table, self._run_name(trainer))
        if not loggers:
            self.runner.write_final(self.last_table, self._run_name(trainer))

    def _log(self, trainer: L.Trainer, logged: dict[str, float], files: list[Path]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                try:
                    self.runner.log_to_mlflow(logger.experiment, logger.run_id, logged, trainer.global_step, files)
                except Exception as error:  # noqa: BLE001 - a tracking server that does not answer must not stop it
                    log.error("probe: step %d not logged to MLflow (%s: %s); its files are in %s", trainer.global_step,
                              type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
                              files[0].parent if files else "the run folder")
            else:
                logger.log_metrics(logged, step=trainer.global_step)
