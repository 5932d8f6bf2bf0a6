"""The probe's root-level final artifacts and summary metrics, and the heatmaps' colour bar and run name."""

import csv
import json

import mlflow
import pytest

from evaluation import report
from evaluation.scoring import summary
from contracts.cells import view_name

TASKS = {"Bitext": {"type": "BitextMining", "main_score": "f1", "subsets": ["de-en"]},
         "Retrieval": {"type": "Retrieval", "main_score": "ndcg_at_10", "subsets": ["default"]}}


def cell(layer, dim, rank, bitext, retrieval):
    tags = {"layer": layer, "dim": dim, "rank": rank}
    return {"name": view_name(tags), "tags": tags, "bytes": dim * 4,
            "scores": {"Bitext": {"main_score": bitext, "subsets": {"de-en": bitext}},
                       "Retrieval": {"main_score": retrieval, "subsets": {"default": retrieval}}},
            "mean_main_score": (bitext + retrieval) / 2}


def table():
    # The full cell (2, 16, 32) is not the best: (1, 16, 32) scores 0.75 against 0.7.
    cells = [cell(layer, dim, rank, 0.1 * layer + dim / 100 + rank / 1000, 0.5) for layer in (1, 2)
             for dim in (16, 8) for rank in (32, 16)]
    cells[0] = cell(1, 16, 32, 0.9, 0.6)
    return {"step": 7, "tasks": TASKS, "cells": cells, "summary": summary(cells), "errors": {}, "seconds": 1.0}


def test_final_summary_is_the_full_cell_and_the_grid_mean_per_task():
    logged, tags = report.final_summary(table())
    # full = (2, 16, 32): bitext 0.2 + 0.16 + 0.032 = 0.392, mean with 0.5 = 0.446. Grid mean of bitext: the 8 cells
    # sum 1.2 (layers) + 0.96 (dims) + 0.192 (ranks) = 2.352, with (1, 16, 32)'s 0.292 replaced by 0.9: 2.96 / 8 = 0.37;
    # of retrieval (7 × 0.5 + 0.6) / 8 = 0.5125; of the mean over tasks (0.37 + 0.5125) / 2 = 0.44125.
    assert tags == {"final.full_cell": "layer_2/dim_16/rank_32"}
    assert logged == pytest.approx({
        "final/mean_main_score/full": 0.446, "final/Bitext/full": 0.392, "final/Retrieval/full": 0.5,
        "final/mean_main_score/grid_mean": 0.44125, "final/Bitext/grid_mean": 0.37,
        "final/Retrieval/grid_mean": 0.5125})


def test_log_final_puts_the_csv_one_heatmap_per_task_and_rank_and_the_wide_table_at_the_runs_root(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("report-tests", (tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="demo-run").info.run_id
    files = report.log_final(client, run_id, table(), tmp_path / "probe", "demo-run")
    heatmaps = [f"probe_final_{task}_rank_{rank}.png" for rank in (32, 16) for task in ("Bitext", "Retrieval")]
    assert sorted(path.name for path in files) == sorted(["probe_final.csv", *heatmaps])
    root = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert root == {"probe_final.csv", report.FINAL_TABLE, *heatmaps}
    with open(client.download_artifacts(run_id, "probe_final.csv", str(tmp_path / "back"))) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16 and {row["step"] for row in rows} == {"7"}
    with open(client.download_artifacts(run_id, report.FINAL_TABLE, str(tmp_path / "back"))) as handle:
        wide = json.load(handle)  # mlflow.log_table's format: columns, then one row per cell
    assert wide["columns"] == ["cell", "bytes", "Bitext", "Retrieval", "mean_main_score"] and len(wide["data"]) == 8
    assert wide["data"][0] == ["layer_1/dim_16/rank_32", 64, 0.9, 0.6, 0.75]
    run = client.get_run(run_id)
    assert run.data.metrics["final/mean_main_score/full"] == pytest.approx(0.446)
    assert [m.step for m in client.get_metric_history(run_id, "final/Bitext/full")] == [7]
    assert run.data.tags["final.full_cell"] == "layer_2/dim_16/rank_32"


def test_heatmap_groups_leave_out_axes_at_their_full_setting():
    data = table()
    data["full_settings"] = {"rank": 32}
    assert sorted(report.heatmap_groups(data)) == ["full", "rank_16"]
    del data["full_settings"]  # a table from before the naming rule: every rank named
    assert sorted(report.heatmap_groups(data)) == ["rank_16", "rank_32"]


def test_probe_heatmaps_name_the_run_and_have_a_colour_bar_per_task(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    # Recorded, and an empty file written where the figure would go (the report renames it into place).
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **kwargs: figures.append(figure) or path.write_bytes(b""))
    data = table()
    report.heatmap(data, "rank_32", report.heatmap_groups(data)["rank_32"], tmp_path / "x.png", "quickstart-20261201")
    (figure,) = figures
    assert figure.get_suptitle() == "quickstart-20261201 · step 7 · rank_32"
    panels = [axes for axes in figure.axes if axes.get_title()]
    bars = [axes for axes in figure.axes if not axes.get_title()]
    assert [axes.get_title() for axes in panels] == ["Bitext\nf1", "Retrieval\nndcg_at_10"]
    assert [bar.get_ylabel() for bar in bars] == ["f1", "ndcg_at_10"]
    assert [tick.get_text() for tick in panels[0].get_xticklabels()] == ["16\n64 B", "8\n32 B"]
    assert [tick.get_text() for tick in panels[0].get_yticklabels()] == ["1", "2"]
