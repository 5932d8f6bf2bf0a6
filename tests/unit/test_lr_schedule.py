"""The LR schedule (linear warm-up, then cosine down to ``min_lr``) of the tiny and quickstart configs, by hand, and
how it differs from transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` (the reason the project keeps its
own: the library's first step has LR 0, which changes the recorded reference losses)."""

import math

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from lightning_modules.module import warmup_cosine

# (lr, min_lr, warmup_steps, max_steps) of experiments/tiny.yaml and experiments/quickstart.yaml.
SCHEDULES = {"tiny": (1e-3, 1e-7, 2, 10), "quickstart": (5e-5, 1e-7, 10, 120)}
# {step: LR}: warm-up lr·(step+1)/W, then min_lr + (lr - min_lr)·(1 + cos(π·(step - W)/(T - W)))/2.
EXPECTED = {
    "tiny": {0: 5e-4, 1: 1e-3, 2: 1e-3, 6: 1e-7 + (1e-3 - 1e-7) / 2,
             9: 1e-7 + (1e-3 - 1e-7) * (1 - math.cos(math.pi / 8)) / 2},  # cos(7π/8) = -cos(π/8)
    "quickstart": {0: 5e-6, 9: 5e-5, 10: 5e-5, 65: 1e-7 + (5e-5 - 1e-7) / 2,
                   119: 1e-7 + (5e-5 - 1e-7) * (1 - math.cos(math.pi / 110)) / 2},  # cos(109π/110)
}


def learning_rates(make_scheduler, lr: float, steps: int) -> list[float]:
    """The LR of each of ``steps`` optimizer steps under ``make_scheduler(optimizer)``, stepped as Lightning does."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def ours(name: str) -> list[float]:
    lr, min_lr, warmup, steps = SCHEDULES[name]
    return learning_rates(lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup, steps, min_lr / lr)), lr, steps)


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_schedule_warms_up_then_falls_to_min_lr(name):
    rates = ours(name)
    assert {step: rates[step] for step in EXPECTED[name]} == pytest.approx(EXPECTED[name], rel=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_transformers_schedule_is_ours_bit_for_bit_after_warm_up_but_warms_up_from_zero(name):
    lr, min_lr, warmup, steps = SCHEDULES[name]
    theirs = learning_rates(lambda optimizer: get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, steps, min_lr_rate=min_lr / lr), lr, steps)
    assert theirs[warmup:] == ours(name)[warmup:]
    assert theirs[:warmup] == [lr * (step / warmup) for step in range(warmup)]  # step 0 does not train
