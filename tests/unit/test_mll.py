import pytest

from lightning_modules.backbone_adapter import BackboneInfo
from lightning_modules.plugins import ConfigError, MLL
from lightning_modules.plugins.mll import MLLConfig, default_layers


@pytest.mark.parametrize("depth, expected", [
    (28, [1, 2, 4, 8, 16, 24, 28]),          # Qwen3-0.6B
    (36, [1, 2, 4, 8, 16, 24, 32, 36]),
    (40, [1, 2, 4, 8, 16, 24, 32, 40]),      # L already in the paper's set
    (12, [1, 2, 4, 8, 12]),
    (3, [1, 2, 3]),
    (1, [1]),
])
def test_paper_layer_sets(depth, expected):
    assert default_layers(depth) == expected


def test_uniform_weights_and_explicit_pairing():
    info = BackboneInfo(hidden_size=8, num_layers=28, vocab_size=10, family="decoder", intermediate_size=64)
    assert MLL(MLLConfig(), info, 0).weights == pytest.approx([1 / 7] * 7)
    plugin = MLL(MLLConfig(layers=[28, 4], weights=[0.75, 0.25]), info, 0)
    assert plugin.layers == [4, 28] and plugin.weights == [0.25, 0.75]


def test_layer_beyond_depth_is_rejected():
    info = BackboneInfo(hidden_size=8, num_layers=4, vocab_size=10, family="encoder", intermediate_size=64)
    with pytest.raises(ConfigError, match=r"\[6\] not allowed.*\[1, 4\].*depth") as error:
        MLL(MLLConfig(layers=[2, 6]), info, 0)
    assert error.value.key == "layers"
