"""Training wall time, peak memory and throughput, logged next to the losses (data statistics come from the
DataModule)."""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor


def reset_peak_memory(device: torch.device) -> None:
    """Start peak-memory counting afresh: runs of a suite share one process, and model set-up (e.g. MEL's SVD) is
    not training. On Linux writing 5 to /proc/self/clear_refs resets the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: peak_rss_mb falls back to the process-lifetime peak


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB since :func:`reset_peak_memory` (Linux VmHWM), else since start."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RunStats(L.Callback):
    """Logs at every training step (the logger keeps the trainer's logging steps):

    - ``train/elapsed_s``: seconds of training so far, summed over resumed sessions. Saved in checkpoints; the time a
      killed session spent after its last checkpoint is not counted (those steps are recomputed on resume).
    - ``run/memory/device/peak_rss_mb`` (host process) and, on CUDA, ``run/memory/device/peak_cuda_mb``
      (allocated tensors): this device's peaks since this training session started (only global rank 0 logs).

    and once per session ``run/model/trainable_parameters`` (what the optimizer updates; MEL's factors replace the
    word embedding), so a run's cost sits beside its scores.

    Example:
        >>> trainer = L.Trainer(callbacks=[RunStats()], logger=...)
    """

    def __init__(self) -> None:
        self.elapsed_before = 0.0
        self._session_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._session_start = time.perf_counter()
        reset_peak_memory(pl_module.device)
        if trainer.logger is not None:
            trainable = sum(parameter.numel() for parameter in pl_module.parameters() if parameter.requires_grad)
            trainer.logger.log_metrics({"run/model/trainable_parameters": float(trainable)},
                                       step=trainer.global_step)

    def elapsed(self) -> float:
        session = 0.0 if self._session_start is None else time.perf_counter() - self._session_start
        return self.elapsed_before + session

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        metrics = {"train/elapsed_s": self.elapsed(), "run/memory/device/peak_rss_mb": peak_rss_mb()}
        if pl_module.device.type == "cuda":
            metrics["run/memory/device/peak_cuda_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elapsed_before = state_dict["elapsed_s"]
        self._session_start = None


class ThroughputRates(ThroughputMonitor):
    """Lightning's ThroughputMonitor, logging only its rates over the window: ``run/device/<x>_per_sec`` (this
    device) and, on several devices, ``run/<x>_per_sec`` (all devices), for x in batches, samples, items (real
    tokens) and flops (the module's ``flops_per_batch``: model FLOPs, docs/training.md#mfu), and ``train/mfu``: this
    device's model FLOPs per second over its peak (``peak_flops(device)``; the trainer passes
    :func:`lightning_modules.flops.peak_flops`: a GPU's spec bf16 peak, a CPU's measured matmul rate), equal on every
    device of a run. The rates are plumbing (``run/``); the MFU is training's own number (``train/``).

    The running counts it also logs would repeat other metrics or mislabel them: ``train/batches`` is the step,
    ``train/samples`` one device's share of ``run/data/examples/<source>``, ``train/time`` about
    ``train/elapsed_s``, and ``train/lengths`` one device's tokens under a name without ``device``.

    Example:
        >>> rates = ThroughputRates(peak_flops=lambda device: 989.4e12,
        ...                         batch_size_fn=lambda batch: batch["num_queries"], window_size=10)
    """

    def __init__(self, *, peak_flops: Callable[[torch.device], float | None], **monitor_args: Any) -> None:
        super().__init__(**monitor_args)
        self.peak_flops = peak_flops  # passed in: callbacks does not import lightning_modules (the layout's layers)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops(trainer.strategy.root_device)  # instead of Lightning's table (no CPU, other GPU names)
        for throughput in self._throughputs.values():
            throughput.available_flops = peak

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:  # ThroughputMonitor's, filtered
        if not trainer._logger_connector.should_update_logs:
            return
        stage = trainer.state.stage
        rates = {("train/mfu" if key.endswith("mfu") else f"run/{key}"): value
                 for key, value in self._throughputs[stage].compute().items() if key.endswith(("_per_sec", "mfu"))}
        if rates:
            trainer._logger_connector.log_metrics(rates, step=iter_num)
