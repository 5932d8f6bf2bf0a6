"""The MLflow logger of a training run, strict about names and safe to resume into (:class:`StrictMLFlowLogger`,
made for a run folder by :func:`make_logger`). What it guarantees:

- names: a metric or param name MLflow would reject, or Lightning's logger would silently rewrite, raises naming it;
  params keep their exact keys and values (no truncation).
- each (metric, step) once: a resumed run continues its MLflow run (id in ``<run_dir>/mlflow_run_id``) and skips
  the steps it already holds, which a killed process logged and the resumed one recomputes identically.
- no stall: a tracking server that stops answering never stops training; metrics wait in
  ``<run_dir>/unlogged_metrics.jsonl`` and are sent when it answers again, at the end of the run, or on resume.
- a store that no longer has the run (deleted or replaced) gets a new MLflow run for the same folder, said on stderr.

What a run logs at its start and end through it: :mod:`experiments.tracking`; the store: :mod:`experiments.store`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from contracts.atomic import write_atomic
from contracts.config_error import error_line
from experiments.run_metadata import check_name, flatten, log_params, run_tags
from experiments.store import artifact_location, fail_fast_http, prepare_local_store, wait_for_store

RUN_ID_FILE = "mlflow_run_id"  # in the run folder: the MLflow run a resumed run continues
UNLOGGED_FILE = "unlogged_metrics.jsonl"  # in the run folder: metrics a tracking server did not take yet
RETRY_SECONDS = 30  # while the tracking server does not answer, one attempt per this many seconds
MLFLOW_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call


class StrictMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger, strict about names and safe to resume into.

    - A metric or hyper-parameter name that MLflow would reject, or that Lightning's logger would silently rewrite
      (``=``, ``@``, ``:``, ...), raises ValueError naming it.
    - Hyper-parameters go through :func:`log_params`: exact keys and values, no 250-character truncation.
    - A metric is never logged at a step at or before the last step the run holds for it: each (metric, step)
      appears exactly once. On a resumed run (``run_id`` given) the steps a killed process logged after its last
      checkpoint are recomputed from the same weights, batches and ranks (pure functions of seed and step), so the
      values first logged stand; nothing is deleted.
    - Lightning's ``epoch`` is dropped: training streams one endless epoch, so it is always 0.
    - A tracking server that stops answering never stops or stalls training: the first failure prints one warning
      naming ``tracking.uri``, metrics go to ``unlogged_file`` (JSON lines in the run folder), one attempt every
      :data:`RETRY_SECONDS` sends them when the server answers again, and :meth:`replay_unlogged` sends what is
      left at the end or on resume. Requests fail fast inside :func:`fail_fast_http`.

    Args:
        *args, **kwargs: as :class:`lightning.pytorch.loggers.MLFlowLogger`.
        unlogged_file: where metrics wait while the server does not answer (None: failures raise).

    Example:
        >>> logger = StrictMLFlowLogger("tiny", tracking_uri="sqlite:///mlruns/mlflow.db", run_id=previous_run_id)
        >>> logger.log_metrics({"train/loss": 1.0}, step=3)  # skipped if step 3 of train/loss is already there
    """

    def __init__(self, *args: Any, unlogged_file: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resumed = self._run_id is not None
        self._logged_steps: dict[str, int] | None = None
        self.unlogged_file = unlogged_file
        self._retry_at: float | None = None  # monotonic time of the next attempt while the server does not answer

    def logged_steps(self) -> dict[str, int]:
        """``{metric: last logged step}``, starting from what the run held when this logger attached to it."""
        if self._logged_steps is None:
            self._logged_steps = {}
            if self.resumed:
                client, run_id = self.experiment, self.run_id
                for key in client.get_run(run_id).data.metrics:
                    self._logged_steps[key] = max(m.step for m in client.get_metric_history(run_id, key))
        return self._logged_steps

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key in metrics:
            check_name("metric", f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix else key)
        done, step = self.logged_steps(), step or 0
        new = {key: value for key, value in metrics.items() if step > done.get(key, -1) and key != "epoch"}
        if new:
            self._send_or_keep(new, step)
            done.update(dict.fromkeys(new, step))

    def _send_or_keep(self, metrics: Mapping[str, float], step: int) -> None:
        if self.unlogged_file is None:
            super().log_metrics(metrics, step)
            return
        if self._retry_at is None or (time.monotonic() >= self._retry_at and self.replay_unlogged()):
            try:
                super().log_metrics(metrics, step)
                return
            except Exception as error:  # whatever the client raises for a dead or failing server
                self._offline(error)
        entry = {"step": step, "timestamp": int(time.time() * 1000), "metrics": dict(metrics)}
        with self.unlogged_file.open("a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")

    def _offline(self, error: Exception) -> None:
        if self._retry_at is None:
            reason = error_line(error)
            print(f"warning: the MLflow store {self._tracking_uri} (tracking.uri) does not answer ({reason}); training "
                  f"goes on, metrics wait in {self.unlogged_file} and are sent when it answers (or on resume)",
                  file=sys.stderr)
        self._retry_at = time.monotonic() + RETRY_SECONDS

    def replay_unlogged(self) -> bool:
        """Sends the metrics waiting in ``unlogged_file`` (a batch at a time; the file keeps what is not sent yet);
        True when nothing is left to send."""
        from mlflow.entities import Metric

        if self.unlogged_file is None or not self.unlogged_file.is_file():
            self._retry_at = None
            return True
        lines = self.unlogged_file.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            entry = json.loads(line)
            batch = [Metric(key, value, entry["timestamp"], entry["step"]) for key, value in entry["metrics"].items()]
            try:
                for start in range(0, len(batch), MLFLOW_METRICS_PER_BATCH):
                    self.experiment.log_batch(self.run_id, metrics=batch[start: start + MLFLOW_METRICS_PER_BATCH])
            except Exception as error:
                write_atomic(self.unlogged_file, "".join(f"{rest}\n" for rest in lines[number:]))
                self._offline(error)
                return False
        self.unlogged_file.unlink()
        if self._retry_at is not None:
            print(f"the MLflow store {self._tracking_uri} answers again; {len(lines)} waiting steps sent",
                  file=sys.stderr)
        self._retry_at = None
        return True

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self.unlogged_file is None:
            super().finalize(status)
            return
        try:
            if self.replay_unlogged():
                super().finalize(status)
        except Exception as error:
            self._offline(error)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from lightning.fabric.utilities.logger import _convert_params

        params = flatten(dict(_convert_params(params)))
        if params:
            log_params(self.experiment, self.run_id, params)


def missing_run(uri: str, run_id: str) -> bool:
    """Whether the store answers that it has no run ``run_id`` (deleted or replaced store); an unreachable store is
    not a missing run (its metrics wait, see :class:`StrictMLFlowLogger`)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        with fail_fast_http():
            MlflowClient(uri).get_run(run_id)
    except MlflowException as error:
        return error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)
    except Exception:  # an unreachable or failing store: the run may well be there
        return False
    return False


def make_logger(config: DictConfig, run_dir: Path) -> StrictMLFlowLogger:
    """MLflow logger for this run; a resumed run continues its MLflow run (id kept in ``run_dir/mlflow_run_id``), or
    starts a new one for the same folder when the store no longer has it (saying so on stderr).

    Global rank 0 has created the store (:func:`experiments.store.check_tracking`); the other ranks wait for it
    before their logger opens it (:func:`experiments.store.wait_for_store`)."""
    prepare_local_store(config)
    if rank_zero_only.rank != 0:
        wait_for_store(config.tracking.uri)
    run_id_file = run_dir / RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
    if run_id and rank_zero_only.rank == 0 and missing_run(config.tracking.uri, run_id):
        waiting = run_dir / UNLOGGED_FILE
        print(f"the MLflow run {run_id} of {run_dir} is not in {config.tracking.uri} (store deleted or replaced); "
              f"this run folder goes on in a new MLflow run"
              + (f", which gets the metrics waiting in {waiting}" if waiting.is_file() else ""), file=sys.stderr)
        run_id = None
    return StrictMLFlowLogger(
        unlogged_file=run_dir / UNLOGGED_FILE,
        experiment_name=config.tracking.experiment,
        run_name=config.tracking.run_name or f"{config.name}-{run_dir.name}",
        tracking_uri=config.tracking.uri,
        tags=run_tags(config),
        artifact_location=artifact_location(config),
        run_id=run_id,
    )
