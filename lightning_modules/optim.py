"""Optimizers by name (``optim.name``): torch AdamW and bitsandbytes' 8-bit AdamW, also on FSDP2 shards.

bitsandbytes' 8-bit optimizers refuse FSDP2's sharded parameters (``DTensor``: "mixed torch.Tensor and DTensor").
Adam's update is element-wise, so stepping each rank's local shard with that shard's gradient computes exactly
what an unsharded step computes; :class:`LocalShardOptimizer` does that. The one difference is where 8-bit
quantization blocks (256 consecutive elements) start: at the beginning of each rank's shard instead of the
whole tensor's, which changes rounding only.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterable
from functools import partial
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.config import OptimConfig, OptimizerName

OPTIMIZERS = typing.get_args(OptimizerName)
BNB_BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer states
# bitsandbytes' names of Adam's two moments, and torch AdamW's (the checkpoint format of LocalShardOptimizer).
MOMENTS = {"state1": "exp_avg", "state2": "exp_avg_sq"}


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decayed; biases and norm scales (1-D), by common practice, not."""
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def build_optimizer(module: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.name`` over ``module``'s trainable parameters.

    Args:
        module: after any FSDP2 sharding (its parameters may be ``DTensor`` shards).
        config: ``name`` (adamw | adamw8bit | paged_adamw8bit), ``lr``, ``betas``, ``eps``, ``weight_decay``.

    Example:
        >>> optimizer = build_optimizer(model, OptimConfig(name="adamw8bit", lr=1e-4))
    """
    if config.name not in OPTIMIZERS:
        raise ValueError(f"optimizer {config.name!r}; allowed: {', '.join(OPTIMIZERS)}")
    groups = parameter_groups(module, config.weight_decay)
    hyper = {"lr": config.lr, "betas": tuple(config.betas), "eps": config.eps}
    if config.name == "adamw":
        return torch.optim.AdamW(groups, **hyper)
    import bitsandbytes as bnb

    # Paged: states in CUDA unified memory that pages to the host under memory pressure (plain 8-bit on CPU).
    factory = partial(bnb.optim.PagedAdamW8bit if config.name == "paged_adamw8bit" else bnb.optim.AdamW8bit, **hyper)
    if any(_is_dtensor(p) for group in groups for p in group["params"]):
        return LocalShardOptimizer(groups, factory)
    return factory(groups)


class LocalShardOptimizer(torch.optim.Optimizer):
    """Runs a bitsandbytes 2-state (Adam-type) optimizer on each rank's local shard of FSDP2 ``DTensor`` parameters.

    ``param_groups`` hold the model's own (sharded) parameters, so Lightning, LR schedulers and
    ``torch.distributed.checkpoint`` see an ordinary optimizer. Each ``step`` points one plain proxy tensor per
    parameter at the local shard and its gradient and steps the inner optimizer on the proxies; the inner
    optimizer's state (8-bit moments of this rank's shard) is this optimizer's ``state``.

    ``state_dict`` stores the moments as torch AdamW does (``exp_avg``, ``exp_avg_sq`` float32 tensors laid out like
    the parameter, ``DTensor`` shards under FSDP2, and ``step``): a distributed checkpoint saves each rank's part,
    and ``load_state_dict`` re-quantizes them with :func:`requantize` (save → load is exact).

    Args:
        param_groups: parameter groups as for any torch optimizer; parameters may be ``DTensor`` shards.
        factory: builds the inner optimizer from groups of plain tensors,
            e.g. ``functools.partial(bitsandbytes.optim.AdamW8bit, lr=1e-3)``.

    Example:
        >>> fully_shard(model)
        >>> optimizer = LocalShardOptimizer(model.parameters(), partial(bnb.optim.AdamW8bit, lr=1e-3))
    """

    def __init__(self, param_groups: Iterable, factory: Callable[[list[dict]], torch.optim.Optimizer]) -> None:
        super().__init__(param_groups, defaults={})
        self.proxies = {p: nn.Parameter(self._local(p).detach()) for group in self.param_groups for p in group["params"]}
        self.inner = factory([{**group, "params": [self.proxies[p] for p in group["params"]]}
                              for group in self.param_groups])
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            for key, value in inner_group.items():  # the inner optimizer's defaults (betas, eps, ...)
                group.setdefault(key, value)

    @staticmethod
    def _local(tensor: Tensor) -> Tensor:
        local = tensor.to_local() if _is_dtensor(tensor) else tensor
        if not local.is_contiguous():  # bitsandbytes would step a contiguous copy and lose the update
            raise ValueError(f"local shard of shape {tuple(local.shape)} is not contiguous")
        return local

    def _point_proxies(self, with_grads: bool) -> None:
        """Proxies view the current local shards (FSDP2 may swap a shard's tensor, e.g. on checkpoint load)."""
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            inner_group.update({key: value for key, value in group.items() if key != "params"})  # LR schedule
            for param in group["params"]:
                proxy = self.proxies[param]
                proxy.data = self._local(param.detach())
                proxy.grad = self._local(param.grad) if with_grads and param.grad is not None else None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._point_proxies(with_grads=True)
        self.inner.step()
        for param, proxy in self.proxies.items():
            proxy.grad = None
            if proxy in self.inner.state:  # one dict, shared: the inner optimizer updates it in place
                self.state[param] = self.inner.state[proxy]
        return loss

    def _as_param(self, param: Tensor, local: Tensor) -> Tensor:
        """``local`` (this rank's part) laid out like ``param``: a DTensor shard under FSDP2."""
        if not _is_dtensor(param):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride())

    def state_dict(self) -> dict[str, Any]:
        import bitsandbytes.functional as bnb_functional

        packed = super().state_dict()
        params = list(chain.from_iterable(group["params"] for group in self.param_groups))
        packed["state"] = {}
        for index, param in enumerate(params):
            state = self.state.get(param)
            if not state:
                continue
            exported: dict[str, Any] = {"step": torch.tensor(float(state["step"]))}
            for name, torch_name in MOMENTS.items():
                moment = state[name]
                if moment.dtype == torch.uint8:
                    moment = bnb_functional.dequantize_blockwise(
                        moment, absmax=state[f"absmax{name[-1]}"], code=state[f"qmap{name[-1]}"], blocksize=BNB_BLOCKSIZE)
                exported[torch_name] = self._as_param(param, moment.float().view_as(self._local(param)))
            packed["state"][index] = exported
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state has different parameter groups than this optimizer")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({key: value for key, value in saved.items() if key != "params"})
        self._point_proxies(with_grads=False)
        for group_index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for param_index, (param, key) in enumerate(zip(group["params"], saved["params"])):
                if key not in state_dict["state"]:
                    continue
                saved_state, proxy = state_dict["state"][key], self.proxies[param]
                self.inner.state[proxy] = {}
                self.inner.init_state(self.inner.param_groups[group_index], proxy, group_index, param_index)
                state = self.inner.state[proxy]
                state["step"] = int(saved_state["step"])
                for name, torch_name in MOMENTS.items():
                    moment = saved_state[torch_name]
                    moment = (moment.to_local() if _is_dtensor(moment) else moment).to(proxy.device, torch.float32)
                    if state[name].dtype == torch.uint8:
                        codes, absmax = requantize(moment, state[f"qmap{name[-1]}"])
                        state[name].copy_(codes.view_as(state[name]))
                        state[f"absmax{name[-1]}"].copy_(absmax)
                    else:
                        state[name].copy_(moment.view_as(state[name]))
                self.state[param] = state


