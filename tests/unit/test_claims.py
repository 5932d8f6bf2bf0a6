"""The paper's claims from hand-made probe tables with known numbers, decided by the one rule on their intervals."""

import itertools

import numpy as np
import pytest

from contracts.cells import view_name
from evaluation.claims import Claim, Estimate, claims, holds, seed_agreement, top_cell, uncompressed

TASK = "GettextRetrieval"
LAYERS, DIMS, RANKS = (1, 2, 4), (64, 32, 8, 4), (16, 8)
# Per-axis factors of each run's score: score = base · layer · dim · rank (1 at the full cell).
BASELINE = {"layer": {4: 1, 2: 0.6, 1: 0.4}, "dim": {64: 1, 32: 0.9, 8: 0.5, 4: 0.3}, "rank": {16: 1, 8: 0.7}}
NESTED = {"layer": {4: 1, 2: 0.9, 1: 0.8}, "dim": {64: 1, 32: 0.95, 8: 0.8, 4: 0.6}, "rank": {16: 1, 8: 0.9}}


def table(base: float, untruncated: float | None = None, **nested_axes: bool) -> dict:
    """A probe table of the 3 x 4 x 2 grid; the axes named True take NESTED's factors, the others BASELINE's. With
    ``untruncated`` (the factor of rank 32, the embedding's full rank) the run is also scored untruncated, and those
    cells are named without a rank (the cell naming rule)."""
    ranks = RANKS if untruncated is None else (32, *RANKS)
    factors = {**BASELINE, "rank": {**BASELINE["rank"], 32: untruncated}}
    full = {} if untruncated is None else {"full_settings": {"rank": 32}}
    cells = []
    for layer, dim, rank in itertools.product(LAYERS, DIMS, ranks):
        tags = {"layer": layer, "dim": dim, "rank": rank}
        score = base
        for axis, value in tags.items():
            score *= (NESTED if nested_axes.get(axis) else factors)[axis][value]
        name = view_name({key: value for key, value in tags.items() if not (key == "rank" and value == 32)})
        cells.append({"name": name, "tags": tags, "bytes": 4 * dim, "mean_main_score": score,
                      "scores": {TASK: {"main_score": score}}})
    return {"step": 10, "tasks": {TASK: {"main_score": "ndcg_at_10"}}, "cells": cells, **full}


def runs(mrl_base: float = 0.595) -> dict[str, list[dict]]:
    return {"baseline": [table(0.60)], "mrl": [table(mrl_base, dim=True)], "mll": [table(0.58, layer=True)],
            "mel": [table(0.60, rank=True)], "mel_fixed": [table(0.605, rank=False)],
            "3dml": [table(0.59, layer=True, dim=True, rank=True)]}


def test_claims_from_known_numbers():
    rows = {claim.number: claim for claim in claims(runs(), TASK)}
    # 1: dim 8 (= 64/8) keeps 80 % vs 50 %, dim 4 (= 64/16) 60 % vs 30 %; full 59.5 - 60 = -0.5 point.
    assert rows[1].value == ("d/8 (dim 8): 80.0% vs 50.0% (+30.00 pt); d/16 (dim 4): 60.0% vs 30.0% (+30.00 pt); "
                             "full -0.50 pt")
    assert rows[1].passed is True
    # 2: exit 1: 0.58·0.8 - 0.6·0.4 = +22.4 points, exit 2: 0.58·0.9 - 0.6·0.6 = +16.2; full -2.0: fails.
    assert rows[2].value == "exit 1: +22.40 pt; exit 2: +16.20 pt; full -2.00 pt" and rows[2].passed is False
    # 3: rank 8 keeps 90 % (mel) vs 70 % (mel_fixed, the baseline's factor); at R 60 - 60.5 = -0.5: passes.
    assert rows[3].value == "rank 8: 90.0% vs 70.0% (+20.00 pt); at R -0.50 pt" and rows[3].passed is True
    # 4: 3dml is lower only at the full cell (59 vs 60) of the 24.
    assert rows[4].value.startswith("higher in 23/24 cells") and rows[4].value.endswith(
        "full (layer_4/dim_64/rank_16) -1.00 pt")  # 3dml trains MEL: its full cell is its top rank
    assert rows[4].passed is True


def test_a_claim_fails_when_the_fixed_rank_degrades_as_gracefully_and_is_not_run_without_its_runs():
    tables = runs()
    tables["mel_fixed"] = [table(0.605, rank=True)]  # the same 90 % at rank 8: no graceful-degradation gain
    del tables["mll"]
    rows = {claim.number: claim for claim in claims(tables, TASK)}
    assert rows[3].passed is False and "(+0.00 pt)" in rows[3].value
    assert rows[2] == Claim(2, "MLL", rows[2].statement, "not run", None)


