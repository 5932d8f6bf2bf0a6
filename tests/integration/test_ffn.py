"""FFN (MatFormer): nested feed-forward width as a model-side axis, from training to an exported smaller model."""

import json

import mlflow
import pytest
import torch
from torch import nn

from experiments.config import compose
from experiments.run import build, train
from lightning_modules.backbone_adapter import BackboneInfo
from lightning_modules.embedding_model import EmbeddingModel
from lightning_modules.cell_export import Origin, export_cell, load_exported
from lightning_modules.plugins import ConfigError
from lightning_modules.plugins.ffn import FFN, FFNConfig, NestedLinear

INFO = BackboneInfo(hidden_size=32, num_layers=4, vocab_size=260, family="encoder", intermediate_size=64)
TEXTS = ["Datei öffnen", "Open the file", "ok", "Файл не найден " * 3]


def test_default_ladder_and_probabilities():
    plugin = FFN(FFNConfig(), INFO, seed=0)
    assert plugin.settings == [64, 32, 16]
    assert plugin.probabilities == pytest.approx([64 / 112, 32 / 112, 16 / 112])
    explicit = FFN(FFNConfig(widths=[16, 64], probabilities=[1.0, 3.0]), INFO, seed=0)
    assert explicit.settings == [64, 16] and explicit.probabilities == pytest.approx([0.75, 0.25])
    assert [plugin.sample(step) for step in range(50)] == [FFN(FFNConfig(), INFO, 0).sample(s) for s in range(50)]


@pytest.mark.parametrize("config, key, message", [
    (FFNConfig(widths=[128]), "widths", "[1, 64]"),
    (FFNConfig(widths=[32, 32]), "widths", "repeated"),
    (FFNConfig(widths=[64, 32], probabilities=[1.0]), "probabilities", "one per entry"),
])
def test_bad_config_names_the_key(config, key, message):
    with pytest.raises(ConfigError) as error:
        FFN(config, INFO, seed=0)
    assert error.value.key == key and message in error.value.message


@pytest.fixture(scope="module", params=["tiny_bert", "tiny_qwen3"])
def model(request, tmp_path_factory):
    config = compose("tiny", [f"output_dir={tmp_path_factory.mktemp('out')}", f"model.source={request.param}",
                              "plugins.ffn={}"])
    module, datamodule = build(config)
    return EmbeddingModel(module.eval(), datamodule.tokenize)


def test_setup_nests_every_feed_forward_projection_and_keeps_the_parameter_names(model):
    ffn = next(plugin for plugin in model.module.plugins if isinstance(plugin, FFN))
    per_block = 3 if model.module.backbone.info.family == "decoder" else 2  # gate + up + down, or up + down
    assert len(ffn.projections) == per_block * 4
    assert all(isinstance(p, NestedLinear) for p in ffn.projections)
    names = [name for name, _ in model.module.backbone.model.named_parameters()]
    assert not any(".linear." in name for name in names) and len(names) == len(set(names))


def test_a_width_equals_a_model_built_with_that_intermediate_size(model, tmp_path):
    """The export at ffn_16 is a plain transformers model with intermediate_size 16 and sliced weights; it must
    reproduce the training model's cell, and differ from the full width."""
    cell = model.cell(layer=2, dim=16, rank=8, ffn=16)
    assert cell.name == "layer_2/dim_16/rank_8/ffn_16"
    assert model.cell("layer_2/dim_16/ffn_16", rank=8) == cell  # CELL=layer_2/dim_16/ffn_16 RANK=8: the same cell
    result = export_cell(model, tmp_path / "export", cell, Origin("t", "tiny", None, 0, None))
    config = json.loads((result.path / "config.json").read_text())
    assert config["intermediate_size"] == 16 and config["num_hidden_layers"] == 2
    exported = load_exported(result.path).encode_query(TEXTS, convert_to_tensor=True)
    assert (exported - model.encode(TEXTS, cell)).abs().max().item() <= 1e-5
    full = model.cell(layer=2, dim=16, rank=8, ffn=64)
    assert (exported - model.encode(TEXTS, full)).abs().max().item() > 1e-3
    wide = export_cell(model, tmp_path / "wide", full, Origin("t", "tiny", None, 0, None))
    assert result.parameters < wide.parameters


def test_full_width_computes_exactly_what_the_original_layers_compute():
    layer = nn.Linear(8, 20)
    up, down = NestedLinear(layer, "out"), NestedLinear(nn.Linear(20, 8), "in")
    hidden = torch.randn(5, 8)
    assert torch.equal(up(hidden), layer(hidden))
    up.width, down.width = 6, 6
    torch.testing.assert_close(up(hidden), layer(hidden)[:, :6])
    sliced = down.sliced(6)
    assert sliced.weight.shape == (8, 6) and torch.equal(down(up(hidden)), sliced(up(hidden)))


def test_training_samples_one_width_per_step_and_tags_the_views(tiny_config):
    config = tiny_config("tiny", ["plugins.ffn={}", "trainer.max_steps=4"])  # with MLL, MRL and MEL
    result = train(config)
    client = mlflow.MlflowClient(config.tracking.uri)
    widths = [int(m.value) for m in sorted(client.get_metric_history(result.run_id, "train/ffn/width"),
                                           key=lambda m: m.step)]
    plugin = FFN(FFNConfig(), INFO, seed=config.seed)
    assert widths == [plugin.sample(step) for step in range(4)]
    views = [key for key in client.get_run(result.run_id).data.metrics if key.startswith("train/loss/layer_")]
    # the full width is the model not cut along the axis: its views are named without /ffn_<width>
    named = {int(key.rsplit("/ffn_", 1)[1]) if "/ffn_" in key else INFO.intermediate_size for key in views}
    assert views and named == set(widths)
