"""Encode probe texts ONCE per model-side setting and keep every cell of the grid as a slice of that one encoding.

One forward per text gives every MLL exit (``bundle.layer(l)``); the plugins' ``expand`` turns the bundle into
the tagged views training uses (``layer_4/dim_64/rank_128``, plus any axis a new plugin adds). MRL views are
prefix slices of their exit, so the cache stores one matrix per distinct tensor storage (one per exit) and a
cell is ``(source, width)``: slicing and re-normalising at lookup time gives every (layer, dim) cell.
Nothing here imports mteb (it reseeds the global RNGs on import).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from contracts.batch_layout import pack, pad
from contracts.cells import Cell
from lightning_modules.views import View


@dataclass(frozen=True)
class Slot:
    """Where a cell's embeddings lie in the cache: the first ``width`` coordinates of stored matrix ``source``."""

    source: int
    width: int


def split_views(views: Sequence[View], num_layers: int) -> tuple[list[Cell], list[Slot], list[Tensor]]:
    """``(cells, slots, sources)`` of one batch's views: views that are prefix slices of one tensor (same storage
    start and strides, e.g. MRL dims of one exit) share a source, the widest of them."""
    sources: list[Tensor] = []
    by_storage: dict[tuple, int] = {}
    cells, slots = [], []
    for view in views:
        embeddings = view.embeddings
        storage = (embeddings.data_ptr(), embeddings.stride())
        if storage not in by_storage:
            by_storage[storage] = len(sources)
            sources.append(embeddings)
        source = by_storage[storage]
        if embeddings.shape[1] > sources[source].shape[1]:
            sources[source] = embeddings
        cells.append(view.cell(num_layers))
        slots.append(Slot(source, embeddings.shape[1]))
    return cells, slots, sources


