"""What a run logs to MLflow at its start (params and tags: :mod:`experiments.run_metadata`) and end (per-view loss
heatmaps: :mod:`experiments.run_summary`). The store and its check before training live in :mod:`experiments.store`,
the strict resume-safe logger that carries the metrics in :mod:`experiments.mlflow_logger`.

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

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from contracts.atomic import write_atomic
from contracts.config_error import error_line
from experiments.config import EXPERIMENTS_DIR
from experiments.mlflow_logger import RUN_ID_FILE, StrictMLFlowLogger
from experiments.run_metadata import log_params, run_params, run_tags
from experiments.store import fail_fast_http

RUN_DIR_TAG = "run_dir"  # the run folder (absolute) of an MLflow run: a later run finds runs whose process died
DESCRIPTION_TAG = "mlflow.note.content"  # the run description the UI shows and edits
SYSTEM_METRICS_INTERVAL_S = 10


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


