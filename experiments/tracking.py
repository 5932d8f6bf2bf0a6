"""MLflow tracking of experiment runs: the store check, a strict resume-safe logger, and what a run logs at its start
(params and tags: :mod:`experiments.run_metadata`) and end (per-view loss heatmaps: :mod:`experiments.run_summary`).

What lands in MLflow for one run:

- params: the resolved config flattened with its exact keys (plugin blocks with every option, defaults included),
  plus ``corpus.train_pairs.<source>``; a value longer than MLflow's 6000 characters goes to the artifact
  ``params/<key>.txt`` and the param says so. Nothing is renamed or truncated.
- tags: ``git.commit``, ``git.dirty``, ``config.hash``, ``versions.<package>``, ``device``; ``resume.count`` and
  ``resume.changed_keys`` once a run was resumed.
- metrics: whatever the module and callbacks log; a name MLflow would reject (or Lightning would rewrite) raises.
  Headline metrics are under ``train/`` (and the probe's under ``probe/``); plumbing (data counts, waits, memory)
  under ``system/``, which MLflow shows in its own "System metrics" tab. Lightning's ``epoch`` is not logged (the
  stream is one endless epoch: it would be a constant 0).
- artifacts: ``config.yaml`` (the resolved config) and ``plots/final_view_loss*.png`` + ``.json``; the probe adds
  ``probe_final.csv`` and ``probe_final_<setting>.png`` at the root (evaluation/report.py).
- description (``mlflow.note.content``): the header comment of the experiment file.
- system metrics (``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``, GPU ones where
  ``nvidia-ml-py`` finds a GPU): MLflow's own monitor, every 10 s (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``).

The terminal table of runs lives in ``experiments/runs_table.py``, the MLflow UI launcher in
``experiments/mlflow_ui.py`` (no Lightning import in either).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from contracts.atomic import write_atomic
from contracts.config_error import error_line
from experiments.config import EXPERIMENTS_DIR, ConfigError
from experiments.run_metadata import check_name, flatten, log_params, run_params, run_tags
from experiments.store import HalfMigratedStoreError, open_store

RUN_ID_FILE = "mlflow_run_id"
RUN_DIR_TAG = "run_dir"  # the run folder (absolute) of an MLflow run: a later run finds runs whose process died
UNLOGGED_FILE = "unlogged_metrics.jsonl"  # in the run folder: metrics a tracking server did not take yet
RETRY_SECONDS = 30  # while the tracking server does not answer, one attempt per this many seconds
MLFLOW_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
REMOTE_SCHEMES = ("http", "https", "databricks")
# MLflow 3's UI opens an experiment on its GenAI (traces) view unless this experiment tag says model training.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # the run description the UI shows and edits
SYSTEM_METRICS_INTERVAL_S = 10


class TrackingError(ConfigError):
    """The MLflow store cannot be used; raised before any training. ``str()`` names the URI."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__("tracking.uri", f"cannot use the MLflow store {uri} (unreachable or not writable), "
                                         f"nothing was trained: {reason}")
        self.uri = uri


def is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0] in REMOTE_SCHEMES


def artifact_location(config: DictConfig) -> str | None:
    """Where a new MLflow experiment keeps artifacts: ``tracking.artifact_dir`` for a local store; a remote server
    chooses its own (a client-side path would be meaningless to it)."""
    if is_remote(config.tracking.uri):
        return None
    return Path(config.tracking.artifact_dir).resolve().as_uri()


def _prepare_local_store(config: DictConfig) -> None:
    uri = config.tracking.uri
    if uri.startswith("sqlite:///"):
        try:
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingError(uri, f"{type(error).__name__}: {error}") from None
    if not is_remote(uri):
        artifact_dir = Path(config.tracking.artifact_dir)
        try:
            artifact_dir.mkdir(parents=True, exist_ok=True)
            probe = artifact_dir / f".write-check-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise ConfigError("tracking.artifact_dir", f"{artifact_dir} is not a writable folder "
                                                       f"({type(error).__name__}: {error.strerror or error})") from None


