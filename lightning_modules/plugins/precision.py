"""Precision: nested quantization of the output embedding, float32 → int8 → binary."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from contracts.cells import vector_bytes
from contracts.config_error import ConfigError
from lightning_modules.plugins.base import MatryoshkaPlugin, PosthocConfig, check_posthoc, checked_weights

if TYPE_CHECKING:
    from lightning_modules.backbone_adapter import BackboneInfo
    from contracts.cells import Cell
    from lightning_modules.costs import CellCost
    from lightning_modules.views import EmbeddingBundle, View


def int8(embeddings: Tensor) -> Tensor:
    """Symmetric per-vector int8: ``round(x / s) · s`` with ``s = max|x| / 127``. The cosine ignores ``s``, so a
    stored vector is its 8-bit codes alone."""
    scale = embeddings.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(embeddings / scale) * scale


def binary(embeddings: Tensor) -> Tensor:
    """Sign bits (0 counts as +), scaled to the input's norm so the straight-through gradient keeps the float
    view's scale. Cosine of sign vectors ranks like Hamming distance of the packed bits."""
    signs = torch.where(embeddings >= 0, 1.0, -1.0).to(embeddings.dtype)
    return signs * embeddings.norm(dim=-1, keepdim=True) / embeddings.shape[-1] ** 0.5


def identity_gradient(embeddings: Tensor, quantized: Tensor) -> Tensor:
    """Forward: ``quantized``; backward: the identity (straight-through)."""
    return embeddings + (quantized - embeddings).detach()


def clipped_gradient(embeddings: Tensor, quantized: Tensor) -> Tensor:
    """Forward: ``quantized``; backward: the gradient of the coordinates within one RMS of zero only (the
    hard-tanh estimator of binarized networks). Those are the bits a step can flip; pulling on the others only
    moves the float embedding."""
    rms = embeddings.detach().norm(dim=-1, keepdim=True) / embeddings.shape[-1] ** 0.5
    return quantized.detach() + (embeddings - embeddings.detach()) * (embeddings.detach().abs() <= rms)


# The stored vectors the probe scores, in numpy (the model card of an exported cell shows it; a test executes it).
QUANTIZE_SNIPPET = """\
import numpy as np

e = model.encode_document(texts)  # float32, L2-normalised: [n, dim]
codes = np.round(127 * e / np.abs(e).max(axis=1, keepdims=True)).astype(np.int8)  # int8: compare by cosine
bits = np.packbits(e >= 0, axis=1)  # binary: rank by Hamming distance (bitwise XOR, then count the ones)"""

# level -> (quantizer, or None for the float view itself; bits per stored value)
LEVELS = {"fp32": (None, 32), "int8": (int8, 8), "binary": (binary, 1)}
BINARY_GRADIENTS = {"clipped": clipped_gradient, "identity": identity_gradient}


@dataclass
class PrecisionConfig(PosthocConfig):
    """``posthoc: true``: train the float view only and quantize afterwards (``weights`` 1 for fp32, 0 for the rest)."""

    levels: list[str] = field(default_factory=lambda: list(LEVELS))
    """Storage precisions to train, each of ``fp32``, ``int8``, ``binary``."""
    weights: list[float] | None = None
    """One weight per entry of ``levels``; default 1.0 each. A zero weight probes a level without training it."""
    binary_gradient: str = "clipped"
    """Straight-through estimator of the sign: ``clipped`` (only coordinates within one RMS of zero get a gradient)
    or ``identity`` (every coordinate). int8 always uses the identity: rounding moves a value by half a step."""
    min_bytes: int = 4
    """Quantized views storing fewer bytes per vector than this are probed but not trained (weight 0). The default
    keeps the 8- and 16-d binary codes (1 and 2 bytes, near chance) out of the loss, which lifts the other binary
    cells (360 steps, 3 seeds: 39 of 42 binary cells above quantizing afterwards, against 33 when every code
    trains); 0 trains every view."""


