"""MLL: Matryoshka Layer Learning, nested depth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_modules.plugins.base import MatryoshkaPlugin, PluginConfig, checked_ladder, checked_weights

if TYPE_CHECKING:
    from lightning_modules.backbone_adapter import BackboneInfo
    from contracts.cells import Cell
    from lightning_modules.costs import CellCost
    from lightning_modules.views import EmbeddingBundle, View

PAPER_LAYERS = (1, 2, 4, 8, 16, 24, 32, 40, 48)


def default_layers(num_layers: int) -> list[int]:
    """The paper's exits: ``{1, 2, 4, 8, 16, 24, 32, 40, 48} ∩ [1, L] ∪ {L}``, ascending."""
    return sorted({layer for layer in PAPER_LAYERS if layer <= num_layers} | {num_layers})


@dataclass
class MLLConfig(PluginConfig):
    layers: list[int] | None = None
    """Exit layers (1-based block outputs; the embedding output is never used); default: the paper's set."""
    weights: list[float] | None = None
    """One weight per entry of ``layers``; default: uniform ``1 / |layers|``."""


class MLL(MatryoshkaPlugin):
    """Every view becomes one view per exit layer ``l``: the pooled output of block ``l``.

    All exits come from the single forward (the backbone returns every hidden state); decoder exits get the
    final norm (see :class:`~lightning_modules.views.EmbeddingBundle`). Uniform weights ``1 / |layers|``.
    MLL chooses which embedding a view reads, so it runs first (``stage = 0``).

    Args:
        config: ``layers`` and ``weights`` (see :class:`MLLConfig`).
        info: the backbone's sizes; every layer must be in ``[1, num_layers]``.
        seed: unused.

    References:
        Zhang et al., "ML-Embed: Inclusive and Efficient Embeddings for a Multilingual World", ICML 2026, §3.

    Example:
        ``plugins: {mll: {layers: [2, 4]}}`` trains exits after blocks 2 and 4 of a 4-block model.
    """

    Config = MLLConfig
    stage = 0

    def __init__(self, config: MLLConfig, info: BackboneInfo, seed: int) -> None:
        super().__init__(config, info, seed)
        depth = info.num_layers
        layers = checked_ladder("layers", default_layers(depth) if config.layers is None else list(config.layers),
                                depth, "the model's depth", default_layers(depth))
        self.layers = sorted(layers)
        explicit = checked_weights("weights", config.weights, layers)
        self.weights = [1.0 / len(layers)] * len(layers) if explicit is None else [explicit[l] for l in self.layers]

    def expand(self, views: list[View], bundle: EmbeddingBundle) -> list[View]:
        return [
            view.derive(embeddings=bundle.layer(layer), weight_factor=weight, layer=layer)
            for view in views
            for layer, weight in zip(self.layers, self.weights)
        ]

    def cost(self, cell: Cell, cost: CellCost, mode: str) -> CellCost:
        """A cell at exit ``l`` runs (and its export keeps) the first ``l`` blocks."""
        return cost.replace(blocks=cell.layer)
