"""Matryoshka axes. Built-ins by name; any other plugin by ``_target_: module.Class`` in the experiment YAML."""

from __future__ import annotations

import importlib

from lightning_modules.plugins.base import MatryoshkaPlugin, PluginConfig, PluginConfigError
from lightning_modules.plugins.distillation import Distillation
from lightning_modules.plugins.ffn import FFN
from lightning_modules.plugins.mel import MEL
from lightning_modules.plugins.mll import MLL
from lightning_modules.plugins.mrl import MRL
from lightning_modules.plugins.precision import Precision

BUILTIN_PLUGINS: dict[str, type[MatryoshkaPlugin]] = {"mll": MLL, "mrl": MRL, "mel": MEL, "precision": Precision,
                                                   "distill": Distillation, "ffn": FFN}

__all__ = ["BUILTIN_PLUGINS", "Distillation", "FFN", "MEL", "MLL", "MRL", "MatryoshkaPlugin", "PluginConfig",
           "PluginConfigError", "Precision", "resolve_plugin"]


def resolve_plugin(name: str, target: str | None) -> type[MatryoshkaPlugin]:
    """The plugin class for config entry ``plugins.<name>``: ``target`` if given, else a built-in name."""
    if target is None:
        if name not in BUILTIN_PLUGINS:
            raise ValueError(f"unknown plugin {name!r}; built-ins: {', '.join(BUILTIN_PLUGINS)}; "
                             f"any other needs `_target_: package.module.Class`")
        return BUILTIN_PLUGINS[name]
    module_name, _, class_name = target.rpartition(".")
    plugin_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(plugin_class, type) and issubclass(plugin_class, MatryoshkaPlugin)):
        raise TypeError(f"_target_ {target} is not a MatryoshkaPlugin subclass")
    return plugin_class
