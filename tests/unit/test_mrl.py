import pytest
import torch

from lightning_modules.backbone_adapter import BackboneInfo
from lightning_modules.plugins import ConfigError, MRL
from lightning_modules.plugins.mrl import MRLConfig, default_dims
from lightning_modules.views import View


def info(hidden: int) -> BackboneInfo:
    return BackboneInfo(hidden_size=hidden, num_layers=4, vocab_size=1000, family="encoder", intermediate_size=64)


def test_paper_dims_and_weights_for_1024():
    plugin = MRL(MRLConfig(), info(1024), seed=0)
    assert plugin.dims == [1024, 512, 256, 128, 64, 32, 16, 8]
    # design.md §3: 1 / (n · sqrt(d / dim_n)), hand-computed to 4 decimals.
    assert [round(w, 4) for w in plugin.weights] == [1.0, 0.3536, 0.1667, 0.0884, 0.05, 0.0295, 0.0179, 0.011]


def test_non_power_of_two_width_keeps_itself_on_top():
    assert default_dims(384) == [384, 256, 128, 64, 32, 16, 8]
    assert default_dims(8) == [8]


def test_explicit_weights_stay_paired_with_their_dims():
    plugin = MRL(MRLConfig(dims=[64, 384], weights=[0.25, 1.0]), info(384), seed=0)
    assert plugin.dims == [384, 64] and plugin.weights == [1.0, 0.25]


def test_expand_slices_views_and_multiplies_weights():
    embeddings = torch.arange(12.0).view(2, 6)
    views = MRL(MRLConfig(dims=[6, 2]), info(6), seed=0).expand([View(embeddings, 0.5, {"layer": 3})], bundle=None)
    assert [v.tags for v in views] == [{"layer": 3, "dim": 6}, {"layer": 3, "dim": 2}]
    assert torch.equal(views[1].embeddings, embeddings[:, :2])
    assert views[1].embeddings.data_ptr() == embeddings.data_ptr()  # a view, not a copy
    assert views[0].weight == 0.5 and views[1].weight == pytest.approx(0.5 / (2 * 3**0.5))
    assert views[1].name == "layer_3/dim_2"


@pytest.mark.parametrize("config, key, fragment", [
    (MRLConfig(dims=[512]), "dims", "[1, 384]"),
    (MRLConfig(dims=[0, 64]), "dims", "[0]"),
    (MRLConfig(dims=[64, 64]), "dims", "repeated"),
    (MRLConfig(dims=[384, 64], weights=[1.0]), "weights", "2 non-negative"),
])
def test_invalid_config_names_key_and_allowed_values(config, key, fragment):
    with pytest.raises(ConfigError) as error:
        MRL(config, info(384), seed=0)
    assert error.value.key == key and fragment in error.value.message
