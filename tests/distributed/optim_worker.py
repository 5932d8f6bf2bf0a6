"""bitsandbytes 8-bit AdamW on FSDP2 shards (2 gloo processes): a trajectory, then a distributed-checkpoint
save → load → continue. ``python -m tests.distributed.optim_worker OUT_DIR``; the test compares with one process."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from tests.distributed import spawn

STEPS, SAVE_AT = 6, 3
OPTIM = SimpleNamespace(name="adamw8bit", lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)


def make_model() -> nn.Sequential:
    # 128×64 weights: 4096 elements per rank's shard (bitsandbytes keeps tensors under 4096 elements in 32 bit),
    # 16 whole quantization blocks, so sharded blocks coincide with unsharded ones.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))


def batch(step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch of 16 rows for ``step``; this rank's equal slice."""
    generator = torch.Generator().manual_seed(1000 + step)
    inputs, targets = torch.randn(16, 64, generator=generator), torch.randn(16, 64, generator=generator)
    rows = slice(rank * 16 // world_size, (rank + 1) * 16 // world_size)
    return inputs[rows], targets[rows]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int = 0, world_size: int = 1) -> None:
    for step in steps:
        inputs, targets = batch(step, rank, world_size)
        nn.functional.mse_loss(model(inputs), targets).backward()  # FSDP2 averages gradients over ranks
        optimizer.step()
        optimizer.zero_grad()


def sharded(world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_modules.optim import build_optimizer

    model = make_model()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, build_optimizer(model, OPTIM)


def worker(rank: int, world_size: int, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from lightning_modules.optim import LocalShardOptimizer, optimizer_state_bytes

    out = Path(out_dir)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, optimizer = sharded(world_size)
    assert isinstance(optimizer, LocalShardOptimizer)
    train_steps(model, optimizer, range(SAVE_AT), rank, world_size)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=out / "checkpoint")
    train_steps(model, optimizer, range(SAVE_AT, STEPS), rank, world_size)
    straight = get_model_state_dict(model, options=full)
    local_bytes = optimizer_state_bytes(optimizer)
    uint8_states = sum(s["state1"].dtype == torch.uint8 for s in optimizer.state.values())

    model, optimizer = sharded(world_size)  # a fresh process's view: new model, new optimizer, then resume
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=out / "checkpoint")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    train_steps(model, optimizer, range(SAVE_AT, STEPS), rank, world_size)
    resumed = get_model_state_dict(model, options=full)
    local_shapes = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
    torch.save({"straight": straight, "resumed": resumed, "state_bytes": local_bytes, "uint8_states": uint8_states,
                "local_shapes": local_shapes}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    spawn(worker, sys.argv[1])
