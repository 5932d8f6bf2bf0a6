"""MRL: Matryoshka Representation Learning, nested output dimensions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_modules.plugins.base import MatryoshkaPlugin, PluginConfig, checked_ladder, checked_weights

if TYPE_CHECKING:
    from lightning_modules.backbone_adapter import BackboneInfo
    from contracts.cells import Cell
    from lightning_modules.costs import CellCost
    from lightning_modules.views import EmbeddingBundle, View


def default_dims(width: int) -> list[int]:
    """The paper's ladder, descending: ``{2^i : i = 3..14, 2^i < d} ∪ {d}``."""
    return sorted({2**i for i in range(3, 15) if 2**i < width} | {width}, reverse=True)


def default_weights(dims: list[int], width: int) -> list[float]:
    """The n-th dim in descending order gets ``1 / (n · sqrt(d / dim_n))``, not renormalised."""
    return [1.0 / (n * math.sqrt(width / dim)) for n, dim in enumerate(dims, start=1)]


@dataclass
class MRLConfig(PluginConfig):
    dims: list[int] | None = None
    """Nested widths; default: the paper's ladder for the model's hidden size."""
    weights: list[float] | None = None
    """One weight per entry of ``dims``; default: ``1 / (n · sqrt(d / dim_n))``."""


class MRL(MatryoshkaPlugin):
    """Every view becomes one view per width ``dim``: its first ``dim`` coordinates.

    All dims are used every step, from the same forward (a slice, not a copy). The loss re-normalises each
    truncation before the cosine. Weights ``w_n = 1 / (n · sqrt(d / dim_n))`` for the n-th dim in descending
    order; for d = 1024 that is 1.0, 0.3536, 0.1667, 0.0884, 0.0500, 0.0295, 0.0179, 0.0110.

    Args:
        config: ``dims`` and ``weights`` (see :class:`MRLConfig`).
        info: the backbone's sizes; every dim must be in ``[1, hidden_size]``.
        seed: unused (MRL has no randomness).

    References:
        Kusupati et al., "Matryoshka Representation Learning", NeurIPS 2022.
        Zhang et al., "ML-Embed: Inclusive and Efficient Embeddings for a Multilingual World", ICML 2026, §3.

    Example:
        ``plugins: {mrl: {dims: [384, 128, 32]}}`` in an experiment YAML trains widths 384, 128 and 32.
    """

    Config = MRLConfig
    stage = 10

    def __init__(self, config: MRLConfig, info: BackboneInfo, seed: int) -> None:
        super().__init__(config, info, seed)
        width = info.hidden_size
        dims = checked_ladder("dims", default_dims(width) if config.dims is None else list(config.dims),
                              width, "the model's hidden size", default_dims(width))
        self.dims = sorted(dims, reverse=True)
        explicit = checked_weights("weights", config.weights, dims)
        self.weights = default_weights(self.dims, width) if explicit is None else [explicit[d] for d in self.dims]

    def expand(self, views: list[View], bundle: EmbeddingBundle) -> list[View]:
        return [
            view.derive(embeddings=view.embeddings[:, :dim], weight_factor=weight, dim=dim)
            for view in views
            for dim, weight in zip(self.dims, self.weights)
        ]

    def cost(self, cell: Cell, cost: CellCost, mode: str) -> CellCost:
        """A stored vector keeps the first ``dim`` coordinates (the encoder's cost is unchanged)."""
        return cost.replace(width=cell.dim)
