"""A progress bar that counts optimizer steps towards ``max_steps`` (our training stream has no epochs)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n

SHOWN_METRICS = ("train/loss", "train/mel/rank", "train/device/samples_per_sec")


class StepProgressBar(TQDMProgressBar):
    """``step/max_steps`` with ETA, starting at the resumed step, showing the total loss rather than the dozens
    of per-view losses (those are in MLflow)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if trainer.max_steps > 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._should_update(trainer.global_step, self.train_progress_bar.total):
            _update_n(self.train_progress_bar, trainer.global_step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        return {key.rsplit("/", 1)[-1]: value for key, value in metrics.items() if key in SHOWN_METRICS}
