"""The probe callback inside a training run, and ``make probe`` on the run's checkpoint."""

import json

import mlflow
import pytest
import torch

from evaluation import latest_table
from evaluation.query_scores import read_query_scores
from experiments.config import compose
from experiments.run import train
from tests.conftest import run_overrides

COMMON = ["trainer.max_steps=4", "data.locales=[de]", "plugins.mll.layers=[2,4]", "plugins.mrl.dims=[32,16]"]
PROBE = ["probe.enabled=true", "probe.every_n_steps=2", "probe.locales=[de,kk]", "probe.max_pairs_per_locale=8",
         "probe.batch_size=16"]


def losses(result, config) -> list[float]:
    history = mlflow.MlflowClient(config.tracking.uri).get_metric_history(result.run_id, "train/loss")
    return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_dir, mlflow_dir):
    """The same tiny run without and with probes (at steps 0, 2 and 4)."""
    results = {}
    for name, extra in (("plain", []), ("probed", PROBE)):
        root = tmp_path_factory.mktemp(name)
        config = compose("tiny", [*run_overrides(root, corpus_dir, mlflow_dir), *COMMON, *extra])
        results[name] = config, train(config)
    return results


def test_probes_leave_the_training_trajectory_unchanged(runs):
    (plain_config, plain), (probed_config, probed) = runs["plain"], runs["probed"]
    assert len(losses(plain, plain_config)) == 4
    assert losses(probed, probed_config) == losses(plain, plain_config)
    plain_state = torch.load(plain.checkpoint, weights_only=False)
    probed_state = torch.load(probed.checkpoint, weights_only=False)
    for name, value in plain_state["state_dict"].items():
        assert torch.equal(probed_state["state_dict"][name], value), name
    assert probed_state["TranslationPairsDataModule"] == plain_state["TranslationPairsDataModule"]


def test_probe_tables_metrics_and_heatmaps(runs):
    config, result = runs["probed"]
    client = mlflow.MlflowClient(config.tracking.uri)
    cell = "GettextBitextMining/layer_4/dim_32/rank_16"  # its main score (accuracy): one chart section per task
    assert [metric.step for metric in client.get_metric_history(result.run_id, cell)] == [0, 2, 4]
    metrics = client.get_run(result.run_id).data.metrics
    for name in ("GettextRetrieval/layer_2/dim_16/rank_8", "GettextRetrieval/recall_at_1/layer_2/dim_16/rank_8",
                 "probe/seconds", "probe/wall_share"):
        assert name in metrics, name
    assert not [key for key in metrics if "ndcg_at_10" in key]  # the main score is not logged twice
    table = latest_table(result.run_dir)
    assert table["step"] == 4 and len(table["cells"]) == 8 and table["errors"] == {}
    assert metrics[cell] == pytest.approx(next(c for c in table["cells"] if c["name"] == cell.split("/", 1)[1])
                                          ["scores"]["GettextBitextMining"]["main_score"])
    assert table["summary"]["full"]["cell"] == "layer_4/dim_32/rank_16"
    artifacts = {artifact.path for artifact in client.list_artifacts(result.run_id, "probe/step_4")}
    suffixes = (".json", ".queries.npz", ".csv", "_rank_16.png", "_rank_8.png")
    assert artifacts == {f"probe/step_4/probe_step_4{suffix}" for suffix in suffixes}
    # only the final probe keeps per-query scores (the mid-training ones stay cheap)
    assert not (result.run_dir / "probe" / "probe_step_2.queries.npz").exists()
    assert set(read_query_scores(result.run_dir / "probe" / "probe_step_4.json")) == {"GettextBitextMining",
                                                                                       "GettextRetrieval"}
    header = (result.run_dir / "probe" / "probe_step_4.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["step", "layer", "dim", "rank", "bytes", "task", "main_score"]
    # the last table also at the run's root under stable names, for MLflow's compare view, with its summary
    root = {artifact.path for artifact in client.list_artifacts(result.run_id)}
    assert {"probe_final.csv", "probe_final_table.json", "probe_final_GettextRetrieval_rank_16.png",
            "probe_final_GettextBitextMining_rank_8.png"} <= root
    assert (result.run_dir / "probe" / "probe_final.csv").read_text() == \
        (result.run_dir / "probe" / "probe_step_4.csv").read_text()
    full = next(c for c in table["cells"] if c["name"] == table["summary"]["full"]["cell"])
    assert metrics["final/mean_main_score/full"] == pytest.approx(full["mean_main_score"])
    assert metrics["final/GettextRetrieval/full"] == pytest.approx(full["scores"]["GettextRetrieval"]["main_score"])
    grid_mean = sum(c["scores"]["GettextRetrieval"]["main_score"] for c in table["cells"]) / len(table["cells"])
    assert metrics["final/GettextRetrieval/grid_mean"] == pytest.approx(grid_mean)
    assert [m.step for m in client.get_metric_history(result.run_id, "final/mean_main_score/grid_mean")] == [4]
    assert client.get_run(result.run_id).data.tags["final.full_cell"] == "layer_4/dim_32/rank_16"


def test_make_probe_on_the_checkpoint_reproduces_the_last_probe(runs, capsys):
    from experiments.probe import main

    config, result = runs["probed"]
    during_training = latest_table(result.run_dir)
    options = [option for option in PROBE if option not in ("probe.enabled=true", "probe.every_n_steps=2")]
    assert main([str(result.checkpoint), "--no-mlflow", *options]) == 0
    again = json.loads((result.run_dir / "probe" / "checkpoint" / "probe_step_4.json").read_text())
    assert latest_table(result.run_dir) == during_training  # written beside the training's tables, not over them
    assert [cell["name"] for cell in again["cells"]] == [cell["name"] for cell in during_training["cells"]]
    for mine, theirs in zip(again["cells"], during_training["cells"]):
        assert mine["mean_main_score"] == pytest.approx(theirs["mean_main_score"], abs=1e-9), mine["name"]
    assert "layer_4/dim_32/rank_16" in capsys.readouterr().out
    assert main([str(result.checkpoint), "data.batch_size=4"]) == 2  # only probe.* settings apply
    capsys.readouterr()
    assert main([str(result.checkpoint), "--no-mlflow", "probe.locales=[zz]"]) == 2  # before: a ValueError traceback
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("config error at `probe.locales`: probe.locales ['zz']: none has")
    assert "locales with probe pairs: " in error and " de, " in error


def test_make_probe_logs_its_table_as_the_runs_final_root_artifacts(runs, capsys):
    from experiments.probe import main

    config, result = runs["probed"]
    options = [option for option in PROBE if option not in ("probe.enabled=true", "probe.every_n_steps=2")]
    assert main([str(result.checkpoint), *options]) == 0
    assert "probe_final.csv and its heatmaps at the run's root" in capsys.readouterr().out
    out = result.run_dir / "probe" / "checkpoint"
    assert (out / "probe_final.csv").read_text() == (out / "probe_step_4.csv").read_text()
    client = mlflow.MlflowClient(config.tracking.uri)
    assert {"probe/checkpoint/step_4/probe_step_4.csv", "probe/checkpoint/step_4/probe_step_4_rank_16.png"} <= \
        {artifact.path for artifact in client.list_artifacts(result.run_id, "probe/checkpoint/step_4")}
    root = {artifact.path for artifact in client.list_artifacts(result.run_id)}
    assert {"probe_final.csv", "probe_final_GettextRetrieval_rank_16.png", "probe_final_GettextRetrieval_rank_8.png"} <= root
    assert "probe_final.json" not in root  # the JSON table stays under probe/.../step_<n>/
