"""make compare: two probe tables cell by cell, against hand-computed counts, differences and intervals."""

import json
import math

import pytest

import numpy as np

from evaluation.comparison import CompareError, compare, load_table, table_file
from evaluation.query_scores import query_file, write_query_scores
from experiments.compare import default_out, main
from contracts.cells import view_name

TASKS = {"Bitext": {"type": "BitextMining", "main_score": "f1", "subsets": ["de-en"]},
         "Retrieval": {"type": "Retrieval", "main_score": "ndcg_at_10", "subsets": ["default"]}}


def cell(layer, dim, precision, bitext, retrieval):
    tags = {"layer": layer, "dim": dim, "rank": 16, "precision": precision}
    return {"name": view_name(tags), "tags": tags, "bytes": dim * (32 if precision == "fp32" else 1) // 8,
            "scores": {"Bitext": {"main_score": bitext}, "Retrieval": {"main_score": retrieval}},
            "mean_main_score": (bitext + retrieval) / 2}


def table(step, cells):
    return {"step": step, "tasks": TASKS, "cells": cells}


# A: the reference; B: +2 points at (2, 8, fp32), −1 at (1, 8, fp32), +4 at (2, 8, binary), equal at (1, 8, binary).
A = table(10, [cell(2, 8, "fp32", 0.50, 0.70), cell(1, 8, "fp32", 0.40, 0.60),
               cell(2, 8, "binary", 0.30, 0.50), cell(1, 8, "binary", 0.20, 0.40), cell(1, 4, "fp32", 0.1, 0.1)])
B = table(10, [cell(2, 8, "fp32", 0.52, 0.72), cell(1, 8, "fp32", 0.38, 0.60),
               cell(2, 8, "binary", 0.36, 0.52), cell(1, 8, "binary", 0.20, 0.40), cell(4, 8, "fp32", 0.9, 0.9)])


def test_compare_counts_differences_and_ends_per_axis_value():
    result = compare([A], [B])
    assert result["deltas"] == pytest.approx({"layer_2/dim_8/rank_16/precision_fp32": 2.0,
                                              "layer_1/dim_8/rank_16/precision_fp32": -1.0,
                                              "layer_2/dim_8/rank_16/precision_binary": 4.0,
                                              "layer_1/dim_8/rank_16/precision_binary": 0.0})
    assert result["only_a"] == ["layer_1/dim_4/rank_16/precision_fp32"]
    assert result["only_b"] == ["layer_4/dim_8/rank_16/precision_fp32"]
    assert set(result["groups"]) == {"all", "rank_16", "precision_fp32", "precision_binary"}
    everything = result["groups"]["all"]
    assert (everything["cells"], everything["higher"], everything["lower"]) == (4, 2, 1)
    assert everything["mean_delta"] == pytest.approx(5.0 / 4)
    assert (everything["min_delta"], everything["max_delta"]) == pytest.approx((-1.0, 4.0))
    # tables without per-query scores: differences without intervals, and the note says why
    assert result["intervals"] == {} and everything["better"] is None and everything["indistinguishable"] is None
    assert result["intervals_note"].startswith("no intervals: A0 has no per-query scores for Bitext")
    assert everything["full"] == {"cell": "layer_2/dim_8/rank_16/precision_fp32", "delta": pytest.approx(2.0)}
    assert everything["cheapest"] == {"cell": "layer_1/dim_8/rank_16/precision_binary", "delta": pytest.approx(0.0)}
    binary = result["groups"]["precision_binary"]
    assert (binary["cells"], binary["higher"], binary["lower"], binary["mean_delta"]) == (2, 1, 0, pytest.approx(2.0))
    assert binary["full"]["cell"] == "layer_2/dim_8/rank_16/precision_binary"


def test_several_tables_per_side_compare_their_means_over_the_cells_all_of_them_have():
    # Against A: +10 points at (2, 8, fp32), equal at (2, 8, binary); B was +2 and +4 there.
    shifted = table(20, [cell(2, 8, "fp32", 0.60, 0.80), cell(2, 8, "binary", 0.30, 0.50)])
    result = compare([A, A], [B, shifted])
    assert result["deltas"] == pytest.approx({"layer_2/dim_8/rank_16/precision_fp32": (2.0 + 10.0) / 2,
                                              "layer_2/dim_8/rank_16/precision_binary": (4.0 + 0.0) / 2})
    assert result["steps"] == [[10, 10], [10, 20]]
    assert "layer_1/dim_8/rank_16/precision_fp32" in result["only_a"] and result["groups"]["all"]["cells"] == 2


