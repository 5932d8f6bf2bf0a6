"""``train/mfu`` in every run: the module's model FLOPs per second over the CPU's measured matmul peak."""

import mlflow
import pytest
import torch

from experiments.run import train
from lightning_modules.flops import measured_cpu_peak_flops


def test_a_run_logs_its_mfu(tiny_config):
    config = tiny_config("tiny", ["trainer.max_steps=10", "resume=false"])  # the 10-step throughput window fills
    result = train(config)
    metrics = mlflow.MlflowClient(config.tracking.uri).get_run(result.run_id).data.metrics
    peak = measured_cpu_peak_flops(torch.get_num_threads())
    assert 0 < metrics["train/mfu"] < 1
    assert metrics["train/mfu"] == pytest.approx(metrics["run/device/flops_per_sec"] / peak, rel=1e-6)
    assert "run/device/mfu" not in metrics and "train/device/mfu" not in metrics
