"""A run's metric set is what a researcher reads: every value is a real sample of the step it is logged at (a view
of a MEL rank only at the steps that trained that rank), no metric repeats another, the final per-view summary
comes from those samples, and one process of a distributed run reports it."""

import json
import re
from pathlib import Path

import mlflow
import pytest

from experiments import run
from experiments.run import TrainResult, train, train_and_report
from experiments.run_summary import FINAL_WINDOW


# One probe, at the end: a cell's history is then one value, as the headline metrics are (the hardest case for
# telling a repeat from a real metric).
PROBE_AT_END = ["probe.enabled=true", "probe.at_start=false", "probe.every_n_steps=0", "probe.locales=[de,kk]",
                "probe.max_pairs_per_locale=8", "probe.batch_size=16"]
TASKS = ("GettextBitextMining", "GettextRetrieval")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus_dir, mlflow_dir):
    """8 steps of the tiny experiment (MEL ranks 16 and 8), every step logged, probed at the end:
    ``(client, run_id, histories)``."""
    from experiments.config import compose
    from tests.conftest import run_overrides

    root = tmp_path_factory.mktemp("metric_set")
    # MLflow's system-metrics monitor samples every 10 s: on a loaded machine it would add its own metrics (some
    # equal to each other, such as idle network counters) to this run; what this run logs itself is under test.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("experiments.tracking.SYSTEM_METRICS_INTERVAL_S", 3600)
        patch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)  # it would win over the argument
        result = train(compose("tiny", [*run_overrides(root, corpus_dir, mlflow_dir), "trainer.max_steps=8",
                                        "trainer.log_every_n_steps=1", "data.locales=[de]", *PROBE_AT_END]))
    client = mlflow.MlflowClient(f"sqlite:///{mlflow_dir}/mlflow.db")
    histories = {key: sorted((metric.step, metric.value) for metric in client.get_metric_history(result.run_id, key))
                 for key in client.get_run(result.run_id).data.metrics}
    return client, result.run_id, histories


def test_per_view_metrics_are_logged_only_at_steps_that_trained_their_rank(tiny_run):
    _, _, histories = tiny_run
    rank_at = dict(histories["train/mel/rank"])
    assert sorted(rank_at) == list(range(8)) and set(rank_at.values()) == {16.0, 8.0}  # both ranks, every step
    per_view = {key: history for key, history in histories.items() if re.fullmatch(r"train/loss/.*/rank_\d+", key)}
    assert len(per_view) == 2 * 9  # MLL exits 1, 2, 4 x MRL widths 32, 16, 8, per rank
    for key, history in per_view.items():
        rank = float(key.rsplit("_", 1)[1])
        assert [step for step, _ in history] == [step for step, r in rank_at.items() if r == rank], key


def test_no_metric_repeats_another(tiny_run):
    client, run_id, histories = tiny_run
    owners: dict[tuple, list[str]] = {}
    for key, history in histories.items():
        owners.setdefault(tuple(history), []).append(key)
    # Probe scores of a barely trained tiny model on 8 pairs tie between cells (distinct models, one value by
    # chance): such groups are allowed. Any other key in a group is a repeat, except the one alias by design:
    # final/<task>/full is the run's full cell under a key every run shares (its own name, the tag final.full_cell,
    # differs between a MEL run and a baseline). No final/<task>/best, no per-step means.
    full_cell = client.get_run(run_id).data.tags["final.full_cell"]
    assert full_cell == "layer_4/dim_32/rank_16"
    cell_score = re.compile(rf"({'|'.join(TASKS)})/(\w+/)?layer_\d+/dim_\d+/rank_\d+")  # main or other score
    aliases = []
    for keys in owners.values():
        others = [key for key in keys if not cell_score.fullmatch(key)]
        if len(keys) > 1 and others:
            task = others[0].split("/")[1]
            assert others == [f"final/{task}/full"] and f"{task}/{full_cell}" in keys, keys
            aliases.append(others[0])
    assert sorted(aliases) == [f"final/{task}/full" for task in TASKS]
    assert not [key for key in histories if key.endswith("/best") or key.startswith("probe/mean")]
    # one contrastive term (in-batch: the gettext pairs have no hard negatives): no per-term copies of the losses
    assert not [key for key in histories if key.startswith("train/loss_")]


def test_plumbing_sorts_after_headline_metrics(tiny_run):
    _, _, histories = tiny_run
    # one chart section per question: training, each task (one chart per cell), the headline numbers, the probe's
    # and the run's plumbing; system/ is MLflow's own (CPU, memory), in its System metrics tab
    assert {key.split("/")[0] for key in histories} == {"train", *TASKS, "final", "probe", "run"}
    cells = {key.split("/", 1)[1] for key in histories if key.startswith(TASKS[0] + "/")}
    assert len(cells) == 18 and cells == {key.split("/", 2)[2] for key in histories if key.startswith("train/loss/")}
    assert {key for key in histories if "data" in key or "memory" in key} == \
        {key for key in histories if key.startswith(("run/data/", "run/memory/"))}


def test_final_view_losses_average_real_samples(tiny_run, tmp_path):
    client, run_id, histories = tiny_run
    table = json.loads(Path(client.download_artifacts(run_id, "plots/final_view_loss.json", str(tmp_path))).read_text())
    rank_at = dict(histories["train/mel/rank"])
    for view, loss in table["losses"].items():
        rank = float(view.rsplit("_", 1)[1])
        trained = [value for step, value in histories[f"train/loss/{view}"] if rank_at[step] == rank]
        assert loss == pytest.approx(sum(trained[-FINAL_WINDOW:]) / len(trained[-FINAL_WINDOW:])), view


def test_only_global_rank_zero_prints_the_summary(monkeypatch, capsys, tmp_path):
    def finished(is_global_zero: bool):
        return lambda config: TrainResult(tmp_path / "last.ckpt", "run-id", tmp_path, {"train/loss": 1.25}, 3.0,
                                          is_global_zero)

    monkeypatch.setattr(run, "ui_hint", lambda uri, run_id: f"MLflow run {run_id}")  # no store behind "run-id"
    monkeypatch.setattr(run, "train", finished(False))
    assert train_and_report("tiny", []) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(run, "train", finished(True))
    train_and_report("tiny", [])
    assert "final train/loss = 1.2500" in capsys.readouterr().out
