"""The frontier, picking a cell under a budget, and registering it in MLflow's model registry, on a tiny trained run
whose probe table is written by the test (known scores, so the right answers are known)."""

import json

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from evaluation import report
from evaluation.pareto import frontier_rows, pareto
from experiments import frontier as frontier_cli
from experiments import pick
from experiments.config import compose
from experiments.mlflow_logger import RUN_ID_FILE
from experiments.run import train
from lightning_modules.cell_export import load_exported
from tests.conftest import run_overrides

TEXTS = ["Datei öffnen", "The file could not be opened.", "ok", "Файл не найден " * 4]


def score(tags: dict, task: str) -> float:
    """T1 rewards depth, width and rank; T2 ignores the rank (its cells tie across ranks)."""
    value = tags["layer"] / 10 + tags["dim"] / 100
    return value + (tags["rank"] / 1000 if task == "T1" else 0.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir, mlflow_dir):
    root = tmp_path_factory.mktemp("pick")
    config = compose("tiny", [*run_overrides(root, corpus_dir, mlflow_dir), "trainer.max_steps=2",
                              "model.query_prefix='query: '", "model.passage_prefix='passage: '"])
    result = train(config)
    from experiments.loading import load_run

    cells = load_run(result.checkpoint).model.cells()
    table = {"step": 2, "tasks": {"T1": {}, "T2": {}}, "errors": {}, "cells": [
        {"name": cell.name, "tags": cell.tags, "bytes": cell.bytes,
         "scores": {task: {"main_score": score(cell.tags, task), "subsets": {}} for task in ("T1", "T2")},
         "mean_main_score": (score(cell.tags, "T1") + score(cell.tags, "T2")) / 2} for cell in cells]}
    (result.run_dir / "probe").mkdir(exist_ok=True)
    (result.run_dir / "probe" / "probe_step_2.json").write_text(json.dumps({**table, "rows": report.rows(table)}))
    return result.run_dir


def test_pareto_marks_the_cells_no_other_beats_on_cost_and_score():
    points = {"a": (1, 0.5), "b": (2, 0.5), "c": (2, 0.7), "d": (4, 0.6), "e": (4, 0.9)}
    assert pareto(points) == {"a", "c", "e"}  # b: a is cheaper at the same score; d: c is cheaper and better
    rows = frontier_rows({"a": 0.5, "b": 0.6}, {"a": {"params": 10, "flops": 5, "bytes": 8, "latency_ms": None},
                                                 "b": {"params": 10, "flops": 9, "bytes": 4, "latency_ms": 2.0}})
    assert [(row["cell"], row["frontier"]) for row in rows] == [("b", "params flops bytes latency_ms"),
                                                                ("a", "flops")]


