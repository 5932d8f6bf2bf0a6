"""The probe on 2 CPU processes (gloo, torchrun) under DDP and FSDP2: both devices encode an equal share of the texts,
rank 0 alone writes and logs the table, and its scores equal one process's."""

import json

import mlflow
import pytest
import torch

from evaluation.scoring import Prober, preserved_rng
from experiments.config import compose
from experiments.mlflow_logger import RUN_ID_FILE
from experiments.run import RUN_DIR_ENV, build
from tests.conftest import run_overrides
from tests.distributed import run_worker

PROBE = ["probe.enabled=true", "probe.every_n_steps=0", "probe.at_end=false", "probe.locales=[de,kk]",
         "probe.max_pairs_per_locale=8", "probe.batch_size=4", "plugins.mll.layers=[2,4]", "plugins.mrl.dims=[32,16]",
         "data.locales=[de]", "trainer.max_steps=1"]


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, corpus_dir, mlflow_dir):
    mlflow.MlflowClient(f"sqlite:///{mlflow_dir}/mlflow.db").search_experiments()  # torchrun's ranks start together:
    # the store must exist before, or both create its tables at once
    return [*run_overrides(tmp_path_factory.mktemp("probe_distributed"), corpus_dir, mlflow_dir), *PROBE]


@pytest.fixture(scope="module")
def reference(overrides, corpus_dir):
    """One process probing the initial weights (1 thread, like each worker: MEL's SVD init depends on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = compose("tiny", overrides)
        module, datamodule = build(config)
        with preserved_rng():
            from evaluation.tasks import build_tasks

            tasks = build_tasks(list(config.probe.tasks), corpus_dir, list(config.probe.locales), 8)
        return Prober(module, datamodule.tokenize, tasks, config.probe.batch_size).run(step=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_probe_equals_one_process(strategy, overrides, reference, tmp_path, mlflow_dir):
    run_dir = tmp_path / "run"
    run_worker("train_worker", tmp_path, *overrides, f"distributed.strategy={strategy}", torchrun=True,
               env={RUN_DIR_ENV: str(run_dir)})
    tables = list((run_dir / "probe").glob("*.json"))
    assert [path.name for path in tables] == ["probe_step_0.json"]
    table = json.loads(tables[0].read_text())
    assert table["errors"] == {} and [c["name"] for c in table["cells"]] == [c["name"] for c in reference["cells"]]
    for mine, one in zip(table["cells"], reference["cells"]):
        for task, scores in one["scores"].items():
            assert mine["scores"][task]["subsets"] == pytest.approx(scores["subsets"], abs=1e-6), (mine["name"], task)
    # Each device encoded its half (the odd text of a pass is padded), not a copy of everything.
    (alone,), (first, second) = reference["texts_encoded_per_device"], table["texts_encoded_per_device"]
    assert first == second and alone <= first + second <= alone + 2 * table["settings_encoded"]
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    history = mlflow.MlflowClient(f"sqlite:///{mlflow_dir}/mlflow.db").get_metric_history(run_id, "probe/seconds")
    assert [metric.step for metric in history] == [0]  # logged once, by rank 0
