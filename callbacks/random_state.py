"""Every rank's global random generators in the checkpoint, restored on resume: dropout draws the same masks after a
resume as in an uninterrupted run.

The run's own random choices (data order, MEL's rank, ...) come from generators seeded by (seed, step) and need none
of this; the global generators are what dropout and any third-party code draw from, and they advance with every
forward."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

CHECKPOINT_KEY = "random_states"


def collect_random_state() -> dict[str, Any]:
    """This process's torch CPU and CUDA, numpy and Python generators, in types a ``weights_only`` load accepts
    (tensors, ints, floats, tuples: numpy's key array becomes an int64 tensor)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                      float(cached_gaussian)),
            "python": random.getstate()}


def restore_random_state(state: dict[str, Any]) -> None:
    """Sets the generators :func:`collect_random_state` described."""
    torch.set_rng_state(state["torch"])
    if state["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch.cuda"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RandomStateCheckpoint(L.Callback):
    """Saves one generator state per rank (gathered to the rank that writes the checkpoint) and gives each rank its
    own back when the first batch after a resume starts: later than that would miss its dropout masks, earlier would
    let the set-up (the data loader's iterator draws a base seed) advance them once more than the straight run did.

    A checkpoint from a different number of ranks, or from before this callback, resumes with the generators as
    seeded (the run goes on; its dropout masks differ from an uninterrupted run's)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = collect_random_state()
        if trainer.world_size > 1 and torch.distributed.is_initialized():  # every rank saves: a collective is safe
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint[CHECKPOINT_KEY] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get(CHECKPOINT_KEY)
        if states and len(states) == trainer.world_size:
            self.pending = states[trainer.global_rank]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.pending is not None:
            restore_random_state(self.pending)
            self.pending = None
