"""Each axis' cost hook against numbers computed by hand for the tiny BERT, and the parameters of real exports."""

import pytest

from experiments.config import compose
from experiments.run import build
from lightning_modules.cell_export import Origin, export_cell
from lightning_modules.costs import cell_cost
from lightning_modules.embedding_model import EmbeddingModel

# tiny_bert: vocab V = 260 (bytes), d = 32, I = 64, 4 blocks, 512 positions, 2 token types; tiny.yaml: 48 tokens.
V, D, I, CONTEXT = 260, 32, 64, 48
EMBEDDINGS_REST = 512 * D + 2 * D + 2 * D  # positions, token types, embedding LayerNorm: 16512
ATTENTION = 3 * (D * D + D) + (D * D + D) + 2 * D  # q, k, v, output, LayerNorm: 4288
FEED_FORWARD = (D * I + I) + (I * D + D) + 2 * D  # up, down, LayerNorm: 4256
BLOCK = ATTENTION + FEED_FORWARD  # 8544
# FLOPs per token of a block: 2 · weight entries (4 d² attention + 2 d·I feed-forward) + 4 · n_ctx · d attention.
BLOCK_FLOPS = 2 * (4 * D * D + 2 * D * I) + 4 * CONTEXT * D  # 22528


def module_of(overrides):
    config = compose("tiny", ["probe.enabled=false", "model.max_length=48", *overrides])
    module, datamodule = build(config)
    return module.eval(), datamodule


@pytest.fixture(scope="module")
def three_d():
    """The tiny run's module (MLL, MRL, MEL ranks 16 and 8) and an FFN + precision one; never trained (costs and
    export sizes depend on shapes only)."""
    return module_of([]), module_of(["plugins.mel=null", "plugins.ffn.widths=[64,16]",
                                     "plugins.precision.levels=[fp32,binary]"])


def cost_of(module, name, mode="compat"):
    cell = next(cell for cell in module.cells() if cell.name == name)
    return cell, cell_cost(module, cell, CONTEXT, mode)


def test_hand_computed_values_are_right():
    assert (EMBEDDINGS_REST, ATTENTION, FEED_FORWARD, BLOCK, BLOCK_FLOPS) == (16512, 4288, 4256, 8544, 22528)


@pytest.mark.parametrize("name, mode, parameters, flops", [
    # MLL: blocks run; the merged token embedding (compat) is V·d parameters and a lookup.
    ("layer_4/dim_32/rank_16", "compat", V * D + EMBEDDINGS_REST + 4 * BLOCK, 4 * BLOCK_FLOPS),
    ("layer_2/dim_32/rank_16", "compat", V * D + EMBEDDINGS_REST + 2 * BLOCK, 2 * BLOCK_FLOPS),
    ("layer_1/dim_8/rank_8", "compat", V * D + EMBEDDINGS_REST + 1 * BLOCK, 1 * BLOCK_FLOPS),
    # MEL factorized: r·(V + d) parameters, 2·r·d FLOPs per token for U[ids, :r] · V[:r].
    ("layer_2/dim_32/rank_8", "factorized", 8 * (V + D) + EMBEDDINGS_REST + 2 * BLOCK, 2 * 8 * D + 2 * BLOCK_FLOPS),
    ("layer_4/dim_16/rank_16", "factorized", 16 * (V + D) + EMBEDDINGS_REST + 4 * BLOCK,
     2 * 16 * D + 4 * BLOCK_FLOPS),
])
def test_parameters_and_flops_of_depth_and_rank(three_d, name, mode, parameters, flops):
    (module, _), _ = three_d
    _, cost = cost_of(module, name, mode)
    assert (cost.parameters, cost.flops_per_token) == (parameters, flops)


def test_ffn_width_costs_its_projections_in_every_block(three_d):
    _, (module, _) = three_d
    # Width 16 keeps up 32·16 + 16 and down 16·32 + 32 of each block's 32·64 + 64 and 64·32 + 32.
    block_16 = BLOCK - (D * I + I + I * D + D) + (D * 16 + 16 + 16 * D + D)
    flops_16 = BLOCK_FLOPS - 2 * (2 * D * I) + 2 * (2 * D * 16)
    _, cost = cost_of(module, "layer_2/dim_32/ffn_16")
    assert (cost.parameters, cost.flops_per_token) == (V * D + EMBEDDINGS_REST + 2 * block_16, 2 * flops_16)
    _, full = cost_of(module, "layer_2/dim_32")
    assert (full.parameters, full.flops_per_token) == (V * D + EMBEDDINGS_REST + 2 * BLOCK, 2 * BLOCK_FLOPS)


@pytest.mark.parametrize("name, expected", [
    ("layer_4/dim_32", 32 * 4),  # MRL width · 4 bytes
    ("layer_4/dim_8", 8 * 4),
    ("layer_4/dim_32/precision_binary", 32 // 8),  # precision: 1 bit per coordinate
    ("layer_1/dim_8/ffn_16/precision_binary", 1),
])
def test_bytes_per_vector_from_dim_and_precision(three_d, name, expected):
    _, (module, _) = three_d
    cell, cost = cost_of(module, name)
    assert cost.bytes_per_vector == expected == cell.bytes
    assert cost.summary()["bytes"] == expected


@pytest.mark.parametrize("which, name, mode", [
    (0, "layer_2/dim_16/rank_8", "compat"),
    (0, "layer_1/dim_32/rank_8", "factorized"),
    (0, "layer_4/dim_32/rank_16", "factorized"),
    (1, "layer_2/dim_8/ffn_16/precision_binary", "compat"),
])
def test_parameters_equal_those_of_the_exported_model(three_d, tmp_path, which, name, mode):
    module, datamodule = three_d[which]
    model = EmbeddingModel(module, datamodule.tokenize)
    cell = model.cell(name)
    result = export_cell(model, tmp_path / "export", cell, Origin("tiny", "tiny_bert", None, 0, None), mode)
    assert cell_cost(module, cell, CONTEXT, mode).parameters == result.parameters
