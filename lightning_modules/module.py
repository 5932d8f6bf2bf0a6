"""The LightningModule: encode → bundle → plugins → weighted sum of contrastive losses."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor

from lightning_modules.backbone import Backbone
from lightning_modules.distributed import enable_activation_checkpointing, is_sharded, shard_backbone
from lightning_modules.losses import ContrastiveLoss
from lightning_modules.optim import build_optimizer
from lightning_modules.plugins.base import MatryoshkaPlugin
from lightning_modules.views import EmbeddingBundle, View

if TYPE_CHECKING:
    from experiments.config import OptimConfig


class MatryoshkaEmbedder(L.LightningModule):
    """Trains a text-embedding backbone on every nested view the plugins define, from one forward per step.

    Args:
        backbone: the wrapped Hugging Face model.
        plugins: Matryoshka axes; ``setup`` runs here, before the optimizer exists, so a plugin that replaces
            weights (MEL) keeps the replaced ones out of the optimizer.
        loss: the contrastive loss applied to each view.
        optim: optimizer and schedule settings (``optim.name``: see :func:`~lightning_modules.optim.build_optimizer`).
        activation_checkpointing: recompute each transformer block in the backward pass (``configure_model``).

    Under Lightning's ``ModelParallelStrategy`` (``distributed.strategy: fsdp2``) ``configure_model`` shards the
    backbone with FSDP2: one unit per transformer block, the token embedding (MEL's factors) and the root.
    """

    def __init__(self, backbone: Backbone, plugins: list[MatryoshkaPlugin], loss: ContrastiveLoss,
                 optim: OptimConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.plugins = sorted(plugins, key=lambda plugin: plugin.stage)
        for plugin in self.plugins:
            plugin.setup(backbone)
        self.loss = loss
        self.optim = optim
        self.activation_checkpointing = activation_checkpointing
        embedding = backbone.input_embeddings()
        # Token-embedding lookups cost no matmul FLOPs; the rest costs ~6 FLOPs per parameter per token.
        self.dense_parameters = sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in embedding.parameters())
        self.flops_per_batch = 0

    def views(self, batch: dict, step: int) -> list[View]:
        """All weighted views of one batch, from one forward."""
        for plugin in self.plugins:
            plugin.before_forward(step)
        return self.expand(self.backbone(batch["input_ids"], batch["attention_mask"], batch.get("packing")))

    def expand(self, bundle: EmbeddingBundle) -> list[View]:
        """The plugins' nested, tagged views of one bundle (also the MTEB probe's grid cells)."""
        views = [bundle.root_view()]
        for plugin in self.plugins:
            views = plugin.expand(views, bundle)
        return views

    def view_losses(self, views: list[View], batch: dict) -> list[dict[str, Tensor]]:
        """Each view's loss terms, before its weight: the contrastive ones (views of equal width in one batched
        computation) and every plugin's ``loss_terms``."""
        all_terms = self.loss.per_view([view.embeddings for view in views], batch["num_queries"],
                                       batch["negatives_per_query"], batch.get("in_batch", True))
        for view, terms in zip(views, all_terms):
            for plugin in self.plugins:
                terms.update(plugin.loss_terms(view, batch))
        return all_terms

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.flops_per_batch = 6 * self.dense_parameters * int(batch["attention_mask"].sum())  # read by ThroughputMonitor
        views = self.views(batch, self.global_step)
        total = torch.zeros((), device=self.device)
        metrics: dict[str, Tensor | float] = {}
        view_metrics: dict[str, Tensor] = {}
        for view, terms in zip(views, self.view_losses(views, batch)):
            view_loss = sum(terms.values())
            total = total + view.weight * view_loss
            view_metrics[f"train/loss/{view.name}"] = view_loss.detach()
            for term, value in terms.items():
                view_metrics[f"train/loss_{term}/{view.name}"] = value.detach()
                metrics[f"train/loss_{term}"] = metrics.get(f"train/loss_{term}", 0.0) + view.weight * value.detach()
        if self.logs_this_step():
            metrics.update(view_metrics)
        metrics["train/loss"] = total.detach()
        metrics["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0
        for plugin in self.plugins:
            metrics.update({f"train/{key}": value for key, value in plugin.step_metrics().items()})
        metrics.update(batch.get("stats", {}))  # the DataModule's data/... metrics (padding, wait, counts)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch["num_queries"])
        return total

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this step's metrics to the logger (its ``log_every_n_steps`` rule), or it is the
        last step (the run's final metrics). Per-view metrics are logged only then: each ``self.log`` costs ~0.25 ms
        of CPU, and views x terms reach hundreds."""
        step, every = self.global_step + 1, self.trainer.log_every_n_steps
        return step == self.trainer.max_steps or bool(every) and (step % every == 0 or self.trainer.should_stop)

    def configure_model(self) -> None:
        if self.activation_checkpointing and not self.backbone.model.is_gradient_checkpointing:
            enable_activation_checkpointing(self.backbone)
        if self.device_mesh is not None and not is_sharded(self.backbone):  # ModelParallelStrategy: FSDP2
            shard_backbone(self.backbone, self.device_mesh["data_parallel"], bf16=self.trainer.precision == "bf16-mixed")

    def configure_optimizers(self):
        optimizer = build_optimizer(self, self.optim)  # after configure_model: sees the FSDP2 shards
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.optim.warmup_steps, total_steps, self.optim.min_lr / self.optim.lr))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float):
    """LR factor: linear warm-up from 0 to 1 over ``warmup_steps``, then cosine down to ``floor`` at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
