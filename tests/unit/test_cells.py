"""Cells are values: hashable, equal by tags and bytes, with read-only tags that still read like a dict."""

import copy
import json
import pickle

import pytest

from contracts.cells import Cell


def test_a_cell_is_hashable_and_equal_cells_hash_alike():
    cell = Cell({"layer": 2, "dim": 64, "rank": 64}, 256)
    same = Cell({"rank": 64, "dim": 64, "layer": 2}, 256)  # another tag order: the same tags
    assert cell == same and hash(cell) == hash(same) and {cell: "a"}[same] == "a"
    assert len({cell, same, Cell({"layer": 2, "dim": 64, "rank": 32}, 256)}) == 2


def test_a_cells_tags_are_read_only():
    cell = Cell({"layer": 2, "dim": 64}, 256)
    for change in (lambda tags: tags.__setitem__("layer", 4), lambda tags: tags.update(layer=4),
                   lambda tags: tags.pop("layer"), lambda tags: tags.clear(), lambda tags: tags.setdefault("x", 1)):
        with pytest.raises(TypeError, match="read-only"):
            change(cell.tags)
    assert cell.tags == {"layer": 2, "dim": 64} and cell.name == "layer_2/dim_64"


def test_a_cells_tags_read_like_a_dict_and_survive_copies():
    cell = Cell({"layer": 2, "dim": 64}, 256)
    assert json.dumps(cell.tags) == '{"layer": 2, "dim": 64}' and {**cell.tags, "rank": 8}["rank"] == 8
    assert pickle.loads(pickle.dumps(cell)) == cell and copy.deepcopy(cell) == cell
