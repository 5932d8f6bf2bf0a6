"""Measured encode latency of exported cells: ms per 1,000 texts of the probe's length distribution, batch 32, padded
as sentence-transformers pads (it sorts the texts by length and pads each batch to its longest text)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from contracts.cells import Cell

TEXTS = 1000
BATCH_SIZE = 32


def probe_texts(config, count: int = TEXTS, seed: int = 0) -> list[str]:
    """``count`` texts drawn (seeded, with replacement when the probe has fewer) from the texts the run's probe
    tasks encode, each with the run's prefix for its role: the lengths the probe's scores were measured on."""
    from evaluation.grid import prefix
    from evaluation.probing import probe_corpus_dir
    from evaluation.scoring import preserved_rng
    from evaluation.tasks import build_tasks

    with preserved_rng():  # mteb reseeds the global generators on import
        tasks = build_tasks(list(config.probe.tasks), probe_corpus_dir(config), list(config.probe.locales),
                            config.probe.max_pairs_per_locale)
        texts = []
        for task in tasks:
            task.load_data()
            texts += [(role, text) for role, text in task.probe_inputs()]
    if not texts:
        raise ValueError("the run's probe tasks have no texts to time")

    class Prefixes:
        query_prefix, passage_prefix = config.model.query_prefix, config.model.passage_prefix

    chosen = np.random.default_rng(seed).choice(len(texts), count, replace=len(texts) < count)
    return [prefix(Prefixes, texts[index][0]) + texts[index][1] for index in chosen]


def encode_latency_ms(sentence_model, texts: list[str], repeats: int = 1) -> float:
    """Milliseconds per 1,000 texts of ``sentence_model.encode(texts, batch_size=32)``, the fastest of ``repeats``
    timed passes after one warm-up batch."""
    sentence_model.encode(texts[:BATCH_SIZE], batch_size=BATCH_SIZE)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        sentence_model.encode(texts, batch_size=BATCH_SIZE)
        best = min(best, time.perf_counter() - started)
    return 1000 * best * 1000 / len(texts)


def encoder_key(model, cell: Cell) -> tuple:
    """What the exported encoder of ``cell`` depends on: its depth and model-side setting (cells that differ only in
    width or precision run the same encoder and share one measurement)."""
    return cell.layer, tuple(model.module.setting_of(cell).items())


def measure(model, cells: list[Cell], texts: list[str], mode: str = "compat", repeats: int = 1,
            known: dict[tuple, float] | None = None) -> dict[str, float]:
    """``{cell name: ms per 1,000 texts}`` of each cell's export (written to a temporary folder and loaded as a user
    would); ``known`` caches measurements by :func:`encoder_key` across calls."""
    from lightning_modules.cell_export import Origin, export_cell, load_exported

    known = {} if known is None else known
    latencies = {}
    for cell in cells:
        key = encoder_key(model, cell)
        if key not in known:
            with tempfile.TemporaryDirectory(prefix="latency-") as folder:
                export_cell(model, Path(folder) / "cell", cell, Origin("latency", "", None, 0, None), mode)
                known[key] = encode_latency_ms(load_exported(Path(folder) / "cell"), texts, repeats)
        latencies[cell.name] = known[key]
    return latencies