def test_seed_means_and_per_seed_agreement():
    seed0, seed1 = runs(), runs(mrl_base=0.58)  # seed 1: the full mrl cell costs 2 points, claim 1 fails there
    both = {name: seed0[name] + seed1[name] for name in seed0}
    mean_claim = claims(both, TASK)[0]
    assert mean_claim.value.endswith("full -1.25 pt") and mean_claim.passed is False  # mean of -0.5 and -2.0
    assert seed_agreement([seed0, seed1], TASK) == {1: "1/2", 2: "0/2", 3: "2/2", 4: "2/2"}


def test_full_cell_costs_compare_each_run_s_real_full_cell():
    # The baseline and MRL (MEL sliced afterwards) are also scored untruncated: 10 % above their rank-16 cells. 3dml
    # trains MEL and has no uncompressed cell: its full cell is rank 16.
    tables = {"baseline": [table(0.60, untruncated=1.1)], "mrl": [table(0.595, untruncated=1.1, dim=True)],
              "3dml": [table(0.59, layer=True, dim=True, rank=True)]}
    assert top_cell(tables["baseline"][0]) == "layer_4/dim_64" and uncompressed(tables["baseline"][0])
    assert top_cell(tables["3dml"][0]) == "layer_4/dim_64/rank_16" and not uncompressed(tables["3dml"][0])
    assert top_cell(tables["mrl"][0], dim=8) == "layer_4/dim_8"
    rows = {claim.number: claim for claim in claims(tables, TASK)}
    # 1 at the untruncated cells: dim 8 keeps 80 % vs 50 % of each run's own; full 0.595·1.1 − 0.60·1.1 = −0.55.
    assert rows[1].value == ("d/8 (dim 8): 80.0% vs 50.0% (+30.00 pt); d/16 (dim 4): 60.0% vs 30.0% (+30.00 pt); "
                             "full -0.55 pt")
    # 4: 3dml's rank-16 cell (59) against the baseline untruncated (66), not its rank-16 slice (60).
    assert rows[4].value.endswith("full (layer_4/dim_64/rank_16) -7.00 pt") and rows[4].passed is False
    assert rows[4].value.startswith("higher in 23/24 cells")  # the grid both runs have: ranks 16 and 8


def test_the_claim_rule_reads_the_interval_on_the_claimed_side():
    assert holds(Estimate(0.5, (0.1, 0.9)), above=0) and not holds(Estimate(0.5, (-0.1, 1.1)), above=0)
    assert holds(Estimate(-0.5, (-0.9, -0.1)), above=-1) and not holds(Estimate(-0.5, (-1.2, 0.2)), above=-1)
    assert holds(Estimate(0.0, (-0.9, 0.9)), above=-1, below=1) and not holds(Estimate(0.0, (-0.5, 1.5)), -1, 1)
    assert holds(Estimate(-0.5, None), above=-1)  # no interval: the point estimate decides
    assert Estimate(7.7, (5.1, 10.2)).text() == "+7.70 pt [+5.10, +10.20]" and Estimate(-2, None).text() == "-2.00 pt"


def with_queries(table: dict, spread: float, seed: int, queries: int = 200) -> dict:
    """``table`` with per-query scores of mean exactly each cell's score, ± ``spread`` of noise of its own."""
    noise = np.random.default_rng(seed).normal(0, spread, queries)
    noise -= noise.mean()
    cells = {cell["name"]: (cell["scores"][TASK]["main_score"] + noise).astype(np.float32) for cell in table["cells"]}
    return {**table, "query_scores": {TASK: {"ids": [f"q{i}" for i in range(queries)], "cells": cells}}}


def test_claims_are_decided_by_their_intervals():
    # Little query noise: the intervals are narrow and the verdicts are the point estimates' verdicts.
    narrow = {name: [with_queries(table, 0.01, seed) for table in tables]
              for seed, (name, tables) in enumerate(runs().items())}
    rows = {claim.number: claim for claim in claims(narrow, TASK)}
    assert [rows[number].passed for number in (1, 2, 3, 4)] == [True, False, True, True]
    assert "full -0.50 pt [" in rows[1].value and rows[4].value.startswith("better in 23/24 cells, worse in 1")
    # Much noise: claim 1's full cell costs 0.5 point, but its interval reaches below -1: no longer shown to hold.
    noisy = {name: [with_queries(table, 0.3, seed) for table in tables] for seed, (name, tables) in
             enumerate(runs().items())}
    claim = claims(noisy, TASK)[0]
    low = float(claim.value.split("full -0.50 pt [")[1].split(",")[0])
    assert low < -1 and claim.passed is False