@contextmanager
def fail_fast_http() -> Iterator[None]:
    """MLflow retries an unreachable server 7 times with back-off (minutes); the store check wants one answer, and
    training must not stall on a dead server (:class:`StrictMLFlowLogger` keeps what it could not send)."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _local_path(location: str) -> str:
    """An artifact location as a comparable string: the resolved path of a ``file:`` URI or plain path, else the
    URI itself (``s3://...``)."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return str(Path(unquote(parsed.path)).resolve())
    return location


def check_artifact_location(config: DictConfig, experiment) -> None:
    """MLflow fixes an experiment's artifact location when the experiment is created and ignores any other one
    later: a ``tracking.artifact_dir`` that disagrees would silently put this run's artifacts elsewhere.

    Raises:
        ConfigError: naming ``tracking.artifact_dir``, both locations and the experiment.
    """
    wanted = artifact_location(config)
    if wanted is None or _local_path(wanted) == _local_path(experiment.artifact_location):
        return
    raise ConfigError("tracking.artifact_dir", f"{_local_path(wanted)} disagrees with "
                      f"{_local_path(experiment.artifact_location)}, where the existing MLflow experiment "
                      f"{experiment.name!r} in {config.tracking.uri} keeps its artifacts (fixed when it was created); "
                      f"set tracking.artifact_dir to that folder, or use another tracking.experiment or tracking.uri")


def check_tracking(config: DictConfig) -> None:
    """Stops the run before any training when the store cannot be reached or written, or when an existing
    experiment keeps its artifacts somewhere else than ``tracking.artifact_dir``.

    Creates the experiment if needed (tagged as a model-training experiment, so the UI opens on its runs) and writes
    one experiment tag (a real write, cheap); for a local store also writes and removes a file in
    ``tracking.artifact_dir``.

    Raises:
        TrackingError: naming ``tracking.uri`` and the store's answer.
        ConfigError: naming ``tracking.artifact_dir`` (see :func:`check_artifact_location`).
    """
    uri = config.tracking.uri
    _prepare_local_store(config)  # a bad tracking.artifact_dir is named as such
    try:
        with fail_fast_http():
            client = open_store(uri)  # created or migrated by one process at a time
            experiment = client.get_experiment_by_name(config.tracking.experiment)
            if experiment is None:
                experiment_id = client.create_experiment(config.tracking.experiment, artifact_location(config),
                                                         tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            else:
                experiment_id = experiment.experiment_id
            client.set_experiment_tag(experiment_id, "matryoshka_lab.last_write_check", datetime.now().isoformat())
    except HalfMigratedStoreError as error:  # not a reachability problem: say what it is and how to repair it
        raise ConfigError("tracking.uri", str(error)) from None
    except Exception as error:  # any failure here means the store is not usable; say which and why
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrackingError(uri, f"{type(error).__name__}: {reason}"[:500]) from None
    if experiment is not None:
        check_artifact_location(config, experiment)


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

    Global rank 0 has created the store (:func:`check_tracking`); the other ranks wait for it before their logger
    opens it (:func:`experiments.store.wait_for_store`)."""
    from experiments.store import wait_for_store

    _prepare_local_store(config)
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


def log_run_inputs(logger: StrictMLFlowLogger, config: DictConfig, run_dir: Path, sources: Mapping[str, int]) -> None:
    """Params, tags and the resolved ``config.yaml`` of a run; on resume, only what is missing, and any param or
    tag whose value changed since the run began is listed in the tag ``resume.changed_keys`` and the artifact
    ``resume/changes-<time>.txt`` (MLflow keeps the first value)."""
    write_atomic(run_dir / RUN_ID_FILE, logger.run_id)
    client, run_id = logger.experiment, logger.run_id
    client.set_tag(run_id, RUN_DIR_TAG, str(run_dir.resolve()))
    changed = log_params(client, run_id, run_params(config, sources))
    if not logger.resumed:
        client.log_text(run_id, OmegaConf.to_yaml(config, resolve=True), "config.yaml")
        description = experiment_description(EXPERIMENTS_DIR / f"{config.name}.yaml")
        if description:
            client.set_tag(run_id, DESCRIPTION_TAG, description)
        return
    run = client.get_run(run_id)
    client.update_run(run_id, status="RUNNING")
    tags = run.data.tags
    for key, value in run_tags(config).items():
        if key not in tags:
            client.set_tag(run_id, key, value)
        elif tags[key] != value:
            changed[key] = (tags[key], value)
    client.set_tag(run_id, "resume.count", str(int(tags.get("resume.count", "0")) + 1))
    if changed:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        client.log_text(run_id, "".join(f"{key}: {old!r} -> {new!r}\n" for key, (old, new) in changed.items()),
                        f"resume/changes-{stamp}.txt")
        client.log_text(run_id, OmegaConf.to_yaml(config, resolve=True), f"resume/config-{stamp}.yaml")
        earlier = tags.get("resume.changed_keys", "")
        keys = sorted(set(filter(None, earlier.split(","))) | set(changed))
        client.set_tag(run_id, "resume.changed_keys", ",".join(keys)[:8000])
        print(f"resumed MLflow run {run_id} with changed settings (first values kept as params): {', '.join(changed)}",
              file=sys.stderr)


def mark_killed_runs(config: DictConfig) -> list[str]:
    """Marks KILLED the RUNNING MLflow runs of this experiment whose process is gone: their run folder (tag
    :data:`RUN_DIR_TAG`) is on this machine and nobody holds its lock (a process killed before its first checkpoint,
    whose folder is never resumed, would otherwise stay RUNNING forever). Returns their ids; a store that does not
    answer is left alone."""
    from mlflow import MlflowClient

    from experiments.run_lock import is_locked

    killed = []
    try:
        with fail_fast_http():
            client = MlflowClient(config.tracking.uri)
            experiment = client.get_experiment_by_name(config.tracking.experiment)
            runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
            for run in runs:
                folder = run.data.tags.get(RUN_DIR_TAG)
                if folder and Path(folder).is_dir() and not is_locked(Path(folder)):
                    client.set_terminated(run.info.run_id, "KILLED")
                    killed.append(run.info.run_id)
    except Exception as error:  # bookkeeping of other runs never stops this one
        print(f"warning: could not check {config.tracking.uri} for runs left RUNNING ({type(error).__name__})",
              file=sys.stderr)
    if killed:
        print(f"marked KILLED {len(killed)} MLflow run(s) of experiment {config.tracking.experiment!r} whose process "
              f"had died: {', '.join(killed)}", file=sys.stderr)
    return killed


def finish_tracking(logger: StrictMLFlowLogger) -> None:
    """After the final checkpoint: sends the metrics still waiting and logs the per-view loss heatmaps. A store
    that fails now costs nothing trained: what was not sent stays in the run folder (the caller says where)."""
    from experiments.run_summary import log_run_summary

    try:
        with fail_fast_http():
            if logger.replay_unlogged():
                log_run_summary(logger)  # per-view loss heatmaps
    except Exception as error:
        reason = error_line(error)
        print(f"warning: the MLflow store {logger._tracking_uri} failed at the end of the run ({reason}); the "
              f"checkpoint is saved; the loss heatmaps were not logged", file=sys.stderr)


def experiment_description(experiment_file: Path) -> str:
    """The header comment of an experiment file (its leading ``#`` lines, without the ``#``), "" without one."""
    if not experiment_file.is_file():
        return ""
    lines = []
    for line in experiment_file.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" ").rstrip())
    return "\n".join(lines).strip()


@contextmanager
def system_metrics(logger: StrictMLFlowLogger) -> Iterator[None]:
    """MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU where ``nvidia-ml-py`` finds one) on
    this run while the block runs, on global rank 0 only (one machine's view; multi-node jobs see node 0). A resumed
    run continues its ``system/*`` step count."""
    if rank_zero_only.rank != 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(logger.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                   resume_logging=logger.resumed, tracking_uri=logger.experiment.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


