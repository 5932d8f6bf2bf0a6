"""A fourth Matryoshka axis defined only here trains through the unchanged LightningModule."""

from dataclasses import dataclass

import torch

from experiments.run import train
from lightning_modules.plugins import ConfigError, MatryoshkaPlugin, PluginConfig


@dataclass
class SquashConfig(PluginConfig):
    weight: float = 0.5


class Squash(MatryoshkaPlugin):
    """Adds a tanh-squashed copy of every view (tag ``squash``), recording every hook call."""

    Config = SquashConfig
    calls: list = []

    def __init__(self, config: SquashConfig, info, seed: int) -> None:
        super().__init__(config, info, seed)
        if config.weight < 0:
            raise ConfigError("weight", f"{config.weight} must be >= 0")

    def setup(self, backbone) -> None:
        Squash.calls.append(("setup", backbone.info.num_layers))

    def before_forward(self, step: int) -> None:
        Squash.calls.append(("before_forward", step))

    def expand(self, views, bundle):
        Squash.calls.append(("expand", len(views)))
        return [new for view in views for new in (
            view.derive(squash="none"),
            view.derive(embeddings=torch.tanh(view.embeddings), weight_factor=self.config.weight, squash="tanh"))]


def test_fourth_axis_trains_with_no_edit_to_core_code(tiny_config):
    Squash.calls.clear()
    config = tiny_config("tiny", ["plugin_packages=[tests]",
                                  "plugins.squash._target_=tests.integration.test_plugin_contract.Squash",
                                  "plugins.squash.weight=0.25", "trainer.max_steps=3"])
    result = train(config)
    assert Squash.calls[0] == ("setup", 4)
    assert [step for hook, step in Squash.calls if hook == "before_forward"] == [0, 1, 2]
    # MLL (3 exits: 1, 2, 4) x MRL (dims 32, 16, 8) views reach the new axis, which runs after MRL (stage 20).
    assert {count for hook, count in Squash.calls if hook == "expand"} == {9}
    view_losses = [key for key in result.metrics if key.startswith("train/loss/")]
    assert len({key.rsplit("/rank_", 1)[0] for key in view_losses}) == 18  # MEL's rank varies per step
    assert "train/loss/layer_2/dim_16/squash_tanh/rank_16" in view_losses or \
        "train/loss/layer_2/dim_16/squash_tanh/rank_8" in view_losses


def test_new_axis_config_is_validated_by_its_own_class(tiny_config):
    from experiments.config import ConfigError

    config = tiny_config("tiny", ["plugin_packages=[tests]",
                                  "plugins.squash._target_=tests.integration.test_plugin_contract.Squash",
                                  "plugins.squash.weight=-1"])
    try:
        train(config)
    except ConfigError as error:
        assert "`plugins.squash.weight`" in str(error) and ">= 0" in str(error)
    else:
        raise AssertionError("a negative weight must stop the run")
