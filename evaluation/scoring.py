"""Score every cell of the Matryoshka grid on mteb tasks: one encoding per model-side setting (e.g. MEL rank), not
one per cell."""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np
import torch
from tqdm import tqdm

from evaluation.encoding import GridEncoder, intra_op_threads, world
from evaluation.shares import map_shares, usable_processes
from contracts.cells import Cell, cell_name, view_name

log = logging.getLogger(__name__)

TABLE_FORMAT = 1


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restores Python's, NumPy's and torch's (CPU and CUDA) global generators on exit: mteb reseeds them when it
    is imported, when a task is created and when an evaluator starts."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@contextmanager
def preserved_state(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; on exit every submodule's train/eval flag and the global RNGs are what they
    were (weights are never written: no grad, no optimizer; model-side settings are restored by ``applied``)."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        with preserved_rng(), torch.no_grad():
            yield
    finally:
        for submodule, mode in modes:  # per module: a frozen submodule may be in eval mode on purpose
            submodule.training = mode
        _reshard(module)


def _reshard(module: torch.nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward; shard them again, as training
    left them."""
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


def _all_gather(value):
    """``[value of device 0, value of device 1, ...]`` (a one-element list without a process group)."""
    _, world_size = world()
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _merge(results: dict, errors: dict, other_results: dict, other_errors: dict) -> None:
    """Adds another device's or process's cell scores and task errors to ``results`` and ``errors``."""
    for name, cell in other_results.items():
        entry = results.setdefault(name, {"tags": cell["tags"], "bytes": cell["bytes"], "scores": {},
                                          "query_scores": {}})
        entry["scores"].update(cell["scores"])
        entry["query_scores"].update(cell["query_scores"])
    for task, error in other_errors.items():
        errors.setdefault(task, error)


def agreed_tasks(tasks: list) -> list:
    """The tasks every device could load (a task missing on one device would desynchronise the collectives)."""
    everywhere = set.intersection(*(set(names) for names in _all_gather([t.metadata.name for t in tasks])))
    for task in tasks:
        if task.metadata.name not in everywhere:
            log.warning("probe: skipping mteb task %s: its data is missing on some device", task.metadata.name)
    return [task for task in tasks if task.metadata.name in everywhere]


class Prober:
    """Evaluates mteb tasks at every cell (layer, dim, rank, and any axis a plugin adds) of a
    :class:`~lightning_modules.module.MatryoshkaEmbedder`.

    For each model-side setting (:meth:`~lightning_modules.module.MatryoshkaEmbedder.settings`: a MEL rank, an FFN
    width, ...) every probe text is encoded ONCE with all MLL exits; each (layer, dim, ...) cell reads its slice of
    that encoding, re-normalised. The first cell is evaluated on every device
    (texts a task had not announced are encoded then, together); the other cells are spread over the devices, and
    on a CPU device over ``scoring_processes`` processes (this one and forked helpers: mteb scores in one Python
    thread, while training, waiting for the probe, leaves the other cores idle); the scores are gathered, so every
    device holds the full table. The probe never changes weights, train/eval flags, model-side settings or the
    global RNG streams.

    Args:
        module: the model whose plugins define the grid.
        tokenize: the run's :class:`~lightning_modules.embedding_model.TextTokenizer` (tokenizer and e5 prefixes).
        tasks: mteb tasks with their data loaded (see :func:`evaluation.tasks.build_tasks`).
        batch_size: texts per forward on each device.
        model_name: the mteb model name, ``organisation/name``.
        device: where the inputs go; default: the module's parameters' device.
        scoring_processes: processes that score each device's cells, capped at its usable cores (a forked process
            must not touch CUDA, so a CUDA device scores in its own process).

    Example:
        >>> table = Prober(module, datamodule.tokenize, build_tasks(["GettextBitextMining"], "data/gettext",
        ...                ["de", "kk"], 32)).run(step=0)
        >>> table["summary"]["full"]["cell"], len(table["cells"])  # quickstart: 3 exits × 7 dims × 2 ranks
        ('layer_4/dim_384/rank_128', 42)
    """

    def __init__(self, module, tokenize, tasks: list, batch_size: int = 64, model_name: str = "matryoshka-lab/probe",
                 device: torch.device | None = None, scoring_processes: int = 1) -> None:
        self.module, self.tokenize, self.batch_size, self.model_name = module, tokenize, batch_size, model_name
        self.tasks = agreed_tasks(tasks)
        self.device = device if device is not None else next(module.parameters()).device
        self.processes = usable_processes(scoring_processes) if self.device.type == "cpu" else 1
        # Tasks built for the probe announce their texts and roles (query / document): encoded ahead in one pass.
        self.roles = {task.metadata.name: {text: role for role, text in task.probe_inputs()}
                      for task in self.tasks if hasattr(task, "probe_inputs")}

    def _announced_texts(self) -> list[str]:
        from evaluation.grid import prefix

        return [prefix(self.tokenize, role) + text for roles in self.roles.values() for text, role in roles.items()]

    def run(self, step: int, forward_context: Callable[[], AbstractContextManager] = nullcontext,
            query_scores: bool = False, progress: bool = False) -> dict:
        """Scores every cell at training step ``step``; the returned table is identical on every device. With
        ``query_scores`` (final evaluations: they cost ~0.4 ms per retrieval query and cell) the table also holds
        ``query_scores``, ``{task: {"ids": [...], "cells": {cell: per-query main scores}}}`` (see
        :mod:`evaluation.query_scores`; :func:`evaluation.report.write` stores them beside the JSON table).
        ``progress``: a bar ``probe step <n>`` counting the cells scored, ending with the full cell's mean main
        score (on stdout, like Lightning's training bar; one device should show it)."""
        started = time.perf_counter()
        settings = self.module.settings()
        device_rank, world_size = world()
        bar = tqdm(total=len(self.module.cells()), desc=f"probe step {step}", unit="cell", file=sys.stdout,
                   dynamic_ncols=True, leave=True, disable=not progress)
        this_process = os.getpid()
        results: dict[str, dict] = {}
        errors: dict[str, str] = {}
        order: list[str] = []  # the grid's cell order (devices score cells in different orders)
        encoded = 0
        with preserved_state(self.module):
            from evaluation.grid import CellModel, evaluate, model_meta
            from evaluation.query_scores import task_query_scores

            meta = model_meta(self.model_name, f"step-{step}", self.module.backbone.info.hidden_size,
                              sum(p.numel() for p in self.module.parameters()),
                              bool(self.tokenize.query_prefix or self.tokenize.passage_prefix))

            def score_cells(cells: list[tuple[GridEncoder, int]], may_encode: bool) -> tuple[dict, dict]:
                """``(results, errors)`` of these (encoding, cell index) pairs (a helper process returns them)."""
                cell_results: dict[str, dict] = {}
                cell_errors: dict[str, str] = {}
                for encoder, index in cells:
                    for task in self.tasks:
                        name = task.metadata.name
                        if name in errors or name in cell_errors:
                            continue
                        try:  # one thread: scoring multiplies small matrices, where torch's thread pool costs more
                            # than it saves (10× slower with 2 threads on a busy 2-core machine)
                            with intra_op_threads(1):
                                model = CellModel(encoder, index, meta, may_encode, self.roles.get(name))
                                scores = evaluate(model, task, self.batch_size)
                                per_query = task_query_scores(task, model.embed) if query_scores else None
                        except Exception as error:  # noqa: BLE001 - a failing task must not stop training
                            cell = encoder.cache.cells[index] if index < len(encoder.cache.cells) else None
                            where = cell.name if cell is not None else f"cell {index}"
                            cell_errors[name] = f"{type(error).__name__} at {where}: {str(error).strip()[:500]}"
                            log.debug("probe task %s failed", name, exc_info=True)
                            continue
                        cell = encoder.cache.cells[index]
                        entry = cell_results.setdefault(cell.name, {"tags": cell.tags, "bytes": cell.bytes,
                                                                    "scores": {}, "query_scores": {}})
                        entry["scores"][name] = scores
                        if per_query is not None:
                            entry["query_scores"][name] = per_query
                    if os.getpid() == this_process:  # a forked scoring process's cells count when they arrive
                        bar.update()
                return cell_results, cell_errors

            mine: list[tuple[GridEncoder, int]] = []  # the cells this device scores after the warm-ups
            for setting in settings:
                bar.set_postfix_str(f"encoding {cell_name(setting, self.module.full_settings)}")
                encoder = GridEncoder(self.module, self.tokenize, self.batch_size, self.device, forward_context)
                with self.module.applied(setting):
                    encoder.encode_missing(self._announced_texts())
                    # The warm-up cell, on every device: the only one that may encode texts a task had not announced.
                    _merge(results, errors, *score_cells([(encoder, 0)], may_encode=True))
                encoded += encoder.encoded
                order += [cell.name for cell in encoder.cache.cells]
                mine += [(encoder, index) for index in range(1, len(encoder.cache.cells))
                         if index % world_size == device_rank]
            bar.set_postfix_str("scoring")
            # Scoring reads the encodings only, so one fork serves every setting.
            for share in map_shares(lambda cells: score_cells(cells, may_encode=False), mine, self.processes):
                _merge(results, errors, *share)
            for other in _all_gather((results, errors)):
                _merge(results, errors, *other)
        for task, error in errors.items():
            log.error("probe: task %s failed at step %d and is left out of this probe: %s", task, step, error)
        results = {name: results[name] for name in order if name in results}
        table = self._table(step, settings, results, errors, _all_gather(encoded), time.perf_counter() - started)
        full = table["summary"].get("full")
        bar.n = bar.total  # the other devices' and processes' cells
        bar.set_postfix_str(f"mean main score {full['mean_main_score']:.4f} at {full['cell']}" if full
                            else "no scores")
        bar.close()
        return table

    def _table(self, step: int, settings: list, results: dict, errors: dict, encoded: list[int], seconds: float) -> dict:
        from evaluation.query_scores import query_ids

        cells = []
        per_query: dict[str, dict] = {}
        for name, cell in results.items():
            for task in self.tasks:
                vector = cell["query_scores"].get(task.metadata.name)
                if vector is not None and task.metadata.name not in errors:
                    entry = per_query.setdefault(task.metadata.name, {"ids": query_ids(task), "cells": {}})
                    entry["cells"][name] = vector
            # A task that failed anywhere is left out of the whole probe, also from cells scored before it failed.
            scores = {task: values for task, values in cell["scores"].items() if task not in errors}
            if scores:
                mains = [values["main_score"] for values in scores.values()]
                cells.append({"name": name, "tags": cell["tags"], "bytes": cell["bytes"], "scores": scores,
                              "mean_main_score": sum(mains) / len(mains)})
        axes: dict[str, list] = {}
        for cell in cells:
            for key, value in cell["tags"].items():
                if value not in axes.setdefault(key, []):
                    axes[key].append(value)
        return {
            "format": TABLE_FORMAT,
            "step": step,
            "seconds": seconds,
            "settings_encoded": len(settings),
            "texts_encoded_per_device": encoded,
            "axes": axes,
            "full_settings": dict(self.module.full_settings),  # what cell names leave out
            "tasks": {task.metadata.name: {"type": task.metadata.type, "main_score": task.metadata.main_score,
                                           "subsets": list(task.hf_subsets),
                                           "revision": task.metadata.dataset.get("revision")}
                      for task in self.tasks if task.metadata.name not in errors},
            "errors": errors,
            "overlap_dropped": {task.metadata.name: task.overlap_dropped for task in self.tasks
                                if getattr(task, "overlap_dropped", None) is not None},
            "cells": cells,
            "summary": summary(cells),
            **({"query_scores": per_query} if per_query else {}),
        }


def summary(cells: list[dict]) -> dict:
    """The mean main score at the full cell (deepest, most bytes per vector, largest model-side settings) and at the
    cheapest (the smallest of each; see :meth:`~contracts.cells.Cell.size`), labelled ``full`` and
    ``cheapest``; and the same within each value of any non-numeric tag axis (``full/precision_binary``), so a new
    axis gets its summaries without an edit here."""

    def size(cell: dict) -> tuple:
        return Cell(cell["tags"], cell["bytes"]).size()

    groups = {"": cells}
    for cell in cells:
        for key, value in cell["tags"].items():
            if not isinstance(value, (int, float)):
                groups.setdefault(f"/{view_name({key: value})}", []).append(cell)
    return {f"{label}{group}": {"cell": chosen["name"], "mean_main_score": chosen["mean_main_score"]}
            for group, members in groups.items() if members
            for label, chosen in (("full", max(members, key=size)), ("cheapest", min(members, key=size)))}
