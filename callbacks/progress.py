"""A progress bar that counts optimizer steps towards ``max_steps`` (our training stream has no epochs)."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """One bar, ``train``: ``step/max_steps`` with rate and ETA, starting at the resumed step, showing the total loss
    and the plugins' step choices (e.g. the MEL rank) of the last logged step rather than the dozens of per-view
    losses (those are in MLflow). Lightning's own bar starts as ``Training`` and restarts as ``Epoch 0``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The bar starts with the first step, after the probe at the start: its rate is the training's."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The bar counts steps across the stream's epochs: nothing to restart."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._train_progress_bar is None:
            self.train_progress_bar = Tqdm(
                desc="train", total=trainer.max_steps if trainer.max_steps > 0 else None, initial=trainer.global_step,
                position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_progress_bar is not None:  # None: no step ran (a resumed run that had finished)
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_progress_bar is not None:
            super().on_train_end(trainer, pl_module)

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
