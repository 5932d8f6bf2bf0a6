"""One notion of "trained versus applied afterwards" for MEL, FFN and precision: ``posthoc: true`` means the same
for each (training leaves the axis out; every setting is probed afterwards), and ``posthoc_settings()`` names the
settings never trained however the config says it (``posthoc``, a zero probability, a zero loss weight)."""

import pytest
import torch
from torch import nn

from lightning_modules.backbone_adapter import BackboneInfo
from lightning_modules.plugins import FFN, MEL, ConfigError, Precision
from lightning_modules.plugins.ffn import FFNConfig
from lightning_modules.plugins.mel import MELConfig
from lightning_modules.plugins.precision import PrecisionConfig
from lightning_modules.views import View

INFO = BackboneInfo(hidden_size=32, num_layers=2, vocab_size=50, family="encoder", intermediate_size=64)


class TinyBackbone:
    """The two things a model-side plugin asks of a backbone: its embedding module, and a way to replace it."""

    def __init__(self) -> None:
        self.model = nn.Module()
        self.model.layer = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))])
        self.embedding = nn.Embedding(50, 32)

    def input_embeddings(self) -> nn.Module:
        return self.embedding

    def replace_input_embeddings(self, module: nn.Module) -> None:
        self.embedding = module


def test_posthoc_names_every_setting_of_each_axis_and_trains_none_of_the_model_side_ones():
    mel = MEL(MELConfig(rank=16, ranks=[16, 8], posthoc=True), INFO, 0)
    ffn = FFN(FFNConfig(posthoc=True), INFO, 0)
    precision = Precision(PrecisionConfig(posthoc=True), INFO, 0)
    # the full rank (min(vocab, hidden) = 32) is the model's own embedding, as the full width is the FFN's own: both
    # are what a posthoc run trains (untouched()), named without their tag, so neither is a posthoc setting
    assert (mel.posthoc_settings(), mel.trained_settings()) == ([16, 8], [32])
    assert (ffn.posthoc_settings(), ffn.trained_settings()) == ([32, 16], [64])  # the full width is the model itself
    assert (precision.posthoc_settings(), precision.weights) == (["int8", "binary"], [1.0, 0.0, 0.0])


def test_a_zero_probability_or_weight_is_posthoc_too():
    assert FFN(FFNConfig(probabilities=[1, 0, 0]), INFO, 0).posthoc_settings() == [32, 16]
    assert MEL(MELConfig(rank=16, ranks=[16, 8], probabilities=[1, 0]), INFO, 0).posthoc_settings() == [8]
    assert Precision(PrecisionConfig(weights=[1, 0, 0.5]), INFO, 0).posthoc_settings() == ["int8"]
    assert MEL(MELConfig(rank=16, ranks=[16, 8]), INFO, 0).posthoc_settings() == []


@pytest.mark.parametrize("plugin, config, key", [
    (FFN, FFNConfig(posthoc=True, probabilities=[1, 1, 1]), "probabilities"),
    (MEL, MELConfig(rank=16, ranks=[16, 8], posthoc=True, probabilities=[1, 1]), "probabilities"),
    (Precision, PrecisionConfig(posthoc=True, weights=[1, 1, 1]), "weights"),
    (Precision, PrecisionConfig(posthoc=True, levels=["int8", "binary"]), "posthoc"),
])
def test_posthoc_with_a_training_choice_it_overrides_names_the_key(plugin, config, key):
    with pytest.raises(ConfigError) as error:
        plugin(config, INFO, 0)
    assert error.value.key == key


def test_posthoc_ffn_trains_exactly_what_probabilities_one_zero_zero_train():
    posthoc, full_only = FFN(FFNConfig(posthoc=True), INFO, 0), FFN(FFNConfig(probabilities=[1, 0, 0]), INFO, 0)
    views = {}
    for name, plugin in (("posthoc", posthoc), ("full_only", full_only)):
        plugin.setup(TinyBackbone())
        plugin.before_forward(step=5)
        views[name] = plugin.expand([View(torch.zeros(2, 32))], bundle=None)[0].tags
        assert plugin.step_metrics() == {"ffn/width": 64.0}
    assert views["posthoc"] == views["full_only"] == {"ffn": 64}


def test_posthoc_mel_trains_its_own_embedding_at_the_full_rank_named_without_it_and_a_tool_applies_a_rank():
    mel, backbone = MEL(MELConfig(rank=16, ranks=[16, 8], posthoc=True), INFO, 0), TinyBackbone()
    own = backbone.embedding
    mel.setup(backbone)
    mel.before_forward(step=3)
    assert mel.current() == 32 and backbone.embedding is own and mel.step_metrics() == {"mel/rank": 32.0}
    training = mel.expand([View(torch.zeros(2, 32), full_settings=mel.full_settings())], bundle=None)[0]
    assert (training.tags, training.name) == ({"rank": 32}, "full")  # the untruncated model: no rank in its name
    with mel.applied(8):
        assert mel.current() == 8 and backbone.embedding is not own
        assert mel.expand([View(torch.zeros(2, 32))], bundle=None)[0].tags == {"rank": 8}
    assert mel.current() == 32 and backbone.embedding is own
