"""Optimizers by name: 8-bit AdamW tracks 32-bit AdamW, state bytes, the local-shard wrapper and its checkpoints."""

import copy
from functools import partial
from types import SimpleNamespace

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from torch import nn

from experiments.config import ConfigError
from lightning_modules.optim import (LocalShardOptimizer, build_optimizer, optimizer_state_bytes, parameter_groups,
                                     requantize)
from tests.distributed.optim_worker import make_model


def optim_config(name: str, lr: float = 3e-3) -> SimpleNamespace:
    return SimpleNamespace(name=name, lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, first: int = 0) -> list[float]:
    """Regression onto a fixed random teacher (learnable, so the loss falls); the batch is a function of the step."""
    teacher = torch.randn(64, 64, generator=torch.Generator().manual_seed(5)) / 8
    losses = []
    for step in range(first, first + steps):
        inputs = torch.randn(32, 64, generator=torch.Generator().manual_seed(step))
        loss = nn.functional.mse_loss(model(inputs), torch.tanh(inputs @ teacher))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_8bit_and_32bit_adamw_trajectories_stay_close_over_50_steps():
    runs = {}
    for name in ("adamw", "adamw8bit"):
        model = make_model()
        optimizer = build_optimizer(model, optim_config(name))
        runs[name] = fit(model, optimizer, 50), model, optimizer_state_bytes(optimizer)
    (losses32, model32, bytes32), (losses8, model8, bytes8) = runs["adamw"], runs["adamw8bit"]
    print(f"\noptimizer state bytes, 16,576-parameter MLP: adamw {bytes32:,}, adamw8bit {bytes8:,}")
    assert losses32[-1] < 0.2 * losses32[0]  # it learns, so the comparison means something
    assert max(abs(a - b) / a for a, b in zip(losses32, losses8)) < 0.01
    moved = max((p - q).abs().max() for p, q in zip(model32.parameters(), make_model().parameters()))
    gap = max((p - q).abs().max() for p, q in zip(model32.parameters(), model8.parameters()))
    assert gap < 0.1 * moved, (gap, moved)


def test_optimizer_state_bytes_by_hand():
    model = make_model()  # weights 128×64 and 64×128 (8,192 each), biases 128 and 64
    adamw, adamw8bit = (build_optimizer(model, optim_config(name)) for name in ("adamw", "adamw8bit"))
    assert optimizer_state_bytes(adamw) == 0  # no state before the first step
    fit(model, adamw, 1)
    fit(model, adamw8bit, 1)
    # AdamW: two fp32 moments per parameter and a 4-byte step tensor per tensor.
    assert optimizer_state_bytes(adamw) == 2 * 4 * 16_576 + 4 * 4
    # 8-bit: weights get two uint8 moments + one fp32 absmax per 256-element block each; tensors under 4,096
    # elements (biases) keep fp32 moments; two shared 256-entry fp32 quantization maps.
    assert optimizer_state_bytes(adamw8bit) == 2 * (2 * 8192 + 2 * 32 * 4) + 2 * 4 * 192 + 2 * 256 * 4


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("adamw8bit", bnb.optim.AdamW8bit),
                                        ("paged_adamw8bit", bnb.optim.PagedAdamW8bit)])
def test_build_optimizer_by_name(name, kind):
    model = make_model()
    optimizer = build_optimizer(model, optim_config(name))
    assert type(optimizer) is kind
    decay, no_decay = optimizer.param_groups
    assert [p.ndim for p in decay["params"]] == [2, 2] and decay["weight_decay"] == 0.01
    assert [p.ndim for p in no_decay["params"]] == [1, 1] and no_decay["weight_decay"] == 0.0
    before = model[0].weight.detach().clone()
    fit(model, optimizer, 1)  # paged falls back to plain 8-bit states on a CPU
    assert not torch.equal(model[0].weight, before)


def test_unknown_optimizer_is_refused(tiny_config):
    with pytest.raises(ValueError, match="optimizer 'sgd'; allowed: adamw, adamw8bit, paged_adamw8bit"):
        build_optimizer(make_model(), optim_config("sgd"))
    with pytest.raises(ConfigError, match="`optim.name`: 'sgd' not allowed; choose one of adamw, adamw8bit, paged_adamw8bit"):
        tiny_config("tiny", ["optim.name=sgd"])


def local_shard_optimizer(model: nn.Module) -> LocalShardOptimizer:
    return LocalShardOptimizer(parameter_groups(model, 0.01), partial(bnb.optim.AdamW8bit, lr=3e-3, betas=(0.9, 0.98)))


def test_local_shard_wrapper_steps_exactly_like_bitsandbytes():
    plain, wrapped = make_model(), make_model()
    fit(plain, build_optimizer(plain, optim_config("adamw8bit")), 5)
    optimizer = local_shard_optimizer(wrapped)
    fit(wrapped, optimizer, 5)
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p, q)
    assert set(optimizer.state) == set(wrapped.parameters())  # the model's own parameters, as torch expects


def test_local_shard_wrapper_state_dict_round_trip_is_exact():
    model = make_model()
    optimizer = local_shard_optimizer(model)
    fit(model, optimizer, 3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} and saved["state"][0]["exp_avg"].dtype == torch.float32
    fit(model, optimizer, 3, first=3)

    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = local_shard_optimizer(resumed)
    resumed_optimizer.load_state_dict(saved)
    fit(resumed, resumed_optimizer, 3, first=3)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_requantize_inverts_dequantization_even_when_a_block_peaks_negative():
    code = bnb_functional.create_dynamic_map(signed=True)
    values = torch.randn(3 * 256 + 17)
    values[5] = -10.0  # block 0's largest magnitude is negative: the signed map ends at -0.9930, not -1
    codes, state = bnb_functional.quantize_blockwise(values, code=code, blocksize=256)
    dequantized = bnb_functional.dequantize_blockwise(codes, absmax=state.absmax, code=code, blocksize=256)
    again, absmax = requantize(dequantized, code)
    assert torch.equal(again, codes)
    torch.testing.assert_close(absmax, state.absmax, rtol=1e-6, atol=0)
    assert torch.equal(bnb_functional.dequantize_blockwise(again, absmax=absmax, code=code, blocksize=256), dequantized)
    with pytest.raises(ValueError, match="ascending"):
        requantize(dequantized, code.flip(0))
