"""The results page of ``make paper``, written from saved tables only, so ``make paper ARGS=--from-tables`` rebuilds
it byte-identical without training (``test_the_page_rebuilds_byte_identical_from_its_tables``).

Layout of the tables folder (``docs/results/tables/``), one sub-folder per suite of the page::

    <suite>/manifest.json             # setup, smoke, commands, and the runs (with each one's efficiency)
    <suite>/<role>_seed<s>.json       # the run's final table: main scores per cell (compact_table)
    <suite>/<role>_seed<s>.queries.npz   # its per-query scores (the intervals)
    <suite>/<role>_seed<s>.curve.json    # learning curve: main score per probe step and key cell (every_probe)

The first suite (the one with a baseline) gives every claim's row, the heatmaps and the efficiency; any other suite
adds the rows of the claims it can decide (the long MEL pair: claim 3 at its budget) and its learning curves.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from contracts.atomic import write_atomic
from evaluation.claims import RULE, Claim, axes, claims, seed_agreement, top_cell, uncompressed
from evaluation.learning_curves import draw
from evaluation.comparison import compare, heatmaps, load_table
from evaluation.query_scores import query_file, write_query_scores

TABLES_DIR = "tables"  # beside the page's figures: docs/results/tables/
MANIFEST = "manifest.json"
CURVE_SUFFIX = ".curve.json"
VERDICTS = {True: "pass", False: "**fail**", None: "–"}  # a claim's passed: True, False or None (not run)
# The probe's retrieval task of each domain: the claims are checked on its main score (nDCG@10).
DOMAINS = {"GettextRetrieval": "gettext UI strings (training's domain)",
           "ManpageRetrieval": "Debian manual pages (out of domain)"}


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
    has them) and its learning curve (``.curve.json``, when in ``curves``, keyed by ``(role, seed)``) into ``folder``,
    with ``manifest.json``: ``manifest`` (``setup``, ``smoke``, ``commands``) plus the list of runs, each with its
    ``efficiency`` row (``trainable_parameters``, ``peak_memory_mb``, ``step_s``; in the order of ``tables``).
    ``tables``: ``(role, seed, table, run folder)``. The runs of other seeds already saved in ``folder`` with the same
    ``setup`` stay (a suite saved one seed at a time); with another setup they are replaced. Returns the folder."""
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
            for file in folder.iterdir():
                file.unlink()
    runs = []
    for index, (name, seed, table, run_dir) in enumerate(tables):
        file = folder / f"{name}_seed{seed}.json"
        write_atomic(file, json.dumps(compact_table(table), indent=1) + "\n")
        query_file(file).unlink(missing_ok=True)
        if table.get("query_scores"):
            write_query_scores(query_file(file), table["query_scores"])
        if curves and (name, seed) in curves:
            write_atomic(file.with_suffix(CURVE_SUFFIX), json.dumps(curves[name, seed]) + "\n")
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
            curve_file = file.with_suffix(CURVE_SUFFIX)
            if curve_file.is_file():
                self.curves.setdefault(entry["role"], []).append(json.loads(curve_file.read_text()))
        self.runs = {name: [table for seed in self.by_seed.values() for table in seed.get(name, [])]
                     for name in self.files}

    @property
    def setup(self) -> dict:
        return self.manifest["setup"]

    def tasks(self) -> list[str]:
        return [task for task in DOMAINS if any(task in table["tasks"] for tables in self.runs.values()
                                                for table in tables)]


def saved_suites(folder: Path) -> list[SavedSuite]:
    """The suites saved in ``folder`` (one manifest at its root, or one per sub-folder), the one with a baseline
    first."""
    folders = [folder] if (folder / MANIFEST).is_file() else sorted(path.parent for path in folder.glob(f"*/{MANIFEST}"))
    suites = [SavedSuite(path) for path in folders]
    return sorted(suites, key=lambda suite: "baseline" not in suite.runs)


