"""Typed experiment configuration: ``base.yaml`` + ``<experiment>.yaml`` deltas + ``key=value`` overrides.

The root :class:`Config` composes the sections that each package declares beside what it builds
(``lightning_modules/config.py``: model, loss, optim, distributed; ``datamodules/config.py``: data;
``evaluation/config.py``: probe); the root keys, ``tracking`` and ``trainer`` belong to the run. Every key is
typed (``Literal`` for a set of names) and each section checks its values in ``__post_init__``, so an unknown key,
a wrong type or a value outside the allowed set stops the run before any work with one message naming the full
key and what is allowed.
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
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException, ValidationError

from evaluation.config import ProbeConfig
from contracts.config_error import ConfigError, check_at_least
from datamodules.config import DataConfig
from lightning_modules.config import (DistributedConfig, LossConfig, ModelConfig, OptimConfig, Strategy,
                                      TrainingPrecision)
from experiments.console import VERBOSE_FLAG, quiet_libraries, take_verbose

EXPERIMENTS_DIR = Path(__file__).resolve().parent


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
    resume: bool | Literal["auto"] = "auto"
    """``auto``: continue the newest run of this experiment whose settings that cannot change on resume equal these
    (else start a new run, saying so); ``true``: continue the newest run, stopping if such a setting changed;
    ``false``: always start a new run."""
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

    def __post_init__(self) -> None:
        check_at_least("seed", self.seed, 0)
        check_at_least("checkpoint_every", self.checkpoint_every, 0, exclusive=True)
        check_at_least("max_nonfinite_steps", self.max_nonfinite_steps, 0)


# The typed sections, each checked by its component's __post_init__.
SECTIONS = [name for name, hint in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(hint)]
# Trainer arguments the run sets itself (the run folder, the MLflow logger, its callbacks, the distributed section).
RUN_OWNED_TRAINER_ARGS = {
    "logger": "tracking.* instead (the run's MLflow logger)",
    "callbacks": "checkpoint_every, probe.*, max_nonfinite_steps instead (the run's own callbacks)",
    "default_root_dir": "output_dir instead (each run gets its own folder under output_dir/NAME)",
    "strategy": f"distributed.strategy instead ({' | '.join(typing.get_args(Strategy))})",
    "precision": f"distributed.precision instead ({' | '.join(typing.get_args(TrainingPrecision))})",
}


def run_command(argv: list[str], usage: str, choices: str, command: Callable[[str, list[str]], int]) -> int:
    """Shared entry of the ``python -m experiments.*`` commands: ``-h`` / no argument prints usage, the hub stays
    offline unless the user set otherwise, the libraries' notices about themselves are filtered unless
    ``--verbose`` (anywhere in ``argv``; see :mod:`experiments.console`), and a ConfigError becomes one line on stderr
    with exit status 2 (with its traceback under ``--debug``)."""
    argv, verbose = take_verbose(argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {usage} [{VERBOSE_FLAG}] [--debug]\n{choices}\n{VERBOSE_FLAG}: also what the libraries print "
              f"about themselves (device lines, tips, MLflow's INFO lines, their deprecation warnings)\n--debug: a "
              f"traceback with every error")
        return 0 if argv else 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not verbose:
        quiet_libraries()
    try:
        return command(argv[0], argv[1:])
    except ConfigError as error:
        if debug:
            raise
        print(error, file=sys.stderr)
        return 2


def available_experiments(experiments_dir: Path = EXPERIMENTS_DIR) -> list[str]:
    return sorted(path.stem for path in experiments_dir.glob("*.yaml") if path.stem != "base")


def _key_error(error: OmegaConfBaseException, prefix: str, origin: str) -> ConfigError:
    """One line from OmegaConf's multi-line message; an unknown key lists the allowed keys of its block (and
    OmegaConf's closest one), a name outside a ``Literal`` the allowed names."""
    key = prefix + (error.full_key or "")
    message = str(error).splitlines()[0]
    section = error.object_type if dataclasses.is_dataclass(error.object_type) else None
    if isinstance(error, ConfigKeyError) and section:
        closest = re.search(r"Did you mean: '([^']+)'", message)
        message = (f"unknown key; allowed keys here: {', '.join(f.name for f in dataclasses.fields(section))}"
                   + (f"; closest: {closest[1]}" if closest else ""))
    elif isinstance(error, ValidationError) and section:
        hint = typing.get_type_hints(section).get(error.key)
        if typing.get_origin(hint) is typing.Literal:
            message = f"{error.value!r} not allowed; choose one of {', '.join(map(str, typing.get_args(hint)))}"
        elif typing.get_origin(hint) in (typing.Union, types.UnionType) and set(typing.get_args(hint)) <= {
                bool, *(arg for arg in typing.get_args(hint) if typing.get_origin(arg) is typing.Literal)}:
            names = [name for arg in typing.get_args(hint)
                     for name in (("true", "false") if arg is bool else typing.get_args(arg))]
            message = f"{error.value!r} not allowed; choose one of {', '.join(names)}"
    return ConfigError(key, f"{message} (from {origin})")


