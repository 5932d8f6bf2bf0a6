"""A progress bar that counts optimizer steps towards ``max_steps`` (our training stream has no epochs)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``step/max_steps`` with ETA, starting at the resumed step, showing the total loss and the plugins' step
    choices (e.g. the MEL rank) of the last logged step rather than the dozens of per-view losses (those are in
    MLflow)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if trainer.max_steps > 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total) and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        # The module writes its metrics straight to the loggers and keeps the last logged ones (last_logged).
        logged = getattr(pl_module, "last_logged", {})
        shown = ["train/loss", *(f"train/{key}" for plugin in getattr(pl_module, "plugins", [])
                                 for key in plugin.step_metrics())]
        return {key.removeprefix("train/"): logged[key] for key in shown if key in logged}
