"""The two halves of MFU (model FLOPs utilisation): the analytic model FLOPs of a training step, and the device's
peak FLOP rate. Imports only torch (``bench/gpu_check.py`` uses it without the rest of the project)."""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

# Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity); H200 has H100 SXM's compute. Matched in order
# against the lower-cased device name, so "h100 pcie" comes before "h100".
PEAK_BF16 = (("h200", 989.4e12), ("h100 pcie", 756e12), ("h100", 989.4e12), ("a100", 312e12), ("l40s", 362e12))
CPU_PEAK_SIZE = 512  # square fp32 matmuls: large enough for the BLAS kernel's best rate, a few ms on one core
CPU_PEAK_SECONDS = 0.3


def spec_peak_flops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of a GPU by its name (``torch.cuda.get_device_name``), None if not listed."""
    name = device_name.lower()
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


@functools.cache
def measured_cpu_peak_flops(threads: int) -> float:
    """This machine's dense fp32 matmul peak with ``threads`` torch threads: ``threads`` × the best one-thread rate of
    as many ``CPU_PEAK_SIZE``² matmuls as fit in ``CPU_PEAK_SECONDS``. One thread and the best of many short matmuls,
    because on a shared machine other processes slow some of them, and a multi-threaded matmul waits for its slowest
    thread (on a loaded 2-core machine the 2-thread best was 20x below this). Measured once per process and count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(CPU_PEAK_SIZE, CPU_PEAK_SIZE), torch.randn(CPU_PEAK_SIZE, CPU_PEAK_SIZE)
        torch.mm(a, b)  # first call: kernel selection, page faults
        best, started = float("inf"), time.perf_counter()
        while time.perf_counter() - started < CPU_PEAK_SECONDS:
            tick = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - tick)
    finally:
        torch.set_num_threads(previous)
    return threads * 2 * CPU_PEAK_SIZE**3 / best


def peak_flops(device: torch.device) -> float | None:
    """The peak MFU divides by: a CUDA GPU's spec bf16 peak (None if its name is not in :data:`PEAK_BF16`), or this
    CPU's measured fp32 matmul peak at the current torch thread count."""
    if device.type == "cuda":
        return spec_peak_flops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return measured_cpu_peak_flops(torch.get_num_threads())
    return None


def text_lengths(batch: dict) -> Tensor:
    """Tokens of each text of a padded or packed (``batch["packing"]``) batch, in any order."""
    if batch.get("packing") is not None:
        sequence_ids = batch["packing"]["sequence_ids"]
        return torch.bincount(sequence_ids[sequence_ids >= 0])
    return batch["attention_mask"].sum(1)


def training_flops(lengths: Tensor, dense_parameters: int, num_blocks: int, attention_width: int,
                   view_widths: list[int], num_queries: int, scores_per_query: int) -> int:
    """Model FLOPs of one training step (forward and backward; the backward counts twice the forward)::

        6 · dense_parameters · Σ n                       every token through every weight matrix
      + 12 · num_blocks · attention_width · Σ n²          scores and weighted sum, each text over its own n tokens
      + 6 · num_queries · scores_per_query · Σ widths     every view's similarities (hard negatives, in-batch)

    with n each text's real tokens: padding is not model work, so a packed and a padded batch of the same texts
    have the same count, and recomputation (gradient caching's second forward, activation checkpointing) is not
    counted either.

    Args:
        lengths: tokens of each text.
        dense_parameters: parameters outside the token embedding (a lookup is no matmul).
        attention_width: heads × head dimension.
        view_widths: the width of each view the loss is computed on.
        scores_per_query: similarities per query and view: 1 + hard negatives (hard-negative term), plus the global
            batch's positives (in-batch term).
    """
    lengths = lengths.long()
    return int(6 * dense_parameters * int(lengths.sum()) + 12 * num_blocks * attention_width * int((lengths**2).sum())
               + 6 * num_queries * scores_per_query * sum(view_widths))