def merge_layer(schema: DictConfig, layer: DictConfig | dict, origin: str, prefix: str = "") -> DictConfig:
    """``layer`` merged into the typed ``schema``; a bad key or value raises ConfigError naming ``prefix`` + key and
    ``origin`` (a file, ``ARGS``)."""
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
        config = merge_layer(config, load_yaml(path), str(path))
    for origin, layer in layers:
        config = merge_layer(config, layer, origin)
    dotlist = parse_overrides(list(overrides or []))
    config = merge_layer(config, dotlist, "ARGS")
    config.name = name
    if config.tracking.experiment is None:
        config.tracking.experiment = name
    _check_interpolations(config, [*files, *(origin for origin, _ in layers)], overrides or [])
    validate(config)
    return config


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``key=value`` overrides as a config; a value that is not valid YAML is named with its override.

    Raises:
        ConfigError: at ``ARGS``, quoting the override that does not parse.
    """
    for override in overrides:
        try:
            OmegaConf.from_dotlist([override])
        except (OmegaConfBaseException, yaml.YAMLError) as error:
            problem = getattr(error, "problem", None) or (str(error).splitlines() or [type(error).__name__])[0]
            raise ConfigError("ARGS", f"cannot parse {override!r}: {problem} (values are YAML: close brackets "
                                      f"and quotes, e.g. data.locales=[de,fr])") from None
    return OmegaConf.from_dotlist(overrides)


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
    """Value checks the types cannot express: each section's own (its ``__post_init__``, reported under the
    section's key), the root's, and the Trainer arguments against the ``distributed`` section."""
    for section in SECTIONS:
        _run_checks(config[section], section)
    _run_checks(config, "")  # the root's own checks (its sections pass again, already checked)
    _validate_distributed(config)
    _validate_trainer(config)


def _run_checks(node: DictConfig, section: str) -> None:
    """Instantiates ``node``'s dataclass, which runs its ``__post_init__``; a ConfigError names the full key."""
    try:
        OmegaConf.to_object(node)
    except ConfigError as error:
        raise (error.under(section) if section else error) from None
    except OmegaConfBaseException as error:
        raise _key_error(error, "", "the composed config") from None  # its full_key starts at the root


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
    max_steps = config.trainer.get("max_steps")
    if isinstance(max_steps, int) and max_steps < 1:  # Lightning's -1 (no limit) never ends on an endless stream
        raise ConfigError("trainer.max_steps", f"{max_steps} trains nothing; set the number of optimizer steps (>= 1)")


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
        typed = merge_layer(schema, options, f"the plugins.{name} block", prefix=f"plugins.{name}.")
        resolved[name] = (plugin_class, OmegaConf.to_object(typed))
    return resolved
