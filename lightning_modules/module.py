"""The LightningModule: encode → bundle → plugins → weighted sum of contrastive losses."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import lightning as L
import torch
from torch import Tensor

from lightning_modules.backbone_adapter import Backbone, BackboneInfo
from lightning_modules.distributed import (activation_checkpointing_enabled, enable_activation_checkpointing, is_sharded,
                                           shard_backbone)
from lightning_modules.flops import text_lengths, training_flops
from lightning_modules.gradient_cache import GradientCache
from lightning_modules.losses import ContrastiveLoss
from lightning_modules.config import OptimConfig
from lightning_modules.optim import build_optimizer
from lightning_modules.plugins.base import MatryoshkaPlugin, ModelSidePlugin
from contracts.cells import Cell
from lightning_modules.views import EmbeddingBundle, View


def plugin_full_settings(plugins: list[MatryoshkaPlugin]) -> dict[str, object]:
    """Each axis's untruncated setting (``{tag: value}``), which cell names leave out (contracts.cells.cut_tags)."""
    return {tag: value for plugin in plugins for tag, value in plugin.full_settings().items()}


def plugin_cells(plugins: list[MatryoshkaPlugin], info: BackboneInfo) -> list[Cell]:
    """Every deployable cell of a run from its plugins and its backbone's shape alone, before (or without) any
    weights: the views of each model-side setting, in training's tag order.

    A model-side plugin's views carry the setting it computes at (``current()``, which :meth:`applied` sets), so
    each setting is pinned as that value here instead of being applied to a network. The cells carry the plugins'
    full settings, so their names from the config alone equal the trained model's."""
    plugins = sorted(plugins, key=lambda plugin: plugin.stage)
    full_settings = plugin_full_settings(plugins)
    model_side = [plugin for plugin in plugins if isinstance(plugin, ModelSidePlugin)]
    empty = torch.zeros(0, info.hidden_size)
    bundle = EmbeddingBundle((empty,) * (info.num_layers + 1), lambda hidden: hidden, None)
    cells = []
    for values in itertools.product(*(plugin.settings for plugin in model_side)):
        try:
            for plugin, value in zip(model_side, values):
                plugin.current = lambda value=value: value  # shadows the method on this instance only
            views = [bundle.root_view(full_settings)]
            for plugin in plugins:
                views = plugin.expand(views, bundle)
            cells += [view.cell(info.num_layers) for view in views]
        finally:
            for plugin in model_side:
                vars(plugin).pop("current", None)
    return cells