def claims_rows(suites: list[SavedSuite], task: str) -> list[tuple[str, Claim, str]]:
    """``(label, claim, seeds)`` rows of the claims table on ``task``: every claim of the first suite ("not run" where
    its runs are missing), then the claims each other suite decides, labelled with its budget."""
    rows = []
    for index, suite in enumerate(suites):
        if task not in suite.tasks():
            continue
        only_run = index > 0
        agreement = seed_agreement(list(suite.by_seed.values()), task, only_run)
        for claim in claims(suite.runs, task, only_run):
            label = claim.axis if not only_run else f"{claim.axis}, {suite.setup['steps']:,} steps"
            rows.append((label, claim, agreement.get(claim.number, "–")))
    return rows


def overlap_text(suites: list[SavedSuite]) -> str:
    """What the final evaluation left out as training overlap in the claims' tasks, from the first table of each."""
    found = {}
    for suite in suites:
        for tables in suite.runs.values():
            for task, counts in tables[0].get("overlap_dropped", {}).items():
                if task in DOMAINS:
                    found.setdefault(task, counts)
    texts = []
    for task, counts in found.items():
        pairs = sum(count for key, count in counts.items() if key not in ("pool", "pages"))
        text = ", ".join(piece for piece in (f"{pairs:,} pairs" if pairs else "",
                                             f"{counts['pool']:,} pool sentences" if counts.get("pool") else "",
                                             f"{counts['pages']:,} pages" if "pages" in counts else "") if piece)
        texts.append(f"{task} {text or 'nothing'}")
    return "; ".join(texts)


def render(suites: list[SavedSuite], figures: dict[str, str], curve_figures: dict[str, str]) -> str:
    """The results page (Markdown) of the saved ``suites``, with the heatmap ``figures`` per task and the learning
    ``curve_figures`` per suite (paths relative to the page)."""
    first = suites[0]
    lines = ["# Results: the paper's claims at small scale", "",
             "<!-- Generated by `make paper` (experiments/paper.py) from the tables under results/tables; do not edit "
             "by hand. -->", ""]
    if any(suite.manifest["smoke"] for suite in suites):
        lines += ["> **SMOKE RUN — not the paper suite.** This page was generated by a tiny configuration to show "
                  "the pipeline end to end; its numbers say nothing about the claims. `make paper` replaces it with "
                  "the real suite's results.", ""]
    for suite in suites:
        setup = suite.setup
        lines.append(f"Suite `{setup['suite']}`: {setup['backbone']}, {setup['steps']:,} steps per run, seeds "
                     f"{sorted(suite.by_seed)}, runs {', '.join(f'`{role}`' for role in suite.runs)}.")
    saved = {suite.setup["suite"] for suite in suites}
    for name in dict.fromkeys(name for suite in suites for name in suite.manifest.get("page_suites", [])):
        if name not in saved:
            lines.append(f"Suite `{name}`: **not run yet**; its rows and figures appear when `make paper ARGS=\"--suite "
                         f"{name}\"` has saved its tables.")
    lines += ["", "Every run is scored by the final evaluation at the end on the same grid of cells (cells a run did not "
              "train are sliced afterwards: dims cut, layers cut, rank of U·V or of the embedding's SVD truncated). "
              "Scores are each task's main score (nDCG@10) in points, each run the mean over its seeds. \"Seeds\" "
              "counts the seeds in which the claim passes on that seed's runs alone.", "", RULE, ""]
    every = [table for suite in suites for tables in suite.runs.values() for table in tables]
    if not all("query_scores" in table for table in every):
        lines += ["> **No intervals yet.** These tables were probed before per-query scores were kept, so each claim "
                  "is decided by its point estimate; re-running `make paper` (or `make probe` on each run's last "
                  "checkpoint) gives every quantity its 95 % interval.", ""]
    tasks = [task for task in DOMAINS if any(task in suite.tasks() for suite in suites)]
    lines += _evaluation_lines(first, every, tasks, suites)
    rows = {task: claims_rows(suites, task) for task in tasks}
    for task in tasks:
        lines += [f"## Claims on {task}: {DOMAINS[task]}", "",
                  "| # | axis | claim | measured | result | seeds |", "|---|---|---|---|---|---|"]
        lines += [f"| {claim.number} | {label} | {claim.statement} | {claim.value} | {VERDICTS[claim.passed]} | "
                  f"{seeds} |" for label, claim, seeds in rows[task]]
        lines.append("")
        if task in figures:
            lines += [f"`3dml − baseline` per cell on {task} (points; blue: 3dml higher; framed: the 95 % interval "
                      f"excludes 0):", "", f"![3dml − baseline, {task}]({figures[task]})", ""]
    if "ManpageRetrieval" not in tasks:
        lines += ["ManpageRetrieval (Debian manual pages, out of domain) was not probed: no translated manual pages "
                  "here (`make manpages` installs them).", ""]
    for suite in suites:
        if suite.setup["suite"] in curve_figures:
            lines += [f"## Learning curves: suite `{suite.setup['suite']}`", "",
                      "The final evaluation's score of each cell at every probe step (bold: mean over seeds; faint: "
                      "each seed). A verdict whose curves still move at the last step could change with more "
                      "training.", "", f"![learning curves, {suite.setup['suite']}]({curve_figures[suite.setup['suite']]})",
                      ""]
    lines += _efficiency_lines(suites)
    failed = [(task, label, claim) for task in tasks for label, claim, _ in rows[task] if claim.passed is False]
    lines += ["## Note", ""]
    if failed:
        lines.append("Failed claims: " + "; ".join(f"{claim.number} ({label}) on {task}" for task, label, claim in failed)
                     + ". What was checked: the implementation against the paper's formulas "
                       "(tests/integration/test_reference_losses.py, tests/unit/test_mrl.py, tests/unit/test_mll.py, "
                       "tests/unit/test_mel.py); the budget (far below the paper's 2 epochs); the seeds (the \"seeds\" "
                       "column: a claim that passes in some seeds and fails in others is within seed noise).")
    else:
        lines.append("Every claim that was run passes.")
    lines += ["", "## Commands", "", "```", *[command for suite in suites for command in suite.manifest["commands"]],
              "```", ""]
    return "\n".join(lines)


