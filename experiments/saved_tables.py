"""The tables ``make paper`` saves and its results page is written from (:mod:`experiments.results_page`): one
run's compact final table, its per-query scores and learning curve, and one manifest per suite.

Layout of the tables folder (``docs/results/tables/``), one sub-folder per suite of the page::

    <suite>/manifest.json             # setup, smoke, commands, and the runs (with each one's efficiency)
    <suite>/<role>_seed<s>.json       # the run's final table: main scores per cell (compact_table)
    <suite>/<role>_seed<s>.queries.npz   # its per-query scores (the intervals)
    <suite>/curves/<role>_seed<s>.json   # learning curve: main score per probe step and key cell (every_probe)

The curves have their own folder so that a glob of a role's tables (``make compare A="<suite>/mel_seed*.json"``)
matches tables only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from contracts.atomic import write_atomic
from evaluation.comparison import load_table
from evaluation.query_scores import query_file, write_query_scores

TABLES_DIR = "tables"  # beside the page's figures: docs/results/tables/
MANIFEST = "manifest.json"
CURVES_DIR = "curves"


def tables_lock(folder: Path) -> FileLock:
    """The lock of a tables folder (``docs/results/tables/``): one writer at a time of its manifests and of the page
    written from them, so parts of a suite run side by side (``--seeds 0`` and ``--seeds 1`` in two processes) keep
    each other's runs. The lock file lives in the temp folder, not among the committed tables.

    Example:
        >>> with tables_lock(Path("docs/results/tables")):  # no part of a suite saves while it reads them
        ...     suites = saved_suites(Path("docs/results/tables"))
    """
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"matryoshka-lab-tables-{key}.lock")


def curve_file(table_file: Path) -> Path:
    """Where the learning curve of the run whose compact table is ``table_file`` is saved."""
    return table_file.parent / CURVES_DIR / table_file.name


def compact_table(table: dict) -> dict:
    """What the page reads of a probe table: its step, the final evaluation's seconds, tasks (with their corpus
    revisions), the texts left out as training overlap, the full settings its cell names leave out, and per cell the
    name, tags, bytes, each task's main score and their mean (the per-query scores go to the ``.queries.npz``)."""
    return {"step": table["step"], "seconds": table.get("seconds"), "tasks": table["tasks"],
            "overlap_dropped": table.get("overlap_dropped", {}), "summary": table.get("summary", {}),
            **({"full_settings": table["full_settings"]} if "full_settings" in table else {}),
            "cells": [{"name": cell["name"], "tags": cell["tags"], "bytes": cell["bytes"],
                       "scores": {task: {"main_score": scores["main_score"]} for task, scores in cell["scores"].items()},
                       "mean_main_score": cell["mean_main_score"]} for cell in table["cells"]]}


def save_tables(folder: Path, tables: list[tuple[str, int, dict, Path]], manifest: dict,
                curves: dict[tuple[str, int], dict] | None = None, efficiency: list[dict] | None = None) -> Path:
    """Writes each run's compact table (``<role>_seed<seed>.json``), its per-query scores (``.queries.npz``, when it
    has them) and its learning curve (:func:`curve_file`, when in ``curves``, keyed by ``(role, seed)``) into ``folder``,
    with ``manifest.json``: ``manifest`` (``setup``, ``smoke``, ``commands``) plus the list of runs, each with its
    ``efficiency`` row (``trainable_parameters``, ``peak_memory_mb``, ``step_s``, ``device``; in the order of
    ``tables``). ``tables``: ``(role, seed, table, run folder)``. The runs of other seeds already saved in ``folder`` with the same
    ``setup`` stay (a suite saved one seed at a time, or by parts running side by side: :func:`tables_lock`); with
    another setup they are replaced. Returns the folder."""
    with tables_lock(folder.parent):  # parts of a suite saved side by side keep each other's runs
        folder.mkdir(parents=True, exist_ok=True)
        new = {(name, seed) for name, seed, _, _ in tables}
        kept = []
        if (folder / MANIFEST).is_file():
            before = json.loads((folder / MANIFEST).read_text())
            if before.get("setup") == manifest["setup"]:
                kept = [entry for entry in before["runs"] if (entry["role"], entry["seed"]) not in new
                        and (folder / entry["table"]).is_file()]
            else:
                print(f"{folder}: replacing the saved runs of another setup ({before.get('setup')})")
                shutil.rmtree(folder)
                folder.mkdir()
        runs = []
        for index, (name, seed, table, run_dir) in enumerate(tables):
            file = folder / f"{name}_seed{seed}.json"
            write_atomic(file, json.dumps(compact_table(table), indent=1) + "\n")
            query_file(file).unlink(missing_ok=True)
            if table.get("query_scores"):
                write_query_scores(query_file(file), table["query_scores"])
            curve_file(file).unlink(missing_ok=True)
            if curves and (name, seed) in curves:
                write_atomic(curve_file(file), json.dumps(curves[name, seed]) + "\n")
            runs.append({"role": name, "seed": seed, "table": file.name, "run_dir": str(run_dir),
                         "efficiency": efficiency[index] if efficiency else {}})
        order = {name: index for index, (name, _, _, _) in reversed(list(enumerate(tables)))}
        runs = sorted(kept + runs, key=lambda entry: (entry["seed"], order.get(entry["role"], len(order))))
        write_atomic(folder / MANIFEST, json.dumps({**manifest, "runs": runs}, indent=1) + "\n")
        return folder


class SavedSuite:
    """One suite's saved tables: its manifest, its tables per seed and role, and the learning curves it has."""

    def __init__(self, folder: Path) -> None:
        self.manifest = json.loads((folder / MANIFEST).read_text())
        self.by_seed: dict[int, dict[str, list[dict]]] = {}
        self.files: dict[str, list[Path]] = {}
        self.curves: dict[str, list[dict]] = {}
        for entry in self.manifest["runs"]:
            table, file = load_table(folder / entry["table"])
            self.by_seed.setdefault(entry["seed"], {}).setdefault(entry["role"], []).append(table)
            self.files.setdefault(entry["role"], []).append(file)
            if curve_file(file).is_file():
                self.curves.setdefault(entry["role"], []).append(json.loads(curve_file(file).read_text()))
        self.runs = {name: [table for seed in self.by_seed.values() for table in seed.get(name, [])]
                     for name in self.files}

    @property
    def setup(self) -> dict:
        return self.manifest["setup"]

    def tasks(self) -> list[str]:
        """The tasks its tables were scored on, in the order they first appear."""
        return list(dict.fromkeys(task for tables in self.runs.values() for table in tables for task in table["tasks"]))


def saved_suites(folder: Path) -> list[SavedSuite]:
    """The suites saved in ``folder`` (one manifest at its root, or one per sub-folder), the one with a baseline
    first."""
    folders = [folder] if (folder / MANIFEST).is_file() else sorted(path.parent for path in folder.glob(f"*/{MANIFEST}"))
    suites = [SavedSuite(path) for path in folders]
    return sorted(suites, key=lambda suite: "baseline" not in suite.runs)
