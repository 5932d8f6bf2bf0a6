"""Cross-device in-batch negatives on 2 gloo processes, every gather mode. ``python -m tests.distributed.gather_worker
OUT_DIR``: each rank encodes its slice of one global batch with a shared linear encoder and writes, per mode, its
loss terms, the gradient of every embedding row it owns and the DDP-averaged encoder gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from tests.distributed import spawn

QUERIES, NEGATIVES, WIDTH, TEMPERATURE = 8, 2, 8, 0.05  # global batch: 8 queries, 8 positives, 2 negatives each


def encoder() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(12, WIDTH)


def global_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, positives, negatives ``[QUERIES, NEGATIVES, 12]`` of the global batch."""
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(QUERIES, 12, generator=generator)
    positives = queries + 0.7 * torch.randn(QUERIES, 12, generator=generator)  # related, so the loss is not flat
    return queries, positives, torch.randn(QUERIES, NEGATIVES, 12, generator=generator)


def layout(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """The loss's batch layout: queries, positives, then each query's negatives."""
    return torch.cat([queries, positives, negatives.reshape(-1, negatives.shape[-1])])


def local_inputs(rank: int, world_size: int) -> torch.Tensor:
    rows = slice(rank * QUERIES // world_size, (rank + 1) * QUERIES // world_size)
    return layout(*(part[rows] for part in global_inputs()))


def worker(rank: int, world_size: int, out_dir: str) -> None:
    import torch.distributed as dist

    from lightning_modules.losses import ContrastiveLoss, gather_positives

    results = {}
    for mode in ("none", "local", "full"):
        for hard_negative in (True, False):
            model = encoder()
            embeddings = model(local_inputs(rank, world_size))
            embeddings.retain_grad()
            loss = ContrastiveLoss(TEMPERATURE, hard_negative=hard_negative, gather=mode)
            terms = loss(embeddings, QUERIES // world_size, NEGATIVES)
            sum(terms.values()).backward()
            for parameter in model.parameters():  # what DDP / FSDP do: average gradients over ranks
                dist.all_reduce(parameter.grad)
                parameter.grad /= world_size
            results[mode, hard_negative] = {
                "terms": {key: value.item() for key, value in terms.items()},
                "embedding_grad": embeddings.grad,
                "param_grads": {name: p.grad for name, p in model.named_parameters()},
            }
    _, offset = gather_positives(torch.zeros(QUERIES // world_size, WIDTH), "full")
    torch.save({"results": results, "offset": offset}, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    spawn(worker, sys.argv[1])
