"""``make runs`` on a small hand-made MLflow store: the table's text, and the MLflow calls it takes to build it."""

import io

import mlflow
import pytest
from mlflow.entities import Metric, Param

from experiments.runs_table import print_runs

# Each run: (experiment, name, status, params, {metric: [(step, value), ...]}); started in this order.
RUNS = [
    ("suite-pair", "baseline", "FINISHED",
     {"name": "baseline", "plugins": "{}", "loss.gather": "full", "optim.lr": "0.001"},
     {"train/loss": [(step, 3.0 - 0.125 * step) for step in range(12)],  # last 10: steps 2..11, mean 2.1875
      "run/device/samples_per_sec": [(step, 100.0 + step) for step in range(12)],  # last 10: mean 106.5
      "run/memory/device/peak_rss_mb": [(11, 512.0)], "train/elapsed_s": [(11, 42.5)]}),
    ("suite-pair", "3dml", "RUNNING",
     {"name": "3dml", "plugins.mrl.dims": "None", "plugins.mll.layers": "None", "loss.gather": "none",
      "optim.lr": "0.001"},
     {"train/loss": [(4, 2.5), (0, 3.5), (2, 3.0)],  # logged every 2 steps, out of order: 5 steps, mean 3.0
      "train/loss_hard": [(0, 1.25), (2, 1.0), (4, 0.75)],
      "final/mean_main_score/full": [(4, 0.875)], "bitext/recall_at_1/layer_4/dim_64": [(4, 0.5)]}),
    ("other", "lone", "FAILED", {"name": "lone", "optim.lr": "0.01"}, {"train/elapsed_s": [(0, 3.0)]}),
]
TABLE = """
MLflow experiment 'suite-pair' ({uri}): 2 runs
run        status     steps   axes      loss.gather    loss   loss_hard   samples/s   peak_MB   wall_s   final/mean_main_score/full
───────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────
baseline   FINISHED      12   none      full          2.188           -       106.5       512     42.5                            -
3dml       RUNNING        5   mll+mrl   none              3           1           -         -        -                        0.875
"""
EMPTY = """
MLflow experiment 'empty' ({uri}): 0 runs
"""
OTHER = """
MLflow experiment 'other' ({uri}): 1 runs
run    status   steps   axes   wall_s
─────────────────────────────────────
lone   FAILED       0   none        3
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('runs_table')}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("empty")
    experiment_ids = {}
    for start_time, (experiment, name, status, params, metrics) in enumerate(RUNS):
        if experiment not in experiment_ids:
            experiment_ids[experiment] = client.create_experiment(experiment)
        run_id = client.create_run(experiment_ids[experiment], start_time=1000 + start_time, run_name=name).info.run_id
        client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()],
                         metrics=[Metric(key, value, timestamp=0, step=step)
                                  for key, history in metrics.items() for step, value in history])
        if status != "RUNNING":
            client.set_terminated(run_id, status)
    return uri


def test_the_runs_table_of_named_experiments(store):
    out = io.StringIO()
    assert print_runs(store, ["empty", "suite-pair"], out) == 2
    assert out.getvalue() == (EMPTY + TABLE).format(uri=store)


def test_the_runs_table_of_all_experiments_skips_those_without_runs(store):
    out = io.StringIO()
    assert print_runs(store, None, out) == 3
    assert out.getvalue() == (OTHER + TABLE).format(uri=store)


def test_the_runs_table_searches_once_and_fetches_only_the_histories_of_tail_columns(store, monkeypatch):
    calls = []
    for method in ("search_experiments", "search_runs", "get_metric_history", "get_run"):
        original = getattr(mlflow.MlflowClient, method)
        monkeypatch.setattr(mlflow.MlflowClient, method,
                            lambda self, *args, _method=method, _original=original, **kwargs:
                            calls.append(_method) or _original(self, *args, **kwargs))
    print_runs(store, None, io.StringIO())
    # baseline: loss and samples/s histories (the loss history also gives its steps); 3dml: loss and loss_hard;
    # lone: none (wall_s is a latest value).
    assert sorted(calls) == ["get_metric_history"] * 4 + ["search_experiments", "search_runs"]