def test_compare_one_task_uses_its_main_score():
    result = compare([A], [B], task="Retrieval")
    assert result["score"] == "Retrieval"
    assert result["deltas"]["layer_2/dim_8/rank_16/precision_binary"] == pytest.approx(2.0)
    assert result["deltas"]["layer_1/dim_8/rank_16/precision_fp32"] == pytest.approx(0.0)
    with pytest.raises(CompareError, match="--task STS: not in .*Bitext, Retrieval"):
        compare([A], [B], task="STS")


def test_tables_without_a_shared_cell_are_refused():
    with pytest.raises(CompareError, match="share no probe cell"):
        compare([A], [table(10, [cell(4, 8, "fp32", 0.9, 0.9)])])


def with_queries(base: dict, offsets: dict[str, np.ndarray], task: str = "Retrieval") -> dict:
    """``base`` with per-query scores of ``task``: each cell's queries are 0.5 + that cell's offsets (default 0)."""
    cells = {entry["name"]: np.float32(0.5) + offsets.get(entry["name"], np.zeros(8, np.float32))
             for entry in base["cells"]}
    return {**base, "query_scores": {task: {"ids": [f"q{i}" for i in range(8)], "cells": cells}}}


FP32 = "layer_2/dim_8/rank_16/precision_fp32"
NARROW = "layer_1/dim_8/rank_16/precision_fp32"
BINARY = "layer_2/dim_8/rank_16/precision_binary"
NOISE = np.array([0.1, -0.1] * 4, np.float32)  # mean 0, so the interval holds 0


def test_paired_intervals_count_cells_better_worse_and_indistinguishable():
    a = with_queries(A, {})
    b = with_queries(B, {FP32: np.full(8, 0.02, np.float32), NARROW: np.full(8, -0.01, np.float32),
                         BINARY: NOISE})
    result = compare([a], [b], task="Retrieval")
    intervals = result["intervals"]
    assert intervals[FP32] == pytest.approx((2.0, 2.0), abs=1e-5)  # a constant difference: zero width
    assert intervals[NARROW] == pytest.approx((-1.0, -1.0), abs=1e-5)
    assert intervals[BINARY][0] < 0 < intervals[BINARY][1]
    assert intervals["layer_1/dim_8/rank_16/precision_binary"] == pytest.approx((0.0, 0.0), abs=1e-6)
    everything = result["groups"]["all"]
    assert (everything["better"], everything["worse"], everything["indistinguishable"]) == (1, 1, 2)
    assert result["groups"]["precision_binary"]["better"] == 0
    assert result["intervals_note"].startswith("95% intervals: paired bootstrap over queries (Retrieval 8;")
    # several tables per side: seeds, then queries
    two = compare([a, a], [b, b], task="Retrieval")
    assert "hierarchical: seeds, then queries (A 2 tables, B 2)" in two["intervals_note"]
    assert two["intervals"][FP32] == pytest.approx((2.0, 2.0), abs=1e-5)
    # other queries on one side cannot be paired
    other = with_queries(B, {})
    other["query_scores"]["Retrieval"]["ids"] = [f"x{i}" for i in range(8)]
    assert compare([a], [other], task="Retrieval")["intervals_note"] == (
        "no intervals: Retrieval: the tables were scored on different queries (another probe set), so their "
        "queries cannot be paired")


def test_mean_main_score_intervals_average_the_tasks():
    offsets = {FP32: np.full(8, 0.04, np.float32)}
    a = with_queries(A, {})
    b = with_queries(B, offsets)
    a["query_scores"].update(with_queries(A, {}, "Bitext")["query_scores"])
    b["query_scores"].update(with_queries(B, {FP32: np.full(8, 0.02, np.float32)}, "Bitext")["query_scores"])
    assert compare([a], [b])["intervals"][FP32] == pytest.approx((3.0, 3.0), abs=1e-5)


