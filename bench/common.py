"""Shared pieces of the benchmarks: interleaved timing, the machine description, models and texts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device,
            warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, measured interleaved (A B A B ...) after ``warmup`` calls each,
    so that load from other processes and clock changes hit every candidate alike."""
    for _ in range(warmup):
        for run in candidates.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory_gib = round(total_kib / 2**20, 1)
    import sentence_transformers
    import transformers

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gib": memory_gib,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }


def compose_variant(experiment: str, overrides: list[str]):
    """The experiment's config with bench overrides (no tracking or data work happens in the benchmarks)."""
    from experiments.config import compose

    return compose(experiment, overrides)


def build_module(config, device: torch.device):
    """``(module, tokenize)`` of a config, in train mode on ``device``."""
    from experiments.run import build

    module, datamodule = build(config)
    return module.to(device).train(), datamodule.tokenize


def translation_texts(corpus_dir: str, count: int,
                      locales: tuple[str, ...] = ("de", "fr", "ru", "hi")) -> list[tuple[str, str]]:
    """``count`` (xx, en) translation pairs from the held-out probe split, round-robin over ``locales``."""
    from datamodules.gettext_corpus import build_gettext_corpus, load_split

    build_gettext_corpus(corpus_dir, progress=False)  # returns at once when already built
    by_locale = [load_split(corpus_dir, "probe", locale) for locale in locales]
    pairs = [(pair.xx, pair.en) for group in zip(*by_locale) for pair in group]
    if len(pairs) < count:
        raise ValueError(f"only {len(pairs)} probe pairs in {corpus_dir} for locales {locales}; lower the text count")
    return pairs[:count]


def weighted_loss(module, batch: dict, step: int) -> torch.Tensor:
    """The training objective of one batch: Σ view weight · contrastive loss of the view, as ``training_step``
    computes it, without Lightning's logging (so it can be timed against plain PyTorch loops)."""
    views = module.views(batch, step)
    return sum(view.weight * sum(terms.values()) for view, terms in zip(views, module.view_losses(views, batch)))


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in module.parameters() if parameter.requires_grad]
