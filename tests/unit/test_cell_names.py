"""One name per deployable model: a cell's name names only the axes it cuts, whichever plugins trained it."""

import pytest

from contracts.cells import Cell, cell_name, cut_tags
from experiments.config import compose


def test_the_rule_keeps_layer_and_dim_and_every_axis_away_from_its_full_setting():
    tags = {"layer": 4, "dim": 384, "rank": 384, "ffn": 768, "precision": "fp32"}
    full = {"rank": 384, "ffn": 1536, "precision": "fp32", "layer": 4, "dim": 384}  # layer, dim: named all the same
    assert cut_tags(tags, full) == {"layer": 4, "dim": 384, "ffn": 768}
    assert cell_name(tags, full) == "layer_4/dim_384/ffn_768"
    assert cell_name(tags, {}) == "layer_4/dim_384/rank_384/ffn_768/precision_fp32"  # no full setting: all named
    assert Cell(tags, 1536, full).name == "layer_4/dim_384/ffn_768"


def cell_names(tmp_path, *overrides: str) -> list[str]:
    from experiments.run import build

    module, _ = build(compose("tiny", [f"output_dir={tmp_path}", *overrides]))
    return [cell.name for cell in module.cells()]


@pytest.mark.parametrize("overrides, full_named, cut_named", [
    (["plugins.precision.levels=[fp32,int8]"], "layer_4/dim_32/rank_16", "layer_4/dim_32/rank_16/precision_int8"),
    (["plugins.ffn.widths=[64,32]"], "layer_4/dim_32/rank_16", "layer_4/dim_32/rank_16/ffn_32"),
])
def test_an_output_or_model_side_axis_at_its_full_setting_is_left_out(tmp_path, overrides, full_named, cut_named):
    names = cell_names(tmp_path, *overrides)  # tiny_bert: intermediate size 64
    assert full_named in names and cut_named in names and len(set(names)) == len(names)
    assert not [name for name in names if "precision_fp32" in name or "ffn_64" in name]


def test_a_baseline_truncated_afterwards_shares_every_rank_cell_with_mel_and_its_full_cells_with_mrl_mll(tmp_path):
    mel = cell_names(tmp_path / "mel")  # tiny: MLL × MRL × MEL ranks 16, 8
    baseline = cell_names(tmp_path / "baseline", "plugins.mel.posthoc=true",  # the paper suite's baseline
                          "plugins.mll.weights=[0.0,0.0,1.0]", "plugins.mrl.weights=[1.0,0.0,0.0]")
    mrl_mll = cell_names(tmp_path / "mrl_mll", "plugins.mel=null")
    assert set(mel) < set(baseline)  # every rank cell, under one name
    assert set(mrl_mll) < set(baseline) and set(baseline) - set(mel) == set(mrl_mll)  # the untruncated ones
    assert len(mel) == 2 * len(mrl_mll) == 18