def _evaluation_lines(first: SavedSuite, every: list[dict], tasks: list[str], suites: list[SavedSuite]) -> list[str]:
    """The final evaluation's sets (queries per task, corpus hashes, leakage left out) and the runs' full cells."""
    lines = []
    sizes = []
    for task in tasks:
        table = next(table for table in every if task in table["tasks"])
        queries = len(table.get("query_scores", {}).get(task, {}).get("ids", []))
        sizes.append(f"{task} {queries:,} queries" if queries else task)
    hashes = {task: sorted({str(table["tasks"][task].get("revision")) for table in every if task in table["tasks"]})
              for task in tasks}
    lines += ["Final evaluation: " + "; ".join(sizes) + ". Corpora (content hashes of the probe sets): " + "; ".join(
        f"{task} `{'`, `'.join(found)}`" for task, found in hashes.items()) + "."]
    overlap = overlap_text(suites)
    if overlap:
        lines.append(f"Left out as overlap with the training split (text equal after case, punctuation and whitespace "
                     f"are normalised): {overlap}.")
    compressed = sorted({role for suite in suites for role, tables in suite.runs.items() if not uncompressed(tables[0])})
    if compressed:
        table = next(tables[0] for suite in suites for role, tables in suite.runs.items() if role == compressed[0])
        lines.append(f"No uncompressed cell: {', '.join(f'`{role}`' for role in compressed)} train MEL, which replaces "
                     f"the word embedding by factors of rank {axes(table)['rank'][0]} (d = {axes(table)['dim'][0]}); "
                     f"their full cell is `{top_cell(table)}`. The other runs' full cell is the untruncated "
                     f"`{top_cell(first.runs.get('baseline', [table])[0])}`.")
    return lines + [""]


