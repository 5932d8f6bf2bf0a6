"""The probe's root-level final artifacts and summary metrics, and the heatmaps' colour bar and run name."""

import csv

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


def test_final_summary_names_the_best_full_and_cheapest_cells_and_their_scores():
    logged, tags = report.final_summary(table())
    # full = (2, 16, 32): bitext 0.2 + 0.16 + 0.032 = 0.392, mean with 0.5 = 0.446; cheapest = (1, 8, 16):
    # 0.1 + 0.08 + 0.016 = 0.196, mean 0.348; best = (1, 16, 32): (0.9 + 0.6) / 2 = 0.75
    assert tags == {"final.best_cell": "layer_1/dim_16/rank_32", "final.full_cell": "layer_2/dim_16/rank_32",
                    "final.cheapest_cell": "layer_1/dim_8/rank_16"}
    assert logged == pytest.approx({
        "final/mean_main_score/best": 0.75, "final/Bitext/best": 0.9, "final/Retrieval/best": 0.6,
        "final/mean_main_score/full": 0.446, "final/Bitext/full": 0.392, "final/Retrieval/full": 0.5,
        "final/mean_main_score/cheapest": 0.348, "final/Bitext/cheapest": 0.196, "final/Retrieval/cheapest": 0.5})


def test_log_final_puts_the_csv_and_one_heatmap_per_rank_at_the_runs_root(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("report-tests", (tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="demo-run").info.run_id
    files = report.log_final(client, run_id, table(), tmp_path / "probe", "demo-run")
    assert sorted(path.name for path in files) == ["probe_final.csv", "probe_final_rank_16.png",
                                                   "probe_final_rank_32.png"]
    root = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert root == {"probe_final.csv", "probe_final_rank_16.png", "probe_final_rank_32.png"}
    with open(client.download_artifacts(run_id, "probe_final.csv", str(tmp_path / "back"))) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16 and {row["step"] for row in rows} == {"7"}
    run = client.get_run(run_id)
    assert run.data.metrics["final/mean_main_score/best"] == pytest.approx(0.75)
    assert [m.step for m in client.get_metric_history(run_id, "final/Bitext/full")] == [7]
    assert run.data.tags["final.best_cell"] == "layer_1/dim_16/rank_32"


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