class CellEmbeddings:
    """Embeddings of texts for every cell, one matrix per source; rows are looked up by text.

    Example:
        >>> cache = CellEmbeddings()
        >>> cache.add(["a", "b"], [Cell({"layer": 1, "dim": 2}, 8)], [Slot(0, 2)], [torch.eye(2)])
        >>> cache.lookup(["b"], 0).tolist()
        [[0.0, 1.0]]
    """

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.cells: list[Cell] = []
        self.slots: list[Slot] = []
        self._chunks: list[list[Tensor]] = []
        self._matrices: list[Tensor] = []

    def add(self, texts: Sequence[str], cells: list[Cell], slots: list[Slot], sources: Sequence[Tensor]) -> None:
        """Rows ``sources[s][i]`` belong to ``texts[i]``; ``cells`` must match those of earlier additions."""
        if not self.cells:
            self.cells, self.slots = cells, slots
            self._chunks = [[] for _ in sources]
        elif [cell.name for cell in cells] != [cell.name for cell in self.cells]:
            raise RuntimeError("the plugins produced a different set of views for another batch of probe texts")
        offset = len(self.index)
        for i, text in enumerate(texts):
            self.index[text] = offset + i
        for chunks, matrix in zip(self._chunks, sources):
            chunks.append(matrix.detach().float().cpu())
        self._matrices = []

    def lookup(self, texts: Sequence[str], cell: int) -> Tensor:
        """L2-normalised ``[len(texts), width]`` embeddings of cell number ``cell`` (the truncation is re-normalised,
        as in training)."""
        if not self._matrices:
            self._matrices = [torch.cat(chunks) for chunks in self._chunks]
        rows = torch.tensor([self.index[text] for text in texts], dtype=torch.long)
        slot = self.slots[cell]
        return F.normalize(self._matrices[slot.source][rows, : slot.width], dim=-1)

    def __contains__(self, text: str) -> bool:
        return text in self.index


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count inside; the previous one on exit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GridEncoder:
    """Encodes missing texts with one forward each, on every device together, into a :class:`CellEmbeddings`.

    Under DDP/FSDP2 :meth:`encode_missing` is collective: every device computes the same list of missing texts,
    encodes a strided shard of it (padded so that every device runs the same number of batches, which FSDP2's
    per-forward all-gathers need) and the shards are all-gathered. The module must already be in eval mode
    under ``torch.no_grad`` at the model-side setting to encode (see :class:`~evaluation.scoring.Prober`).

    When the run packs its batches (``tokenize.packing``, ``data.packing``) each forward is packed too
    (:func:`contracts.batch_layout.pack`): every batch then takes texts of all lengths (strided over the
    longest-first list), so that they fill the packed rows (quickstart probe: 4 % of the token positions are
    padding, 42 % in length-sorted padded batches). The embeddings equal the padded ones up to float rounding.

    Args:
        module: the :class:`~lightning_modules.module.MatryoshkaEmbedder`.
        tokenize: a :class:`~datamodules.tokenization.BatchTokenizer` (token ids, pad id and ``packing``).
        batch_size: texts per forward on each device.
        device: where the module's inputs go.
        forward_context: e.g. the Trainer's precision context (autocast), so probes see training's numerics.
    """

    def __init__(self, module, tokenize, batch_size: int, device: torch.device,
                 forward_context: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.module, self.tokenize, self.batch_size = module, tokenize, batch_size
        self.device, self.forward_context = device, forward_context
        self.packing = tokenize.packing
        self.cache = CellEmbeddings()
        self.encoded = 0  # texts this device ran through the backbone (padding included)
        self.threads = torch.get_num_threads()  # forwards keep these even when scoring runs single-threaded

    def _forward(self, texts: list[str]) -> tuple[list[Cell], list[Slot], list[Tensor]]:
        token_ids = self.tokenize.token_ids(texts)
        batch = pack(token_ids, self.tokenize.pad_id) if self.packing else pad(token_ids, self.tokenize.pad_id)
        packing = batch.get("packing")
        if packing is not None:
            packing = {key: value.to(self.device) if isinstance(value, Tensor) else value
                       for key, value in packing.items()}
        with self.forward_context():
            views = self.module.forward_views(batch["input_ids"].to(self.device),
                                              batch["attention_mask"].to(self.device), packing)
            return split_views(views, self.module.backbone.info.num_layers)

    def _batches(self, count: int) -> list[list[int]]:
        """Indices of each forward's texts among ``count`` texts sorted longest first: consecutive (texts of
        similar length, little padding) for padded batches, strided (all lengths, full rows) for packed ones.
        Either way ``ceil(count / batch_size)`` forwards, the same number on every device."""
        batches = -(-count // self.batch_size)
        if self.packing:
            return [list(range(start, count, batches)) for start in range(batches)]
        return [list(range(start, min(start + self.batch_size, count))) for start in range(0, count, self.batch_size)]

    def encode_missing(self, texts: Sequence[str]) -> None:
        """Encodes the texts not yet cached (collective under a process group: call it on every device)."""
        missing = sorted({text for text in texts if text not in self.cache}, key=lambda text: (-len(text), text))
        if not missing:
            return
        rank, world_size = world()
        # Longest first, so that batches can be cut by length; strided shards keep that order.
        padded = missing + missing[-1:] * (-len(missing) % world_size)
        mine = padded[rank::world_size]
        batches = self._batches(len(mine))
        chunks: list[list[Tensor]] = []
        with intra_op_threads(self.threads):
            for batch in batches:
                cells, slots, sources = self._forward([mine[i] for i in batch])
                chunks = chunks or [[] for _ in sources]
                for chunk, source in zip(chunks, sources):
                    chunk.append(source.float())
        self.encoded += len(mine)
        order = torch.tensor([i for batch in batches for i in batch], device=chunks[0][0].device)
        sources = [torch.empty_like(rows).index_copy_(0, order, rows) for rows in map(torch.cat, chunks)]
        if world_size > 1:
            sources = [_interleave_gather(source, world_size) for source in sources]
        self.cache.add(missing, cells, slots, [source[: len(missing)] for source in sources])


def _interleave_gather(local: Tensor, world_size: int) -> Tensor:
    """Rows of every device's strided shard back in the original order (row i of device r is item i·W + r)."""
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, local.contiguous())
    return torch.stack(gathered, dim=1).reshape(-1, local.shape[1])