def _efficiency_lines(suites: list[SavedSuite]) -> list[str]:
    lines = ["## Claim 5: efficiency (from MLflow) and the final evaluation's cost", "",
             "| run | seeds | trainable parameters | peak memory (MiB) | step time (s, fastest seed) | final evaluation "
             "(s, mean) |", "|---|---|---:|---:|---:|---:|"]
    for index, suite in enumerate(suites):
        for role, tables in suite.runs.items():
            rows = [entry.get("efficiency", {}) for entry in suite.manifest["runs"] if entry["role"] == role]

            def over_seeds(key: str, how) -> float:
                values = [row[key] for row in rows if row.get(key) is not None and not math.isnan(row[key])]
                return how(values) if values else math.nan

            seconds = [table["seconds"] for table in tables if table.get("seconds")]
            name = role if index == 0 else f"{role} ({suite.setup['suite']})"
            cost = f"{sum(seconds) / len(seconds):,.0f}" if seconds else "–"
            lines.append(f"| {name} | {len(tables)} | {over_seeds('trainable_parameters', statistics.mean):,.0f} | "
                         f"{over_seeds('peak_memory_mb', statistics.mean):,.0f} | {over_seeds('step_s', min):.2f} | "
                         f"{cost} |")
    return lines + ["", "Trainable parameters as the optimizer sees them (MEL's factors replace the word embedding); "
                    "peak memory is the process's peak resident memory (CUDA: allocated) during training, the mean over "
                    "seeds; step time is the batch size over the last 10-step throughput window, of the fastest seed "
                    "(other work on the machine only slows a run down, so the fastest is the least disturbed); the "
                    "final evaluation's seconds are its wall time at the run's last step, every cell of the grid, "
                    "on this machine's CPU cores.", *_device_lines(suites), ""]


def _device_lines(suites: list[SavedSuite]) -> list[str]:
    """Where each suite's runs measured their step times (the MLflow ``device`` tag: step times on different devices
    or torch thread counts do not compare); nothing for suites saved before the tag was kept."""
    devices = {suite.setup["suite"]: sorted({entry["efficiency"]["device"] for entry in suite.manifest["runs"]
                                              if entry.get("efficiency", {}).get("device")}) for suite in suites}
    measured = [f"`{name}`: {', '.join(found)}" for name, found in devices.items() if found]
    return ["", f"Measured on: {'; '.join(measured)}."] if measured else []


def write_page(folder: Path, out: Path) -> Path:
    """Writes the results page ``out`` (and its figures in ``<out stem>/``) from the tables saved by
    :func:`save_tables` under ``folder``: the same page whether the runs were just trained or not (``make paper
    ARGS=--from-tables``). Returns ``out``."""
    suites = saved_suites(folder)
    first = suites[0]
    figures_dir = out.parent / out.stem
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures, curve_figures = {}, {}
    if "baseline" in first.runs and "3dml" in first.runs:
        for task in first.tasks():
            path = figures_dir / f"3dml_vs_baseline_{task}.png"
            result = compare(first.runs["baseline"], first.runs["3dml"], task,
                             (first.files["baseline"], first.files["3dml"]))
            seeds = {role: ", ".join(str(seed) for seed, roles in sorted(first.by_seed.items()) if role in roles)
                     for role in ("baseline", "3dml")}
            heatmaps(first.runs["baseline"][0], result, path,
                     (f"baseline (seeds {seeds['baseline']})", f"3dml (seeds {seeds['3dml']})"))
            figures[task] = f"{figures_dir.name}/{path.name}"
    for suite in suites:
        if suite.curves:
            path = figures_dir / f"learning_curves_{suite.setup['suite']}.png"
            draw(suite.curves, suite.tasks(), path)
            curve_figures[suite.setup["suite"]] = f"{figures_dir.name}/{path.name}"
    out.write_text(render(suites, figures, curve_figures))
    return out