class Precision(MatryoshkaPlugin):
    """Every view becomes one view per storage precision, tagged ``precision=<fp32|int8|binary>``.

    ``int8`` rounds each vector to 255 symmetric levels of its largest coordinate; ``binary`` keeps its signs. The
    forward uses the quantized values and the backward passes gradients straight through (STE; for binary only
    to coordinates near zero, whose bits can flip), so the model learns embeddings that survive quantization. Runs after MRL (stage 40 > 10): each width is quantized on its
    own. Storage per vector: ``dim · bits / 8`` bytes (384-d: 1536 / 384 / 48 bytes; 64-d binary: 8 bytes),
    reported per probe cell.

    Args:
        config: ``levels``, ``weights``, ``binary_gradient`` and ``min_bytes`` (see :class:`PrecisionConfig`).
        info: unused (every width can be quantized).
        seed: unused (no randomness).

    References:
        Bengio et al., "Estimating or Propagating Gradients Through Stochastic Neurons", 2013 (straight-through).
        Shakir et al., "Binary and Scalar Embedding Quantization", Hugging Face blog, 2024.

    Example:
        ``plugins: {precision: {levels: [fp32, binary], weights: [1.0, 0.5]}}`` trains float and 1-bit views.
    """

    Config = PrecisionConfig
    stage = 40

    def __init__(self, config: PrecisionConfig, info: BackboneInfo, seed: int) -> None:
        super().__init__(config, info, seed)
        unknown = [level for level in config.levels if level not in LEVELS]
        if not config.levels or unknown:
            raise ConfigError("levels", f"{unknown or config.levels} not allowed: choose one or more of "
                              f"{', '.join(LEVELS)}")
        if len(set(config.levels)) != len(config.levels):
            raise ConfigError("levels", f"{config.levels} has repeated values; each may appear once")
        self.levels = list(config.levels)
        if config.binary_gradient not in BINARY_GRADIENTS:
            raise ConfigError("binary_gradient", f"{config.binary_gradient!r} not allowed: choose one of "
                              f"{', '.join(BINARY_GRADIENTS)}")
        self.estimators = {"int8": identity_gradient, "binary": BINARY_GRADIENTS[config.binary_gradient]}
        if config.min_bytes < 0:
            raise ConfigError("min_bytes", f"{config.min_bytes} must be >= 0 (bytes per stored vector)")
        self.min_bytes = config.min_bytes
        check_posthoc(config, "weights", config.weights)
        if config.posthoc and "fp32" not in self.levels:
            raise ConfigError("posthoc", f"needs fp32 among the levels {self.levels}: it is the view training computes")
        explicit = checked_weights("weights", config.weights, self.levels)
        if config.posthoc:
            explicit = {level: float(level == "fp32") for level in self.levels}
        self.weights = [1.0] * len(self.levels) if explicit is None else [explicit[level] for level in self.levels]

    def expand(self, views: list[View], bundle: EmbeddingBundle) -> list[View]:
        nested = []
        for view in views:
            for level, weight in zip(self.levels, self.weights):
                quantize, bits = LEVELS[level]
                embeddings = (None if quantize is None
                              else self.estimators[level](view.embeddings, quantize(view.embeddings)))
                derived = view.derive(embeddings=embeddings, weight_factor=weight, bits_per_value=bits,
                                      precision=level)
                if quantize is not None and derived.bytes_per_vector < self.min_bytes:
                    derived = replace(derived, weight=0.0)  # probed, not trained
                nested.append(derived)
        return nested

    def cost(self, cell: Cell, cost: CellCost, mode: str) -> CellCost:
        """A stored coordinate takes the level's bits (fp32 32, int8 8, binary 1)."""
        return cost.replace(bits_per_value=LEVELS[cell.tags.get("precision", "fp32")][1])  # untagged: float

    def full_settings(self) -> dict[str, object]:
        """float32 storage is the embedding not quantized: ``layer_4/dim_64`` rather than ``.../precision_fp32``."""
        return {"precision": "fp32"}

    def posthoc_settings(self) -> list[str]:
        return [level for level, weight in zip(self.levels, self.weights) if weight == 0]

    def card_lines(self, cell: Cell) -> list[str]:
        rows = [f"| {level} | {weight:g} | {vector_bytes(cell.dim, LEVELS[level][1])} |"
                for level, weight in zip(self.levels, self.weights)]
        return ["", "## Storing int8 or binary vectors", "",
                "The run has the precision axis: a level with a non-zero loss weight was trained on its quantized "
                "vectors (straight-through gradients), one with weight 0 only probed"
                + (f", as were codes under {self.min_bytes} bytes" if self.min_bytes else "")
                + ". The probe scores below are labelled by precision.", "",
                "| precision | loss weight | bytes per vector |", "|---|---|---|", *rows, "",
                "The stored vectors the probe scored (int8: per vector, 255 symmetric levels of its largest "
                "coordinate; binary: the sign bits):", "", "```python", QUANTIZE_SNIPPET, "```"]
