import pytest
import torch

from experiments.run import build
from lightning_modules.backbone_adapter import BackboneInfo
from lightning_modules.plugins import ConfigError, MRL, Precision
from lightning_modules.plugins.mrl import MRLConfig
from lightning_modules.plugins.precision import PrecisionConfig, binary, clipped_gradient, identity_gradient, int8
from lightning_modules.views import View

INFO = BackboneInfo(hidden_size=64, num_layers=4, vocab_size=1000, family="encoder", intermediate_size=64)


def test_int8_rounds_to_255_levels_of_the_largest_coordinate():
    # scale 1/127: x / scale = 127, -63.5, 31.75, 0 -> 127, -64 (half to even), 32, 0
    quantized = int8(torch.tensor([[1.0, -0.5, 0.25, 0.0]]))
    assert torch.allclose(quantized, torch.tensor([[127.0, -64.0, 32.0, 0.0]]) / 127)


def test_binary_keeps_signs_at_the_input_norm():
    # norm 5 over 4 coordinates: every sign times 5 / sqrt(4); zero counts as +
    assert torch.equal(binary(torch.tensor([[3.0, -4.0, 0.0, 0.0]])), torch.tensor([[2.5, -2.5, 2.5, 2.5]]))


def test_straight_through_forward_is_quantized_and_backward_passes_the_flippable_coordinates():
    upstream = torch.tensor([[1.0, 2.0, 3.0]])
    x = torch.tensor([[0.3, -1.2, 0.7]], requires_grad=True)
    out = identity_gradient(x, int8(x))
    assert torch.equal(out.detach(), int8(x.detach()))
    (out * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)
    x.grad = None
    out = clipped_gradient(x, binary(x))
    assert torch.equal(out.detach(), binary(x.detach()))
    (out * upstream).sum().backward()
    # RMS = sqrt((0.09 + 1.44 + 0.49) / 3) = 0.82: only -1.2 lies beyond it, so its gradient is cut
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0, 3.0]]))


def test_expand_nests_every_width_with_tags_weights_and_storage():
    embeddings = torch.randn(5, 64)
    dims = MRL(MRLConfig(dims=[64, 8]), INFO, seed=0).expand([View(embeddings, tags={"layer": 4})], bundle=None)
    views = Precision(PrecisionConfig(weights=[1.0, 0.5, 0.25], min_bytes=0), INFO, seed=0).expand(dims, bundle=None)
    assert [view.name for view in views[:3]] == [
        "layer_4/dim_64/precision_fp32", "layer_4/dim_64/precision_int8", "layer_4/dim_64/precision_binary"]
    assert [view.bytes_per_vector for view in views] == [256, 64, 8, 32, 8, 1]
    assert [view.weight for view in views[3:]] == pytest.approx([w * dims[1].weight for w in (1.0, 0.5, 0.25)])
    assert views[3].embeddings.data_ptr() == embeddings.data_ptr()  # fp32: the MRL slice itself, no copy
    assert torch.allclose(views[5].embeddings, binary(embeddings[:, :8]))  # each width quantized on its own


def test_quantized_views_below_min_bytes_are_probed_with_weight_zero():
    dims = MRL(MRLConfig(dims=[64, 32, 16]), INFO, seed=0).expand([View(torch.randn(5, 64))], bundle=None)
    views = Precision(PrecisionConfig(), INFO, seed=0).expand(dims, bundle=None)  # default min_bytes: 4
    weights = {(view.embeddings.shape[-1], view.tags["precision"]): view.weight for view in views}
    assert [view.bytes_per_vector for view in views] == [256, 64, 8, 128, 32, 4, 64, 16, 2]
    assert weights[(16, "binary")] == 0.0  # 2 bytes < 4
    assert weights[(32, "binary")] == pytest.approx(dims[1].weight)  # 4 bytes: trained
    assert weights[(16, "fp32")] == weights[(16, "int8")] == pytest.approx(dims[2].weight)


@pytest.mark.parametrize("config, key, fragment", [
    (PrecisionConfig(levels=["fp16"]), "levels", "fp32, int8, binary"),
    (PrecisionConfig(levels=[]), "levels", "choose one or more"),
    (PrecisionConfig(levels=["int8", "int8"]), "levels", "repeated"),
    (PrecisionConfig(weights=[1.0, 1.0]), "weights", "3 non-negative"),
    (PrecisionConfig(binary_gradient="tanh"), "binary_gradient", "clipped, identity"),
    (PrecisionConfig(min_bytes=-1), "min_bytes", ">= 0"),
])
def test_invalid_config_names_key_and_allowed_values(config, key, fragment):
    with pytest.raises(ConfigError) as error:
        Precision(config, INFO, seed=0)
    assert error.value.key == key and fragment in error.value.message


def _gradients(config) -> dict[str, torch.Tensor]:
    module, datamodule = build(config)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    views = module.views(batch, step=0)
    total = sum(view.weight * sum(terms.values()) for view, terms in zip(views, module.view_losses(views, batch)))
    total.backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_zero_weight_levels_leave_training_unchanged_and_binary_alone_still_trains(tiny_config):
    plain = _gradients(tiny_config("tiny"))
    posthoc = _gradients(tiny_config("tiny", ["plugins.precision.weights=[1,0,0]"]))
    assert plain.keys() == posthoc.keys()
    assert all(torch.allclose(plain[name], posthoc[name], atol=1e-6) for name in plain)
    binary_only = _gradients(tiny_config("tiny", ["plugins.precision.levels=[binary]"]))
    assert binary_only.keys() == plain.keys() and all(g.abs().sum() > 0 for g in binary_only.values())