def requantize(values: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of bitsandbytes' blockwise dequantization: ``(codes, absmax)`` with ``code[codes] · absmax == values``
    for values that came out of ``dequantize_blockwise`` (so a checkpoint round trip restores the same state and
    the next step computes the same numbers).

    bitsandbytes' own quantizer takes ``absmax = max |value|`` per block, which drifts when a block's largest
    magnitude is negative: the signed dynamic map ends at -0.9930 but +1.0.

    Args:
        values: dequantized moments (any shape; blocks of 256 consecutive elements).
        code: the ascending 256-entry quantization map the values were quantized with.
    """
    if not bool((code[1:] > code[:-1]).all()):
        raise ValueError("quantization map must be strictly ascending")
    flat = values.reshape(-1).float()
    blocks = nn.functional.pad(flat, (0, -flat.numel() % BNB_BLOCKSIZE)).view(-1, BNB_BLOCKSIZE)
    absmax = blocks.clamp(min=0).amax(dim=1) / code[-1]
    if code[0] < 0:
        absmax = torch.maximum(absmax, blocks.clamp(max=0).amin(dim=1) / code[0])
    normalized = blocks / torch.where(absmax > 0, absmax, 1.0).unsqueeze(1)
    codes = torch.bucketize(normalized, (code[1:] + code[:-1]) / 2)
    # |code| <= 1 contracts, so the division above can land an ulp off and neighbouring absmax values decode
    # alike: per block keep the float32 neighbour that reproduces the most values exactly (all, in practice).
    decoded = code[codes]
    best, best_misses = absmax, (decoded * absmax.unsqueeze(1) != blocks).sum(1)
    for direction in (math.inf, 0.0):
        candidate = absmax
        for _ in range(2):
            candidate = torch.nextafter(candidate, torch.full_like(candidate, direction))
            misses = (decoded * candidate.unsqueeze(1) != blocks).sum(1)
            better = misses < best_misses
            best, best_misses = torch.where(better, candidate, best), torch.where(better, misses, best_misses)
    return codes.to(torch.uint8).view(-1)[: flat.numel()].view_as(values), best


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by this rank (shards only under FSDP2; shared tensors such as bitsandbytes'
    quantization maps counted once).

    Example:
        >>> optimizer_state_bytes(torch.optim.AdamW(model.parameters()))  # after a step: ~8 bytes per parameter
    """
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                local = value.to_local() if _is_dtensor(value) else value
                key = (local.untyped_storage().data_ptr(), local.storage_offset())
                if key not in seen:
                    seen.add(key)
                    total += local.numel() * local.element_size()
    return total
