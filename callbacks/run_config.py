"""Every checkpoint carries the resolved config that trained it: a resume checks against it and a loader rebuilds
the model from it, whatever happened to the run folder's ``config.yaml``."""

from __future__ import annotations

from typing import Any

import lightning as L

CONFIG_KEY = "matryoshka_lab_config"  # plain containers only: a checkpoint loads with weights_only=True


class RunConfigInCheckpoint(L.Callback):
    """Writes ``config`` (a plain dict, interpolations resolved) under :data:`CONFIG_KEY` into each checkpoint.

    Example:
        >>> L.Trainer(callbacks=[RunConfigInCheckpoint(OmegaConf.to_container(config, resolve=True))])
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config
