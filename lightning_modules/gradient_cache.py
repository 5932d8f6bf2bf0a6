"""Gradient caching: a contrastive batch larger than activation memory allows, with the full batch's gradients.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (RepL4NLP 2021). The loss of
a contrastive batch couples every text with every other one, so it cannot be split into independent micro-batches;
but it depends on the backbone only through the pooled embeddings. One step:

1. embed the batch chunk by chunk without a graph, keeping only the pooled embedding at every exit the views read
   (under the step's model-side setting: MEL's rank, the FFN width), and each chunk's RNG state;
2. compute every view's loss terms on those cached embeddings (hard negatives, in-batch with any ``gather`` mode,
   distillation: exactly the uncached code) and back-propagate to the embeddings;
3. re-run each chunk with a graph, replaying its RNG state (the same dropout masks), and back-propagate the cached
   embedding gradients through it. Parameter gradients add up over chunks to the full batch's.

Activation memory is one chunk's; the price is one more forward per step. Under DDP and FSDP2 gradients are reduced
once, after the last chunk: the last chunk's backward is the one Lightning runs on the tensor ``training_step``
returns (DDP arms its reduction hooks only then; FSDP2's reduction is paused for the earlier chunks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_modules.views import EmbeddingBundle


@dataclass(frozen=True)
class Chunk:
    """Whole texts of a batch embedded in one forward: their model inputs and their rows in the batch's text order."""

    input_ids: Tensor
    attention_mask: Tensor
    packing: dict | None
    texts: Tensor
    """``[texts]`` indices into the batch's texts (queries, passages, negatives), in the order the chunk pools them."""


def chunks_of(batch: dict, chunk_size: int) -> list[Chunk]:
    """The batch cut into chunks of at most ``chunk_size`` texts. A padded batch: consecutive rows. A packed batch
    (``batch["packing"]``): consecutive packed rows, as many as keep the chunk within ``chunk_size`` texts (a row is
    never split: it always holds whole texts, so a single row with more texts makes a larger chunk)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if batch.get("packing") is None:
        return [Chunk(input_ids[start:start + chunk_size], attention_mask[start:start + chunk_size], None,
                      torch.arange(start, min(start + chunk_size, len(input_ids)), device=input_ids.device))
                for start in range(0, len(input_ids), chunk_size)]
    packing = batch["packing"]
    sequence_ids = packing["sequence_ids"]
    texts_per_row = [len(row[row >= 0].unique()) for row in sequence_ids.cpu()]
    chunks, start = [], 0
    while start < len(texts_per_row):
        stop, count = start + 1, texts_per_row[start]
        while stop < len(texts_per_row) and count + texts_per_row[stop] <= chunk_size:
            count += texts_per_row[stop]
            stop += 1
        chunks.append(packed_rows(input_ids, attention_mask, packing, start, stop))
        start = stop
    return chunks


def packed_rows(input_ids: Tensor, attention_mask: Tensor, packing: dict, start: int, stop: int) -> Chunk:
    """Rows ``start:stop`` of a packed batch as a packed batch of their own (texts renumbered 0…n-1 in index order,
    last-token indices and segment boundaries relative to the first row)."""
    width = input_ids.shape[1]
    sequence_ids = packing["sequence_ids"][start:stop]
    texts = sequence_ids[sequence_ids >= 0].unique()  # sorted
    local_ids = torch.where(sequence_ids >= 0, torch.searchsorted(texts, sequence_ids.clamp_min(0)), -1)
    boundaries = packing["cu_seqlens"]
    inside = (boundaries >= start * width) & (boundaries <= stop * width)
    layout = {"position_ids": packing["position_ids"][start:stop], "sequence_ids": local_ids,
              "last_index": packing["last_index"][texts] - start * width,
              "cu_seqlens": (boundaries[inside] - start * width).to(boundaries.dtype),
              "max_length": packing["max_length"]}
    return Chunk(input_ids[start:stop], attention_mask[start:stop], layout, texts)


@contextmanager
def replayed_rng(state: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
    """Inside: the CPU (and ``device``'s CUDA) generator at ``state``, as :func:`rng_state` saved it; after: as before,
    so the step's randomness advances exactly as in the pass without a graph."""
    cpu_state, cuda_state = state
    with torch.random.fork_rng(devices=[device] if cuda_state is not None else [], device_type="cuda"):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def gradient_sync_paused(module: nn.Module) -> Iterator[None]:
    """FSDP2 modules accumulate gradients without reducing them inside; other modules are left alone (DDP reduces
    in the backward of the tensor ``training_step`` returns, after its forward armed the hooks; backward passes run
    inside ``training_step`` accumulate locally)."""
    sharded = hasattr(module, "set_requires_gradient_sync")  # torch.distributed.fsdp.FSDPModule
    if sharded:
        module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        if sharded:
            module.set_requires_gradient_sync(True)


class GradientCache:
    """The cached training step of :class:`~lightning_modules.module.MatryoshkaEmbedder` (``loss.cache_chunk_size``).

    Args:
        chunk_size: texts per chunk (see :func:`chunks_of`).
    """

    def __init__(self, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"cache chunk size {chunk_size} must be >= 1")
        self.chunk_size = chunk_size

    def step(self, model, batch: dict, step: int):
        """``(views, view_terms, loss)`` of one batch, as the uncached step computes them, after every chunk but the
        last has back-propagated into the parameters' gradients. ``loss`` has the total loss's value; its backward
        (run by Lightning) back-propagates the last chunk, which completes the full batch's gradients.

        Args:
            model: the :class:`~lightning_modules.module.MatryoshkaEmbedder` (its backbone, plugins and losses).
        """
        backbone, device = model.backbone, batch["input_ids"].device
        for plugin in model.plugins:
            plugin.before_forward(step)
        chunks = chunks_of(batch, self.chunk_size)
        states, pooled, exits = [], [], None
        with torch.no_grad():
            for chunk in chunks:
                states.append(rng_state(device))
                bundle = backbone(chunk.input_ids, chunk.attention_mask, chunk.packing)
                if exits is None:
                    model.expand(bundle)  # reads exactly the exits the plugins' views use
                    exits = bundle.exits_read()
                pooled.append({layer: bundle.layer(layer) for layer in exits})
        num_texts = sum(len(chunk.texts) for chunk in chunks)
        cached = {}
        for layer in exits:
            rows = torch.cat([chunk_pooled[layer] for chunk_pooled in pooled])
            order = torch.cat([chunk.texts for chunk in chunks])
            cached[layer] = rows.new_empty(num_texts, rows.shape[-1]).index_copy_(0, order, rows).requires_grad_()
        views = model.expand(EmbeddingBundle.of_pooled(cached, backbone.info.num_layers))
        view_terms = model.view_losses(views, batch)
        total = model.weighted_total(views, view_terms)
        total.backward()
        gradients = {layer: embeddings.grad for layer, embeddings in cached.items()}
        last = None
        for index, (chunk, state) in enumerate(zip(chunks, states)):
            with replayed_rng(state, device):
                bundle = backbone(chunk.input_ids, chunk.attention_mask, chunk.packing)
            # Σ embedding · cached gradient: its gradient with respect to the embeddings is the cached one, exactly.
            surrogate = sum((bundle.layer(layer) * gradients[layer][chunk.texts]).sum() for layer in exits)
            if index < len(chunks) - 1:
                with gradient_sync_paused(backbone):
                    surrogate.backward()
            else:
                last = surrogate
        return views, view_terms, total.detach() + (last - last.detach())