def write_table(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def test_a_run_folder_resolves_to_its_latest_checkpoint_probe_else_its_latest_training_probe(tmp_path):
    run = tmp_path / "run"
    write_table(run / "probe" / "probe_step_9.json", A)
    latest_training = write_table(run / "probe" / "probe_step_10.json", A)  # numeric, not text, order
    assert table_file(run) == latest_training
    reprobe = write_table(run / "probe" / "checkpoint" / "probe_step_10.json", B)
    assert table_file(run) == reprobe
    assert table_file(latest_training) == latest_training
    with pytest.raises(CompareError, match="no probe_step_<n>.json in"):
        table_file(tmp_path)
    with pytest.raises(CompareError, match="no such probe table or run folder"):
        table_file(tmp_path / "missing")
    with pytest.raises(CompareError, match="not a probe table"):
        load_table(write_table(tmp_path / "other.json", {"step": 1}))
    broken = table(1, [cell(2, 8, "fp32", 0.5, 0.5), {"name": "x", "tags": {"layer": 1}, "scores": {}}])
    with pytest.raises(CompareError, match=r"cells\[1\] lacks bytes, mean_main_score, tags.dim"):
        load_table(write_table(tmp_path / "broken.json", broken))


def test_main_writes_json_and_heatmaps_and_names_a_bad_path(tmp_path, capsys):
    file_a, file_b = write_table(tmp_path / "a.json", A), write_table(tmp_path / "b.json", B)
    out = tmp_path / "out"
    assert main([str(file_a), "--vs", str(file_b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "precision_binary" in printed and "+2.00" in printed and "no intervals:" in printed
    saved = json.loads((out / "compare.json").read_text())
    assert saved["groups"]["all"]["higher"] == 2 and not math.isnan(saved["groups"]["all"]["mean_delta"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    run_a = tmp_path / "suite" / "posthoc" / "20260101-000000"
    table_a = write_table(run_a / "probe" / "checkpoint" / "probe_step_10.json", A)
    assert default_out([table_a], [file_b, file_b]).as_posix() == \
        f"outputs/compare/posthoc_20260101-000000__vs__{tmp_path.parent.name}_{tmp_path.name}+1"
    assert main([str(tmp_path / "missing"), "--vs", str(file_b)]) == 2
    assert "missing: no such probe table or run folder" in capsys.readouterr().err


def test_main_prints_each_cells_interval_from_the_files_beside_the_tables(tmp_path, capsys):
    files = []
    for name, content in (("a", with_queries(A, {})), ("b", with_queries(B, {FP32: np.full(8, 0.02, np.float32)}))):
        files.append(write_table(tmp_path / f"{name}.json", {k: v for k, v in content.items() if k != "query_scores"}))
        write_query_scores(query_file(files[-1]), content["query_scores"])
    assert main([str(files[0]), "--vs", str(files[1]), "--task", "Retrieval", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()
    # tables without full_settings (written before the naming rule) are read under today's names, which leave fp32
    # out, and so are the per-query scores beside them: the cell keeps its interval
    today = FP32.removesuffix("/precision_fp32")
    assert any(line.split() == [today, "+2.00", "[+2.00,", "+2.00]", "*"] for line in printed), printed
    assert any(line.split()[:2] == ["all", "4"] and line.split()[2:5] == ["1", "0", "3"] for line in printed), printed
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["intervals"][today] == pytest.approx([2.0, 2.0], abs=1e-5)


def test_mlflow_flag_logs_the_comparison_beside_bs_experiment_and_the_runs_table_leaves_it_out(tmp_path, capsys):
    """Before: the comparison ran in B's experiment, and ``make runs`` listed it as a training run."""
    import io

    import mlflow

    from experiments.runs_table import print_runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("abl", (tmp_path / "artifacts").as_uri())
    run_b = client.create_run(experiment, run_name="b-run").info.run_id
    run_dir = tmp_path / "outputs" / "abl" / "20261201-000000"
    write_table(run_dir / "probe" / "probe_step_10.json", B)
    (run_dir / "config.yaml").write_text(f"tracking:\n  uri: {uri}\n  experiment: abl\n")
    (run_dir / "mlflow_run_id").write_text(run_b)
    file_a = write_table(tmp_path / "a.json", A)
    assert main([str(file_a), "--vs", str(run_dir), "--out", str(tmp_path / "out"), "--mlflow"]) == 0
    assert [run.info.run_id for run in client.search_runs([experiment])] == [run_b]  # the training runs only
    (compared,) = client.search_runs([client.get_experiment_by_name("abl/compare").experiment_id])
    assert compared.info.artifact_uri.startswith(f"{(tmp_path / 'artifacts').as_uri()}/compare/")
    assert compared.info.run_name == f"compare {tmp_path.parent.name}_{tmp_path.name} vs abl_20261201-000000"
    assert compared.data.tags["compare.b_run_id"] == run_b and compared.data.tags["compare.a"] == str(file_a)
    assert {artifact.path for artifact in client.list_artifacts(compared.info.run_id)} == {"compare.json",
                                                                                            "compare.png"}
    metrics = compared.data.metrics  # hand-computed above: all 4 common cells, B higher in 2, lower in 1
    assert (metrics["compare/all/higher"], metrics["compare/all/lower"], metrics["compare/all/cells"]) == (2, 1, 4)
    assert metrics["compare/precision_binary/full_delta"] == pytest.approx(4.0)
    assert f"logged as MLflow run {compared.info.run_id}" in capsys.readouterr().out
    assert main([str(file_a), "--vs", str(file_a), "--out", str(tmp_path / "out2"), "--mlflow"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--mlflow" in error and "a.json" in error
    client.create_run(experiment, run_name="older compare", tags={"compare.b": "b.json"})  # as logged before
    table = io.StringIO()
    assert print_runs(uri, out=table) == 1
    assert "MLflow experiment 'abl'" in table.getvalue() and ": 1 runs" in table.getvalue()
    assert "compare" not in table.getvalue()
