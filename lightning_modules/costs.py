"""What a deployable cell costs, composed from the plugins alone: parameters, encoder FLOPs per token, bytes per vector.

The core describes the full trained network (:func:`full_cost`); each plugin's
:meth:`~lightning_modules.plugins.base.MatryoshkaPlugin.cost` hook then says what its setting of a cell changes
(MLL: blocks run; MEL: the token embedding at rank r; FFN: the feed-forward part of every block; MRL: the stored
width; precision: the bits per coordinate), in plugin order (:func:`cell_cost`). A new axis brings its cost with it.

FLOPs per token of the encoder (one forward, multiply and add counted apart, as in Kaplan et al. 2020)::

    flops/token = Σ_model-wide parts + blocks · Σ_block parts
    linear layer:        2 · (weight entries)          (biases, norms, activations, softmax: not counted)
    attention scores:    4 · n_ctx · d_attn per block  (q·kᵀ and the weighted sum of v, full attention over n_ctx)
    token lookup:        0 (a gather); MEL's factors U[ids, :r] · V[:r]: 2 · r · d

``n_ctx`` is the context a cost is quoted for (the run's ``model.max_length`` by default). Pooling, truncation and
normalisation after the encoder are not counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from contracts.cells import Cell, vector_bytes

TOKEN_EMBEDDING = "token_embedding"
REST = "rest"
"""The part of the model (or of a block) no axis has claimed: carved parts are taken out of it."""
COSTS = ("params", "flops", "bytes", "latency_ms")
"""The cost keys every tool uses (frontier columns, ``make pick`` budgets): parameters of the exported model, encoder
FLOPs per token, bytes per stored vector, measured encode latency (ms per 1,000 texts)."""


@dataclass(frozen=True)
class Part:
    """One part of the network: its parameters and the FLOPs it spends per token."""

    parameters: int
    flops_per_token: int

    def __sub__(self, other: Part) -> Part:
        return Part(self.parameters - other.parameters, self.flops_per_token - other.flops_per_token)


@dataclass(frozen=True)
class CellCost:
    """The analytic cost of one cell, as the plugins' hooks leave it.

    Args:
        model_parts: parts counted once (``token_embedding``, ``rest``: position embeddings, norms, ...).
        block_parts: parts of one transformer block (``rest``, and what an axis carves out, e.g. ``ffn``).
        blocks: blocks the cell runs (MLL sets it).
        width: coordinates stored per vector (MRL sets it).
        bits_per_value: bits per stored coordinate (precision sets it).
    """

    model_parts: dict[str, Part]
    block_parts: dict[str, Part]
    blocks: int
    width: int
    bits_per_value: int = 32

    @property
    def parameters(self) -> int:
        return sum(part.parameters for part in self.model_parts.values()) + self.blocks * sum(
            part.parameters for part in self.block_parts.values())

    @property
    def flops_per_token(self) -> int:
        return sum(part.flops_per_token for part in self.model_parts.values()) + self.blocks * sum(
            part.flops_per_token for part in self.block_parts.values())

    @property
    def bytes_per_vector(self) -> int:
        return vector_bytes(self.width, self.bits_per_value)

    def with_model_part(self, name: str, part: Part) -> CellCost:
        """The cost with the model-wide part ``name`` replaced (MEL: the token embedding at its rank)."""
        return dataclasses.replace(self, model_parts={**self.model_parts, name: part})

    def carve_block_part(self, name: str, full: Part, kept: Part) -> CellCost:
        """The cost with ``full`` (a part of every block, at the full setting) taken out of the block's ``rest`` and
        ``kept`` counted as the part ``name`` instead (FFN: the projections at width m)."""
        return dataclasses.replace(self, block_parts={**self.block_parts, REST: self.block_parts[REST] - full,
                                                      name: kept})

    def replace(self, **changes) -> CellCost:
        """The cost with fields replaced (``blocks=``, ``width=``, ``bits_per_value=``)."""
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict[str, int]:
        """``{params, flops, bytes}`` (the keys of :data:`COSTS`)."""
        return {"params": self.parameters, "flops": self.flops_per_token, "bytes": self.bytes_per_vector}


def block_list(model: nn.Module) -> str:
    """The name of the one ``ModuleList`` with one entry per transformer block (``encoder.layer``, ``layers``)."""
    depth = model.config.num_hidden_layers
    found = [name for name, child in model.named_modules() if isinstance(child, nn.ModuleList) and len(child) == depth]
    if len(found) != 1:
        raise ValueError(f"cannot find the block list of {type(model).__name__} (ModuleLists of length {depth}: "
                         f"{found})")
    return found[0]


def linear_flops(module: nn.Module) -> int:
    """``2 · weight entries`` of every ``nn.Linear`` in ``module``: its matmul FLOPs per token."""
    return 2 * sum(child.weight.numel() for child in module.modules() if isinstance(child, nn.Linear))


def attention_width(config) -> int:
    """``heads · head_dim`` of the model's attention (the hidden size unless the config says otherwise)."""
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def full_cost(model: nn.Module, context: int) -> CellCost:
    """The full trained network as a :class:`CellCost`, before any axis: every block, the token embedding module
    the model holds (a plain lookup: an axis that replaced it, MEL, states its own cost), the hidden size stored as
    float32.

    Args:
        model: the Hugging Face base model (``backbone.model``).
        context: ``n_ctx`` of the attention term (tokens per text).
    """
    blocks = model.get_submodule(block_list(model))
    sizes = {sum(p.numel() for p in block.parameters()) for block in blocks}
    if len(sizes) != 1:
        raise ValueError(f"blocks of {type(model).__name__} differ in size ({sorted(sizes)}); costs assume equal "
                         f"blocks")
    block = blocks[0]
    block_part = Part(sizes.pop(), linear_flops(block) + 4 * context * attention_width(model.config))
    embedding = Part(sum(p.numel() for p in model.get_input_embeddings().parameters()), 0)
    total = sum(p.numel() for p in model.parameters())
    rest = Part(total - embedding.parameters - len(blocks) * block_part.parameters, 0)
    return CellCost({TOKEN_EMBEDDING: embedding, REST: rest}, {REST: block_part}, len(blocks),
                    model.config.hidden_size)


def cell_cost(module, cell: Cell, context: int, mode: str = "compat") -> CellCost:
    """The cost of ``cell`` of a trained :class:`~lightning_modules.module.MatryoshkaEmbedder`: :func:`full_cost`,
    then every plugin's ``cost`` hook in plugin order.

    Args:
        module: the trained module.
        cell: one of ``module.cells()``.
        context: ``n_ctx`` of the attention term (the tools pass the run's ``model.max_length``).
        mode: the export mode the parameters are counted for (``compat``: MEL's merged matrix; ``factorized``:
            its two factors).
    """
    cost = full_cost(module.backbone.model, context)
    for plugin in module.plugins:
        cost = plugin.cost(cell, cost, mode)
    return cost
