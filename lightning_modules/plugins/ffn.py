"""FFN: nested feed-forward width (MatFormer), one sampled width per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contracts.config_error import ConfigError
from lightning_modules.costs import Part
from lightning_modules.plugins.base import (ModelSidePlugin, PosthocConfig, check_posthoc, checked_ladder,
                                           ladder_probabilities)

if TYPE_CHECKING:
    from lightning_modules.backbone_adapter import Backbone, BackboneInfo
    from contracts.cells import Cell
    from lightning_modules.costs import CellCost


def default_widths(intermediate_size: int) -> list[int]:
    """``{I, I/2, I/4}`` of the intermediate size ``I`` (MatFormer's S/M/L-style granularities), descending."""
    return sorted({max(1, intermediate_size // factor) for factor in (1, 2, 4)}, reverse=True)


class NestedLinear(nn.Linear):
    """A feed-forward projection that uses only its first ``width`` hidden units: rows of an up projection
    (``nested="out"``), columns of a down projection (``nested="in"``). It keeps the parameters of the ``nn.Linear``
    it replaces (same names in the state dict), so checkpoints and optimizers see an ordinary layer."""

    def __init__(self, linear: nn.Linear, nested: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.nested = nested
        self.width = linear.out_features if nested == "out" else linear.in_features

    def forward(self, hidden: Tensor) -> Tensor:
        if self.nested == "out":
            return F.linear(hidden, self.weight[: self.width], None if self.bias is None else self.bias[: self.width])
        return F.linear(hidden, self.weight[:, : self.width], self.bias)

    def sliced(self, width: int) -> nn.Linear:
        """A plain ``nn.Linear`` holding the first ``width`` units (a copy, for export)."""
        weight = self.weight[:width] if self.nested == "out" else self.weight[:, :width]
        bias = None if self.bias is None else (self.bias[:width] if self.nested == "out" else self.bias)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear

    def shape_at(self, width: int) -> tuple[int, int]:
        """``(weight entries, bias entries)`` of the projection cut to ``width`` units."""
        rows, columns = (width, self.in_features) if self.nested == "out" else (self.out_features, width)
        return rows * columns, 0 if self.bias is None else rows

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nested={self.nested}, width={self.width}"


def feed_forward_projections(model: nn.Module, intermediate_size: int) -> list[tuple[str, nn.Linear, str]]:
    """``(name, linear, "out" | "in")`` of every projection into (``out``) or out of (``in``) the ``intermediate_size``
    hidden units of a block's feed-forward layer: BERT's ``intermediate.dense`` / ``output.dense``, Qwen3's
    ``gate_proj`` + ``up_proj`` / ``down_proj``. Attention projections never have that size in both models."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layer" in f".{name}":
            if module.out_features == intermediate_size and module.in_features != intermediate_size:
                found.append((name, module, "out"))
            elif module.in_features == intermediate_size and module.out_features != intermediate_size:
                found.append((name, module, "in"))
    return found


@dataclass
class FFNConfig(PosthocConfig):
    """``posthoc: true``: train the full width only and slice the narrower widths afterwards."""

    widths: list[int] | None = None
    """Nested feed-forward widths; default ``{I, I/2, I/4}`` of the backbone's intermediate size ``I``."""
    probabilities: list[float] | None = None
    """Sampling weight per entry of ``widths`` (normalised); default proportional to the width."""


class FFN(ModelSidePlugin):
    """Nests the hidden units of every block's feed-forward layer (MatFormer): width ``m`` uses the first ``m``
    units of the up projection (and of the gate, for gated MLPs) and the first ``m`` inputs of the down projection.

    One width per step, drawn with probability ∝ width from a generator seeded by (seed, step), like MEL's rank;
    views are tagged ``ffn=m``. The probe scores every width; ``make export CELL=.../ffn_m`` writes a plain Hugging
    Face model with ``intermediate_size = m``: smaller and faster, loadable without this project.

    Args:
        config: ``widths`` and ``probabilities`` (see :class:`FFNConfig`).
        info: the backbone's sizes; every width must be in ``[1, intermediate_size]``.
        seed: the run's seed, mixed with the step for width sampling.

    References:
        Devvrit et al., "MatFormer: Nested Transformer for Elastic Inference", 2023.

    With ``posthoc: true`` training computes the full width only (no sampling) and the narrower widths are the full
    model's projections sliced afterwards, for the probe and export.

    Example:
        ``plugins: {ffn: {widths: [1536, 768, 384]}}`` trains e5-small's full FFN, half and quarter.
    """

    Config = FFNConfig
    stage = 35
    tag = "ffn"

    def __init__(self, config: FFNConfig, info: BackboneInfo, seed: int) -> None:
        super().__init__(config, info, seed)
        full = info.intermediate_size
        widths = checked_ladder("widths", default_widths(full) if config.widths is None else list(config.widths),
                                full, "the backbone's intermediate_size", default_widths(full))
        check_posthoc(config, "probabilities", config.probabilities)
        if config.posthoc and full not in widths:
            raise ConfigError("widths", f"{widths} must include the full width {full} with posthoc: true (the width "
                                        f"training computes)")
        self.settings = sorted(widths, reverse=True)
        self.probabilities = ladder_probabilities("probabilities", config.probabilities, widths, self.settings)
        self.projections: list[NestedLinear] = []

    def setup(self, backbone: Backbone) -> None:
        found = feed_forward_projections(backbone.model, self.info.intermediate_size)
        if not any(nested == "in" for _, _, nested in found):
            raise ConfigError("widths", f"no feed-forward layer of size {self.info.intermediate_size} found in "
                              f"{type(backbone.model).__name__}")
        for name, linear, nested in found:
            projection = NestedLinear(linear, nested)
            backbone.model.set_submodule(name, projection)
            self.projections.append(projection)

    def current(self) -> int:
        return self.projections[0].width

    def set(self, width: int) -> None:
        for projection in self.projections:
            projection.width = width

    def export(self, model: nn.Module, width: int, mode: str) -> tuple[dict[str, str], dict[str, object]]:
        for name, module in list(model.named_modules()):
            if isinstance(module, NestedLinear):
                model.set_submodule(name, module.sliced(width))
        model.config.intermediate_size = width
        return {}, {}

    def untouched(self) -> int:
        """The backbone's own feed-forward width: a cell at it is not cut along this axis."""
        return self.info.intermediate_size

    def step_metrics(self) -> dict[str, float]:
        return {"ffn/width": float(self.current())}

    def cost(self, cell: Cell, cost: CellCost, mode: str) -> CellCost:
        """Each block's feed-forward projections at width ``m``: ``2 · weight entries`` FLOPs per token, weights plus
        biases as parameters (carved out of the block's full-width projections)."""
        return cost.carve_block_part(self.tag, self.block_part(self.info.intermediate_size),
                                     self.block_part(cell.tags.get(self.tag, self.settings[0])))

    def block_part(self, width: int) -> Part:
        """The feed-forward projections of one block cut to ``width`` (blocks are alike: the total over blocks)."""
        shapes = [projection.shape_at(width) for projection in self.projections]
        weights, biases = sum(w for w, _ in shapes), sum(b for _, b in shapes)
        blocks = self.info.num_layers
        return Part((weights + biases) // blocks, 2 * weights // blocks)

    def card_lines(self, cell: Cell) -> list[str]:
        return ["", "## Feed-forward width (MatFormer)", "",
                f"Every block keeps the first {cell.tags[self.tag]} of its {self.info.intermediate_size} feed-forward "
                f"units (`intermediate_size` in config.json; trained widths {self.trained_settings()})."]
