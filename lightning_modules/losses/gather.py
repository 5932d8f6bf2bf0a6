"""Cross-device gathering of in-batch positives, with the gradient policy as a switch."""

from __future__ import annotations

import typing

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor

from lightning_modules.config import GatherMode

GATHER_MODES = typing.get_args(GatherMode)


def gather_positives(passages: Tensor, mode: str) -> tuple[Tensor, int]:
    """All devices' positives, concatenated in rank order, and this device's row offset into them.

    Args:
        passages: this device's ``[batch, width]`` positives.
        mode: ``none`` — the gathered tensor carries no gradient (the reference implementation: remote and local
            positives learn nothing from other devices' queries); ``local`` — this device's slice keeps its
            gradient; ``full`` — autograd all-gather, every positive gets the gradient of every query.

    Returns:
        ``(global_passages, offset)``; query ``i`` of this device has its positive at row ``offset + i``.
        Without an initialised process group (one device) the input comes back unchanged with offset 0.
    """
    if mode not in GATHER_MODES:
        raise ValueError(f"gather mode {mode!r}; allowed: {', '.join(GATHER_MODES)}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return passages, 0
    rank, world = dist.get_rank(), dist.get_world_size()
    offset = rank * passages.shape[0]
    if mode == "full":
        return ContiguousGradient.apply(torch.cat(dist_nn.all_gather(passages), dim=0)), offset
    gathered = [torch.empty_like(passages) for _ in range(world)]
    dist.all_gather(gathered, passages.detach().contiguous())
    if mode == "local":
        gathered[rank] = passages
    return torch.cat(gathered, dim=0), offset


class ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. The autograd all-gather's backward hands its
    gradient chunks to an all-to-all that reads them as dense memory: a strided gradient (the gathered positives
    used through a permutation, as the stacked-views loss does) would be silently scrambled."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient: Tensor) -> Tensor:
        return gradient.contiguous()
