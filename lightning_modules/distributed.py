"""Multi-device training on Lightning's own engine: the strategy behind ``distributed.strategy``, FSDP2 sharding
of a backbone, activation checkpointing.

``fsdp2`` is ``torch.distributed.fsdp.fully_shard`` through Lightning's ``ModelParallelStrategy`` (Lightning's
``strategy="fsdp"`` is FSDP1 and refuses CPUs; FSDP2 runs on CPU with gloo, so it is tested with 2 CPU processes).
Multi-node runs use Lightning's usual launchers (torchrun, SLURM): see the README's "Scaling out".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from lightning_modules.backbone_adapter import Backbone


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: one data-parallel mesh dimension over every process
    (nodes × devices), no tensor parallelism. The LightningModule shards itself in ``configure_model`` with
    ``self.device_mesh["data_parallel"]``.

    Args:
        save_distributed_checkpoint: each rank writes its own shard (the checkpoint is a folder); ``False``
            gathers full weights and optimizer state into one file on rank 0.

    Example:
        >>> trainer = lightning.Trainer(strategy=FSDP2Strategy(), devices=8, num_nodes=2)
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        # The parent's "auto" sizes make a (nodes × devices-per-node) 2D mesh for FSDP × TP; we shard over all.
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """A sharded checkpoint is written into a sibling folder and swapped in whole
        (:func:`~lightning_modules.atomic_checkpoint.swap_in_folder`); a single-file one goes through the
        checkpoint IO (:class:`~lightning_modules.atomic_checkpoint.AtomicCheckpointIO`)."""
        from lightning.fabric.strategies.fsdp import _METADATA_FILENAME, _distributed_checkpoint_save

        from lightning_modules.atomic_checkpoint import CheckpointWriteError, new_sibling_folder, swap_in_folder

        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        written = path.with_name(f".{path.name}.new")
        try:
            if self.global_rank == 0:
                new_sibling_folder(path)
            self.barrier("checkpoint folder")
            state = {"state_dict": checkpoint.pop("state_dict"),
                     **{f"optimizer_{index}": optimizer_state
                        for index, optimizer_state in enumerate(checkpoint.pop("optimizer_states", []))}}
            _distributed_checkpoint_save(state, written)
            if self.global_rank == 0:
                torch.save(checkpoint, written / _METADATA_FILENAME)
            self.barrier("checkpoint written")
            if self.global_rank == 0:
                swap_in_folder(written, path)
            self.barrier("checkpoint swapped")
        except OSError as error:
            raise CheckpointWriteError(path, checkpoint.get("global_step"), error) from None


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` → ``bf16-mixed`` when training will run on a CUDA device that supports bf16, else ``32-true``."""
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_cuda and torch.cuda.is_bf16_supported() else "32-true"


def trainer_settings(strategy: str, precision: str, sharded_checkpoint: bool = True,
                     accelerator: str = "auto") -> dict[str, Any]:
    """``lightning.Trainer`` keyword arguments ``strategy`` and ``precision`` for the ``distributed`` section.

    Args:
        strategy: ``single`` | ``ddp`` | ``fsdp2``.
        precision: ``auto`` | ``32-true`` | ``bf16-mixed``.
        sharded_checkpoint: fsdp2 only, see :class:`FSDP2Strategy`.
        accelerator: the Trainer's ``accelerator`` (decides what ``auto`` precision means).
    """
    strategies = {"single": "auto", "ddp": "ddp", "fsdp2": None}
    if strategy not in strategies:
        raise ValueError(f"distributed strategy {strategy!r}; allowed: {', '.join(strategies)}")
    chosen = FSDP2Strategy(save_distributed_checkpoint=sharded_checkpoint) if strategy == "fsdp2" else strategies[strategy]
    return {"strategy": chosen, "precision": resolve_precision(precision, accelerator)}


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of a Hugging Face model's transformer blocks (``encoder.layer``, ``layers``, ...):
    the one whose length is ``config.num_hidden_layers``."""
    depth = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise ValueError(f"{type(model).__name__} has no ModuleList of its {depth} transformer blocks to shard")


def shard_backbone(backbone: Backbone, mesh: DeviceMesh, bf16: bool = False) -> None:
    """FSDP2 units: each transformer block, the token embedding (MEL's factors or the plain table, the largest
    tensors of a multilingual model), then the root with whatever is left (norms, position embeddings).

    Each unit's parameters become ``DTensor`` shards along dim 0; a unit is all-gathered just before its forward
    (and backward) and freed after, so a rank holds full weights of one block at a time.

    Args:
        backbone: the wrapped model, sharded in place.
        mesh: 1-D data-parallel device mesh.
        bf16: compute and all-gather in bf16, reduce gradients in fp32 (the optimizer keeps fp32 shards).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Every rank shards rank 0's weights (as DDP does): ranks may initialise differently, e.g. MEL's SVD
    # depends on the LAPACK thread count. fully_shard does not synchronise module states itself.
    on_cpu = mesh.device_type == "cpu"
    backbone.to("cpu" if on_cpu else torch.device(mesh.device_type, torch.accelerator.current_device_index()))
    group = mesh.get_group()
    for tensor in [*backbone.parameters(), *backbone.buffers()]:
        dist.broadcast(tensor.data, src=dist.get_global_rank(group, 0), group=group)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in transformer_blocks(backbone.model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(backbone.input_embeddings(), mesh=mesh, mp_policy=policy)
    # The root is not resharded after forward, so exit norms applied to pooled exits after the forward
    # (decoder MLL) use its gathered weights and their gradients are reduced with the root's. A forward without
    # backward (a probe) leaves it gathered until the next step: ``backbone.reshard()`` before reading parameters.
    fully_shard(backbone, mesh=mesh, mp_policy=policy)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def enable_activation_checkpointing(backbone: Backbone) -> None:
    """Recompute every transformer block during backward (Hugging Face's non-reentrant checkpointing; composes
    with FSDP2, tested to change no number)."""
    if not backbone.model.supports_gradient_checkpointing:
        raise ValueError(f"{type(backbone.model).__name__} does not support activation checkpointing")
    if hasattr(backbone.model, "activation_checkpointing_enable"):  # its newer name (the old one warns in 5.24)
        backbone.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def activation_checkpointing_enabled(backbone: Backbone) -> bool:
    """Whether the backbone recomputes its blocks (under the name the installed transformers has)."""
    model = backbone.model
    return (model.is_activation_checkpointing if hasattr(type(model), "is_activation_checkpointing")
            else model.is_gradient_checkpointing)