class MatryoshkaEmbedder(L.LightningModule):
    """Trains a text-embedding backbone on every nested view the plugins define, from one forward per step.

    Args:
        backbone: the wrapped Hugging Face model.
        plugins: Matryoshka axes; ``setup`` runs here, before the optimizer exists, so a plugin that replaces
            weights (MEL) keeps the replaced ones out of the optimizer.
        loss: the contrastive loss applied to each view.
        optim: optimizer and schedule settings (``optim.name``: see :func:`~lightning_modules.optim.build_optimizer`).
        activation_checkpointing: recompute each transformer block in the backward pass (``configure_model``).
        cache_chunk_size: gradient caching with chunks of this many texts (:mod:`~lightning_modules.gradient_cache`);
            None: one forward with a graph.

    The public API of a trained model (what the probe, export and mining use): :meth:`cells` lists every
    deployable cell, :meth:`settings` and :meth:`applied` the model-side settings (one forward each),
    :meth:`encode` embeds a tokenized batch at any cells.

    Under Lightning's ``ModelParallelStrategy`` (``distributed.strategy: fsdp2``) ``configure_model`` shards the
    backbone with FSDP2: one unit per transformer block, the token embedding (MEL's factors) and the root.
    """

    def __init__(self, backbone: Backbone, plugins: list[MatryoshkaPlugin], loss: ContrastiveLoss,
                 optim: OptimConfig, activation_checkpointing: bool = False, cache_chunk_size: int | None = None
                 ) -> None:
        super().__init__()
        self.backbone = backbone
        self.plugins = sorted(plugins, key=lambda plugin: plugin.stage)
        self.model_side = [plugin for plugin in self.plugins if isinstance(plugin, ModelSidePlugin)]
        for plugin in self.plugins:
            plugin.setup(backbone)
        self.full_settings = plugin_full_settings(self.plugins)
        self.loss = loss
        self.optim = optim
        self.activation_checkpointing = activation_checkpointing
        self.gradient_cache = GradientCache(cache_chunk_size) if cache_chunk_size else None
        embedding = backbone.input_embeddings()
        # Token-embedding lookups cost no matmul FLOPs; the rest costs ~6 FLOPs per parameter per token.
        self.dense_parameters = sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in embedding.parameters())
        config = backbone.model.config
        self.attention_width = config.num_attention_heads * (getattr(config, "head_dim", None)
                                                             or config.hidden_size // config.num_attention_heads)
        setting = self.settings()[0]  # every setting has the same output-side views
        self.view_widths = [cell.dim for cell in self.cells() if self.setting_of(cell) == setting]
        self._last_batch: dict | None = None  # the batch of the last training step, for flops_per_batch
        self.last_logged: dict[str, float] = {}  # the metrics of the last logging step (see log_step)

    def views(self, batch: dict, step: int) -> list[View]:
        """All weighted views of one batch, from one forward."""
        for plugin in self.plugins:
            plugin.before_forward(step)
        return self.forward_views(batch["input_ids"], batch["attention_mask"], batch.get("packing"))

    def forward_views(self, input_ids: Tensor, attention_mask: Tensor, packing: dict | None = None) -> list[View]:
        """The plugins' nested, tagged views of one forward at the current model-side setting (``packing``: the
        packed-batch layout a ``data.packing`` batch carries; None for padded texts)."""
        return self.expand(self.backbone(input_ids, attention_mask, packing))

    def expand(self, bundle: EmbeddingBundle) -> list[View]:
        """The plugins' nested, tagged views of one bundle."""
        views = [bundle.root_view(self.full_settings)]
        for plugin in self.plugins:
            views = plugin.expand(views, bundle)
        return views

    def settings(self) -> list[dict[str, object]]:
        """Every combination of the model-side axes' settings, ``{tag: value}``, the full model first (``[{}]``
        without a model-side axis). Each needs its own forward."""
        ladders = [[(plugin.tag, value) for value in plugin.settings] for plugin in self.model_side]
        return [dict(combination) for combination in itertools.product(*ladders)]

    @contextmanager
    def applied(self, setting: dict[str, object]) -> Iterator[None]:
        """The model computes at ``setting`` (a subset of the model-side tags) inside; as before on exit."""
        unknown = set(setting) - {plugin.tag for plugin in self.model_side}
        if unknown:
            raise ValueError(f"no model-side axis has the tag(s) {sorted(unknown)}; the run's: "
                             f"{[plugin.tag for plugin in self.model_side]}")
        with ExitStack() as stack:
            for plugin in self.model_side:
                if plugin.tag in setting:
                    stack.enter_context(plugin.applied(setting[plugin.tag]))
            yield

    def setting_of(self, cell: Cell) -> dict[str, object]:
        """The model-side part of a cell's tags."""
        return {plugin.tag: cell.tags[plugin.tag] for plugin in self.model_side}

    def cells(self) -> list[Cell]:
        """Every deployable cell of the run, from the plugins alone (:func:`plugin_cells`)."""
        return plugin_cells(self.plugins, self.backbone.info)

    def encode(self, input_ids: Tensor, attention_mask: Tensor, cells: list[Cell]) -> dict[str, Tensor]:
        """L2-normalised embeddings of a tokenized batch at each of ``cells`` (``{cell name: [texts, dim]}``),
        from one forward per model-side setting among them. Call under ``torch.no_grad()`` in eval mode."""
        by_setting: dict[tuple, list[Cell]] = {}
        for cell in cells:
            by_setting.setdefault(tuple(self.setting_of(cell).items()), []).append(cell)
        embeddings = {}
        for setting, members in by_setting.items():
            with self.applied(dict(setting)):
                views = {view.cell(self.backbone.info.num_layers).name: view
                         for view in self.forward_views(input_ids, attention_mask)}
            for cell in members:
                if cell.name not in views:
                    raise ValueError(f"cell {cell.name} is not a cell of this run")
                embeddings[cell.name] = torch.nn.functional.normalize(views[cell.name].embeddings, dim=-1)
        return embeddings

    def view_losses(self, views: list[View], batch: dict) -> list[dict[str, Tensor]]:
        """Each view's loss terms, before its weight: the contrastive ones (views of equal width in one batched
        computation) and every plugin's ``loss_terms``."""
        all_terms = self.loss.per_view([view.embeddings for view in views], batch["num_queries"],
                                       batch["negatives_per_query"], batch.get("in_batch", True))
        for view, terms in zip(views, all_terms):
            for plugin in self.plugins:
                terms.update(plugin.loss_terms(view, batch))
        return all_terms

    @property
    def flops_per_batch(self) -> int:
        """Model FLOPs of the last training step, read by ThroughputRates (``train/mfu``) after the step, when
        Lightning's ThroughputMonitor has synchronised the device anyway."""
        return 0 if self._last_batch is None else self.training_flops(self._last_batch)

    def training_flops(self, batch: dict) -> int:
        """Model FLOPs of a training step on ``batch`` (:func:`~lightning_modules.flops.training_flops`; the model-side
        axes counted at their full setting)."""
        queries, negatives = batch["num_queries"], batch["negatives_per_query"]
        scores = (1 + negatives if self.loss.hard_negative and negatives else 0)
        if self.loss.in_batch and batch.get("in_batch", True):
            scores += queries * (self.trainer.world_size if self._trainer is not None else 1)
        return training_flops(text_lengths(batch), self.dense_parameters, self.backbone.info.num_layers,
                              self.attention_width, self.view_widths, queries, scores)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self._last_batch = batch
        if self.gradient_cache is not None:  # chunk by chunk; all chunks but the last back-propagate here
            self.zero_grad(set_to_none=True)  # instead of Lightning's zeroing, which comes after training_step
            views, view_terms, total = self.gradient_cache.step(self, batch, self.global_step)
        else:
            views = self.views(batch, self.global_step)
            view_terms = self.view_losses(views, batch)
            total = self.weighted_total(views, view_terms)
        if self.logs_this_step():
            self.log_step(views, view_terms, total.detach(), batch.get("stats", {}))
        return total

    def weighted_total(self, views: list[View], view_terms: list[dict[str, Tensor]]) -> Tensor:
        """The loss training minimises: Σ over views of weight · the sum of the view's terms."""
        total = torch.zeros((), device=self.device)
        for view, terms in zip(views, view_terms):
            total = total + view.weight * sum(terms.values())
        return total

    def log_step(self, views: list[View], view_terms: list[dict[str, Tensor]], total: Tensor,
                 stats: dict[str, float]) -> None:
        """Writes this step's metrics to the loggers (and :attr:`last_logged`): the losses as means over the global
        batch (one all-reduce over every device), then ``train/lr``, the plugins' ``train/<key>`` and the DataModule's
        ``stats``, which are already global or say ``device`` in their names.

        - ``train/loss``: the weighted sum over views that training minimises.
        - ``train/loss/<cell>`` (before its weight; the view's cell name, as the probe's): only when there is more
          than one view.
        - ``train/loss_<term>`` (weighted sum over views) and, with more than one view, ``train/loss_<term>/<cell>``:
          only when there is more than one term (e.g. ``hard`` and ``in_batch``).

        A metric that would always equal another (the one view's loss, the one term's loss) is left out.

        Every key is this step's own value: the names of views not trained this step (a MEL rank not sampled) are
        absent, not repeated. Written straight to the loggers rather than through ``self.log``: Lightning's result
        collection re-emits every key logged earlier in the epoch (our stream is one endless epoch) at each logging
        step, so a view of another MEL rank would repeat a stale value."""
        means = {"train/loss": total}
        per_view = len(views) > 1
        num_layers = self.backbone.info.num_layers
        for view, terms in zip(views, view_terms):
            cell = view.cell(num_layers).name
            if per_view:
                means[f"train/loss/{cell}"] = sum(terms.values()).detach()
            if len(terms) > 1:
                for term, value in terms.items():
                    means[f"train/loss_{term}"] = means.get(f"train/loss_{term}", 0.0) + view.weight * value.detach()
                    if per_view:
                        means[f"train/loss_{term}/{cell}"] = value.detach()
        # Every device trains the same views and terms, so the keys agree; one collective for all values.
        values = self.trainer.strategy.reduce(torch.stack(list(means.values())).float(), reduce_op="mean").tolist()
        metrics = dict(zip(means, values))
        metrics["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0
        for plugin in self.plugins:
            metrics.update({f"train/{key}": float(value) for key, value in plugin.step_metrics().items()})
        metrics.update({key: float(value) for key, value in stats.items()})
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)  # the step Lightning gives its own metrics
        self.last_logged = metrics

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this step's metrics to the logger (its ``log_every_n_steps`` rule), or it is the
        last step (the run's final metrics). The module's metrics are built and reduced over devices only then: views
        x terms reach hundreds of values, and the reduction is a collective that the other steps do without."""
        step, every = self.global_step + 1, self.trainer.log_every_n_steps
        return step == self.trainer.max_steps or bool(every) and (step % every == 0 or self.trainer.should_stop)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        """Lightning zeroes the gradients between ``training_step`` and the backward of its loss; a cached step has
        back-propagated most of its chunks by then, so it zeroes them itself, first."""
        if self.gradient_cache is None:
            optimizer.zero_grad()

    def configure_model(self) -> None:
        if self.activation_checkpointing and not activation_checkpointing_enabled(self.backbone):
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
    """LR factor: linear warm-up ``(step + 1) / warmup_steps`` to 1, then cosine down to ``floor`` at the end.

    transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` computes the same factors after warm-up, bit for
    bit, but warms up as ``step / warmup_steps``: its first step has LR 0 and does not train, and the tiny 3D-ML run's
    loss at step 1 moves from the recorded 2.8598 to 2.8794 (tests/integration/test_reference_losses.py,
    tests/unit/test_lr_schedule.py).
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
