"""``make ui`` and the end-of-run hint: the URL of an experiment's runs table in MLflow's model-training view, for the
store a run used."""

import mlflow
import pytest

from experiments import mlflow_ui
from experiments.mlflow_ui import experiment_to_open, run_store, runs_page_url, ui_hint


@pytest.fixture
def store(tmp_path):
    """A SQLite store with experiments 'old' (one run) and 'new' (one later run): ``(uri, client, ids, run ids)``."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    ids = {name: client.create_experiment(name, (tmp_path / "artifacts").as_uri()) for name in ("old", "new", "empty")}
    run_ids = {}
    for name in ("old", "new"):
        run_ids[name] = client.create_run(ids[name], run_name=f"{name}-run").info.run_id
    return uri, client, ids, run_ids


def test_the_runs_page_url_selects_the_model_training_view():
    assert runs_page_url("http://127.0.0.1:5000", "7") == \
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert runs_page_url("https://mlflow.example/", None) == \
        "https://mlflow.example/#/experiments?workflowType=machine_learning"


def test_make_ui_saves_the_headline_view_that_its_url_opens(store):
    import json

    uri, client, ids, run_ids = store
    client.log_metric(run_ids["new"], "final/mean_main_score/full", 0.5)
    client.log_metric(run_ids["new"], "final/Retrieval/grid_mean", 0.25)
    client.log_metric(run_ids["new"], "Retrieval/layer_4/dim_64", 0.5)  # a cell: not a headline column
    client.log_metric(run_ids["new"], "train/loss", 2.0)
    key = mlflow_ui.save_headline_view(client, ids["new"])
    assert runs_page_url("http://127.0.0.1:5000", "7", key) == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&viewStateShareKey=matryoshka-lab-headline")
    view = json.loads(client.get_experiment(ids["new"]).tags[f"mlflow.sharedViewState.{key}"])
    assert view["selectedColumns"] == ["tags.`experiment`", "tags.`axes`", "metrics.`train/loss`",
                                       "metrics.`final/mean_main_score/full`", "metrics.`final/Retrieval/grid_mean`"]


def test_make_ui_opens_the_named_experiment_else_the_one_with_the_newest_run(store, tmp_path):
    uri, _, ids, _ = store
    assert experiment_to_open(uri, "old") == ids["old"]
    assert experiment_to_open(uri, None) == ids["new"]
    with pytest.raises(SystemExit, match="no MLflow experiment 'nope' in .*; there are: Default, empty, new, old"):
        experiment_to_open(uri, "nope")
    assert experiment_to_open(f"sqlite:///{tmp_path}/fresh.db", None) is None


def test_a_run_folder_names_its_own_store_and_experiment(tmp_path):
    (tmp_path / "config.yaml").write_text("name: tiny\ntracking:\n  uri: sqlite:////x/mlflow.db\n  experiment: abl\n")
    assert run_store(tmp_path) == ("sqlite:////x/mlflow.db", "abl")
    with pytest.raises(SystemExit, match="not a run folder"):
        run_store(tmp_path / "missing")


def test_the_end_of_run_hint_names_the_exact_command_for_the_runs_store(store, monkeypatch):
    uri, client, ids, run_ids = store
    hint = ui_hint(uri, run_ids["old"], client)
    assert hint == (f"MLflow run {run_ids['old']} in experiment 'old' ({uri}); its runs table:\n"
                    f"  make ui URI={uri} EXP=old    (serves and opens "
                    f"http://127.0.0.1:5000/#/experiments/{ids['old']}/runs?workflowType=machine_learning)")
    monkeypatch.setattr(mlflow_ui, "default_tracking_uri", lambda: uri)  # the project's own store: no URI= needed
    assert f"\n  make ui EXP=old    (serves" in ui_hint(uri, run_ids["old"], client)
    remote = ui_hint("http://10.0.0.5:5000", run_ids["new"], client)  # a server: its own URL, no local UI
    assert remote.endswith(f"\n  http://10.0.0.5:5000/#/experiments/{ids['new']}/runs?workflowType=machine_learning")