@pytest.mark.parametrize("budget, message", [
    ("byte<=128", "'byte<=128'"), ("bytes=128", "'bytes=128'"), ("bytes<=1.2.3", "'bytes<=1.2.3'"),
    ("", "BUDGET is empty"), ("bytes<=1 bytes<=2", "bounds a key twice"),
])
def test_bad_budget_is_one_line_naming_the_allowed_keys(budget, message, capsys):
    assert pick.main(["unused", "--budget", budget]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error and "params, flops, bytes, latency_ms" in error


def test_budget_units_and_strict_bounds():
    bounds = pick.parse_budget("params<=1.5M flops<2k")
    assert bounds == [pick.Bound("params", False, 1.5e6), pick.Bound("flops", True, 2e3)]
    assert [str(bound) for bound in bounds] == ["params<=1.5M", "flops<2k"]  # as written, in messages
    assert bounds[1].allows(1999) and not bounds[1].allows(2000) and bounds[0].allows(1.5e6)


def test_frontier_prints_writes_and_logs_to_the_mlflow_run(run_dir, capsys):
    assert frontier_cli.main([str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "T1: 18 cells" in printed and "* layer_4/dim_32/rank_16" in printed
    rows = json.loads((run_dir / "frontier" / "frontier_T1.json").read_text())["rows"]
    # Measured latency for exactly the cells on an analytic frontier of some task.
    on_analytic = {row["cell"] for row in rows if set(row["frontier"].split()) - {"latency_ms"}}
    on_analytic |= {row["cell"] for row in json.loads((run_dir / "frontier" / "frontier_T2.json").read_text())["rows"]
                    if set(row["frontier"].split()) - {"latency_ms"}}
    assert {row["cell"] for row in rows if row["latency_ms"] is not None} == on_analytic
    # T1: the deepest, widest, largest-rank cell has the best score; the cheapest 8-byte... every bytes level has one
    # frontier cell (the deepest, largest rank at that width).
    bytes_frontier = sorted(row["cell"] for row in rows if "bytes" in row["frontier"].split())
    assert bytes_frontier == ["layer_4/dim_16/rank_16", "layer_4/dim_32/rank_16", "layer_4/dim_8/rank_16"]
    from omegaconf import OmegaConf

    uri = OmegaConf.load(run_dir / "config.yaml").tracking.uri
    client, run_id = MlflowClient(uri), (run_dir / RUN_ID_FILE).read_text().strip()
    assert {"frontier_T1.json", "frontier_T1.png", "frontier_T2.png"} <= {a.path for a in client.list_artifacts(run_id)}
    logged = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "frontier_T1.json", "type": "table"} in logged
    # A second frontier replaces the table instead of appending to it.
    assert frontier_cli.main([str(run_dir), "--no-latency"]) == 0
    table = json.loads(open(client.download_artifacts(run_id, "frontier_T1.json")).read())
    assert len(table["data"]) == 18


def test_pick_takes_the_best_cell_within_the_budget_and_says_why(run_dir, tmp_path, capsys):
    out = tmp_path / "picked"
    assert pick.main([str(run_dir), "--budget", "bytes<=64", "--task", "T1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("picked layer_4/dim_16/rank_16 (score 0.5760, ")
    assert "runner-up: layer_4/dim_16/rank_8 (score 0.5680" in printed and "0.0080 lower" in printed
    assert "of the 12 of 18 cells within bytes<=64" in printed
    assert load_exported(out).get_embedding_dimension() == 16


def test_ties_go_to_the_cheaper_cell(run_dir, tmp_path, capsys):
    # T2 ignores the rank; in factorized mode rank 8 has fewer parameters than rank 16.
    assert pick.main([str(run_dir), "--budget", "bytes<=64", "--task", "T2", "--mode", "factorized",
                      "--out", str(tmp_path / "tie")]) == 0
    assert capsys.readouterr().out.startswith("picked layer_4/dim_16/rank_8 (score 0.5600, ")


def test_latency_bound_measures_and_filters(run_dir, tmp_path, capsys):
    assert pick.main([str(run_dir), "--budget", "latency_ms<=1e9 bytes<64", "--out", str(tmp_path / "l")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("picked layer_4/dim_8/rank_16 (") and "latency_ms " in printed.splitlines()[0]


def test_impossible_budget_exits_non_zero_naming_the_cheapest_cell(run_dir, tmp_path, capsys):
    assert pick.main([str(run_dir), "--budget", "bytes<=16 params<10", "--mode", "factorized",
                      "--out", str(tmp_path / "none")]) == 1
    captured = capsys.readouterr()
    assert not (tmp_path / "none").exists()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and 'no cell of 18 meets BUDGET="bytes<=16 params<10"' in lines[0]
    # Factorized rank 8: 8 · (260 + 32) + 16512 (positions, types, norm) + 8544 (one block) parameters.
    assert "the cheapest is layer_1/dim_8/rank_8 (params 27,392, " in lines[0] and "bytes 32)" in lines[0]


def test_registered_version_loads_through_mlflow_as_the_exported_model(run_dir, tmp_path, capsys):
    out = tmp_path / "registered"
    assert pick.main([str(run_dir), "--budget", "bytes<=64", "--task", "T1", "--out", str(out),
                      "--register", "tiny-small"]) == 0
    assert "registered tiny-small version 1" in capsys.readouterr().out
    from omegaconf import OmegaConf

    uri = OmegaConf.load(run_dir / "config.yaml").tracking.uri
    mlflow.set_tracking_uri(uri)
    client, run_id = MlflowClient(uri), (run_dir / RUN_ID_FILE).read_text().strip()
    version = client.get_model_version("tiny-small", "1")
    assert version.run_id == run_id
    assert version.tags["cell"] == "layer_4/dim_16/rank_16" and version.tags["score.T1"] == "0.5760"
    assert version.tags["cost.bytes"] == "64" and int(version.tags["cost.params"]) > 0
    assert version.tags["prompt.query"] == "query: " and version.tags["budget"] == "bytes<=64"

    exported = load_exported(out)
    sentence_model = mlflow.sentence_transformers.load_model("models:/tiny-small/1")
    assert np.abs(sentence_model.encode_query(TEXTS) - exported.encode_query(TEXTS)).max() <= 1e-5
    assert np.abs(sentence_model.encode_document(TEXTS) - exported.encode_document(TEXTS)).max() <= 1e-5
    # pyfunc: the query prompt by default (the signature's parameter), the passage prompt on request.
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-small/1")
    assert np.abs(np.asarray(pyfunc.predict(TEXTS)) - exported.encode_query(TEXTS)).max() <= 1e-5
    documents = pyfunc.predict(TEXTS, params={"prompt_name": "document"})
    assert np.abs(np.asarray(documents) - exported.encode_document(TEXTS)).max() <= 1e-5
    # The queries differ from unprompted texts: the comparison can fail.
    assert np.abs(exported.encode(TEXTS) - exported.encode_query(TEXTS)).max() > 1e-3

    # make export REGISTER=... adds a version of the same name.
    from experiments import export

    assert export.main([str(run_dir / "checkpoints" / "last.ckpt"), "--cell", "layer_1/dim_8/rank_8", "--out",
                        str(tmp_path / "second"), "--register", "tiny-small"]) == 0
    assert client.get_model_version("tiny-small", "2").tags["cell"] == "layer_1/dim_8/rank_8"


def test_compare_overlays_the_frontiers_of_a_and_b(run_dir, tmp_path, capsys):
    from experiments import compare

    table = run_dir / "probe" / "probe_step_2.json"
    assert compare.main([str(table), "--vs", str(table), "--out", str(tmp_path / "compared")]) == 0
    assert f"frontiers overlaid: {tmp_path / 'compared' / 'frontier_T1.png'}" in capsys.readouterr().out
    assert (tmp_path / "compared" / "frontier_T2.png").stat().st_size > 0
    # A table outside a run folder still compares; the overlay is skipped with one line saying why.
    loose = tmp_path / "probe_step_2.json"
    loose.write_text(table.read_text())
    assert compare.main([str(loose), "--vs", str(table), "--out", str(tmp_path / "loose")]) == 0
    assert "no frontier overlay: " in capsys.readouterr().out
