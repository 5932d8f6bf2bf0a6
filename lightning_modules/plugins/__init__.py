"""Matryoshka axes. Built-ins by name; any other plugin by ``_target_: module.Class`` in the experiment YAML, from a
package the config allows (``plugin_packages``)."""

from __future__ import annotations

import importlib
import re

from contracts.config_error import ConfigError
from lightning_modules.plugins.base import MatryoshkaPlugin, PluginConfig
from lightning_modules.plugins.distillation import Distillation
from lightning_modules.plugins.ffn import FFN
from lightning_modules.plugins.mel import MEL
from lightning_modules.plugins.mll import MLL
from lightning_modules.plugins.mrl import MRL
from lightning_modules.plugins.precision import Precision

BUILTIN_PLUGINS: dict[str, type[MatryoshkaPlugin]] = {"mll": MLL, "mrl": MRL, "mel": MEL, "precision": Precision,
                                                   "distill": Distillation, "ffn": FFN}

PLUGIN_PACKAGE = "lightning_modules.plugins"  # always importable; others only when listed in plugin_packages
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")

__all__ = ["BUILTIN_PLUGINS", "ConfigError", "Distillation", "FFN", "MEL", "MLL", "MRL", "MatryoshkaPlugin",
           "PluginConfig", "Precision", "resolve_plugin"]


def resolve_plugin(name: str, target: str | None, packages: list[str] = ()) -> type[MatryoshkaPlugin]:
    """The plugin class for config entry ``plugins.<name>``: ``target`` if given, else a built-in name.

    A ``target`` is imported only when its module lies in :data:`PLUGIN_PACKAGE` or one of ``packages``: a config
    value never imports (and so runs) an arbitrary module.

    Example:
        >>> resolve_plugin("topk", "my_axes.topk.TopK", packages=["my_axes"])
    """
    if target is None:
        if name not in BUILTIN_PLUGINS:
            raise ValueError(f"unknown plugin {name!r}; built-ins: {', '.join(BUILTIN_PLUGINS)}; "
                             f"any other needs `_target_: package.module.Class`")
        return BUILTIN_PLUGINS[name]
    if not isinstance(target, str) or not DOTTED_NAME.fullmatch(target):
        raise ValueError(f"_target_ {target!r} is not a dotted class path such as my_axes.topk.TopK")
    module_name, _, class_name = target.rpartition(".")
    allowed = [PLUGIN_PACKAGE, *packages]
    if not any(module_name == package or module_name.startswith(package + ".") for package in allowed):
        raise ValueError(f"_target_ {target} is not in an allowed package ({', '.join(allowed)}); nothing was "
                         f"imported; to use it, add its package to plugin_packages, e.g. "
                         f"plugin_packages=[{module_name.split('.')[0]}]")
    plugin_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(plugin_class, type) and issubclass(plugin_class, MatryoshkaPlugin)):
        raise TypeError(f"_target_ {target} is not a MatryoshkaPlugin subclass")
    return plugin_class
