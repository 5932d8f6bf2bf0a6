"""``python -m experiments.paper [--suite paper] [--out PAGE] [--from-tables [DIR]] [key=value ...]``
(``make paper``): the paper's claims at small scale, measured. Only the full suite (``paper``, no overrides)
writes the committed ``docs/results.md`` and says what it replaced; any other suite, or overrides, write
``<output_dir>/suite-<suite>/results.md``.

Runs (or resumes: finished runs end at once) the suite ``experiments/suites/<suite>.yaml``, makes sure every run has
its final probe table (probing its last checkpoint when the end-of-training probe is missing), saves each run's
compact table (main scores, per-query scores, corpus content hashes) with a manifest (setup, efficiency from MLflow,
commands) under ``<out stem>/tables/`` (``docs/results/tables/``), then writes the results page FROM THOSE TABLES:
the claims table (each claim of the paper a row per probe domain with its estimate, 95 % interval and pass/fail,
decided by :func:`holds`, the one rule, written on the page as :data:`RULE`), the heatmaps of ``3dml − baseline``
per cell (``compare.heatmaps``), the efficiency of each run and the commands. ``--from-tables`` writes the page from
saved tables without running anything: the same bytes (``test_the_page_rebuilds_byte_identical_from_its_tables``).

Runs are matched to the claims by experiment name without the ``paper_`` prefix (``paper_mel_fixed`` -> ``mel_fixed``);
a claim whose runs are not in the suite is reported as not run.

The committed ``docs/results.md`` predates saved tables and per-query scores: its runs' tables were never committed,
so it cannot be rebuilt and stays as it is until ``make paper`` re-runs the suite (hours), which saves the tables
and gives every claim its interval.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from evaluation.bootstrap import percentile_interval, resampled_means
from evaluation.comparison import CompareError, cell_scores, compare, heatmaps, load_table, paired_arrays, table_file
from evaluation.query_scores import query_file, write_query_scores
from evaluation.report import FILE_PREFIX, LEGACY_FULL_SETTINGS
from contracts.atomic import write_atomic
from contracts.cells import cell_name

ROLE_PREFIX = "paper_"
FULL_SUITE = "paper"  # the only suite whose page, run without overrides, is the committed one
COMMITTED_PAGE = Path("docs/results.md")
# The probe's retrieval task of each domain: the claims are checked on its main score (nDCG@10).
DOMAINS = {"GettextRetrieval": "gettext UI strings (training's domain)",
           "ManpageRetrieval": "Debian manual pages (out of domain)"}
CLEAR_SHARE = 0.05  # "clearly" / "markedly" more: at least 5 points more of the run's own full-cell score kept
FULL_COST = 1.0  # points an axis may cost at the full cell (claims 1-3)
COST_3DML = 2.0  # points 3D-ML may cost at the full cell (claim 4)


@dataclass
class Claim:
    """One row of the claims table: ``passed`` is None when the runs it needs are missing."""

    number: int
    axis: str
    statement: str
    value: str
    passed: bool | None


def role(experiment: str) -> str:
    return experiment.removeprefix(ROLE_PREFIX)


def grid(tables: list[dict]) -> dict[str, list]:
    """The values of each tag that every table's cells have, largest first (``{"layer": [4, 2, 1], "dim": [...]}``):
    the suite's common grid (a baseline truncated afterwards also has its untruncated setting, which the runs that
    train MEL lack)."""
    per_table = []
    for table in tables:
        values: dict[str, set] = {}
        for cell in table["cells"]:
            for key, value in cell["tags"].items():
                values.setdefault(key, set()).add(value)
        per_table.append(values)
    return {key: sorted(set.intersection(*(values.get(key, set()) for values in per_table)), reverse=True)
            for key in per_table[0]}


def full_settings(tables: list[dict]) -> dict[str, object]:
    """The full settings the tables' cell names leave out (``full_settings``; a table written before the naming rule:
    :data:`~evaluation.report.LEGACY_FULL_SETTINGS`, as :func:`~evaluation.comparison.load_table` renamed its cells)."""
    return {key: value for table in tables for key, value in table.get("full_settings", LEGACY_FULL_SETTINGS).items()}


def grid_cell(axes: dict[str, list], full: dict[str, object], **tags) -> str:
    """The name (by the cell naming rule, ``full``: the full settings) of the cell with ``tags`` and the largest value
    of every other axis (``layer_4/dim_32/rank_192``)."""
    return cell_name({key: tags.get(key, values[0]) for key, values in axes.items()}, full)


def mean_scores(tables: list[dict], task: str) -> dict[str, float]:
    """``{cell: score}``, the mean over ``tables`` (seeds) of ``task``'s main score, for cells every table has."""
    per_table = [cell_scores(table, task, Path(f"table{index}")) for index, table in enumerate(tables)]
    return {name: sum(scores[name][1] for scores in per_table) / len(per_table)
            for name in per_table[0] if all(name in scores for scores in per_table)}


@dataclass(frozen=True)
class Estimate:
    """A measured quantity in points, with its 95 % interval when the tables have per-query scores."""

    value: float
    interval: tuple[float, float] | None

    def text(self) -> str:
        """``+7.7 pt [5.1, 10.2]`` (``+7.7 pt`` without an interval)."""
        return f"{self.value:+.2f} pt" + (f" [{self.interval[0]:+.2f}, {self.interval[1]:+.2f}]" if self.interval else "")


RULE = ("A claim passes when the 95 % interval of each quantity it names lies on the claimed side: \"better\" when "
        "the interval's low end is above 0, \"keeps ≥ 5 points more\" when it is above +5, \"costs < 1 point\" when "
        "the interval's worst (low) end is above −1, \"within 1 point\" when the whole interval lies inside (−1, +1). "
        "Intervals: paired bootstrap over queries, hierarchical over seeds (seeds, then queries), 10,000 resamples. "
        "Without per-query scores (tables probed before they were kept) the point estimate decides and the page says so.")


def holds(estimate: Estimate, above: float | None = None, below: float | None = None) -> bool:
    """THE claim rule (:data:`RULE`, written on the page): the interval (or, without one, the point estimate) lies
    above ``above`` and below ``below``."""
    low, high = estimate.interval or (estimate.value, estimate.value)
    return (above is None or low > above) and (below is None or high < below)


class Evidence:
    """Two roles' scores on one task, each the mean over its tables (seeds), with bootstrap samples of every cell
    when every table has per-query scores (:func:`evaluation.bootstrap.resampled_means`, paired over queries,
    hierarchical over seeds).

    Args:
        a, b: the reference's and the tested role's tables.
        task: the probe task whose main score is compared.
    """

    def __init__(self, a: list[dict], b: list[dict], task: str) -> None:
        self.a, self.b = mean_scores(a, task), mean_scores(b, task)
        self.cells = [cell for cell in self.a if cell in self.b]
        try:
            paired = paired_arrays(a, b, [task], self.cells, ([Path("A")] * len(a), [Path("B")] * len(b)))
        except CompareError:
            self.samples = None
        else:
            self.samples = resampled_means(paired)

    def _estimate(self, statistic) -> Estimate:
        """``statistic(scores of A, scores of B)`` (each indexable by cell, per resample when bootstrapped), in
        points."""
        value = 100 * statistic(self.a, self.b)
        if self.samples is None:
            return Estimate(value, None)
        columns = [{cell: samples[:, index] for index, cell in enumerate(self.cells)} for samples in self.samples]
        low, high = percentile_interval(100 * statistic(*columns))
        return Estimate(value, (float(low), float(high)))

    def difference(self, cell: str) -> Estimate:
        """B − A at ``cell``."""
        return self._estimate(lambda a, b: b[cell] - a[cell])

    def kept_gain(self, cell: str, full: str) -> Estimate:
        """How much more of its own full-cell score B keeps at ``cell`` than A does (points of share)."""
        return self._estimate(lambda a, b: b[cell] / b[full] - a[cell] / a[full])


def kept_shares(evidence: Evidence, cells: dict[str, str], full: str) -> tuple[list[str], bool]:
    """For each ``{label: cell}``: the share of its full-cell score each side keeps and B's gain with its interval,
    as text, and whether B keeps at least :data:`CLEAR_SHARE` more at every one of them (:func:`holds`)."""
    parts, clear = [], True
    for label, cell in cells.items():
        gain = evidence.kept_gain(cell, full)
        clear = clear and holds(gain, above=100 * CLEAR_SHARE)
        parts.append(f"{label}: {evidence.b[cell] / evidence.b[full]:.1%} vs {evidence.a[cell] / evidence.a[full]:.1%} "
                     f"({gain.text()})")
    return parts, clear


def claims(runs: dict[str, list[dict]], task: str) -> list[Claim]:
    """The four pass/fail claims of the paper on ``task``'s main score, each side the mean over its tables (seeds),
    each decided by :func:`holds` on its 95 % intervals.

    Args:
        runs: probe tables per role (``baseline``, ``mrl``, ``mll``, ``mel``, ``mel_fixed``, ``3dml``), all of the
            same grid of cells (the tags layer, dim and rank).
        task: the probe task whose main score is compared.
    """
    missing = [name for name, tables in runs.items() if not tables or task not in tables[0].get("tasks", {})]
    present = {name: tables for name, tables in runs.items() if name not in missing}
    firsts = [tables[0] for tables in present.values()]
    axes, settings = (grid(firsts), full_settings(firsts)) if present else ({}, {})
    full = grid_cell(axes, settings) if present else ""
    rows = []

    def needs(*names: str) -> bool:
        return all(name in present for name in names)

    # 1. MRL: the widest ladder widths at or below d/8 and d/16.
    statement = (f"`mrl` keeps ≥ {CLEAR_SHARE:.0%} more of its full-cell score than `baseline` sliced afterwards at "
                 f"d/8 and d/16; full cell costs < {FULL_COST:g} point")
    if needs("baseline", "mrl"):
        evidence = Evidence(present["baseline"], present["mrl"], task)
        width = axes["dim"][0]
        dims = {fraction: max((d for d in axes["dim"] if d <= width / fraction), default=min(axes["dim"]))
                for fraction in (8, 16)}
        parts, clear = kept_shares(evidence, {f"d/{fraction} (dim {dim})": grid_cell(axes, settings, dim=dim)
                                              for fraction, dim in dims.items()}, full)
        cost = evidence.difference(full)
        rows.append(Claim(1, "MRL", statement, "; ".join(parts) + f"; full {cost.text()}",
                          clear and holds(cost, above=-FULL_COST)))
    else:
        rows.append(Claim(1, "MRL", statement, "not run", None))

    # 2. MLL: exits 1 and 2 (the two shallowest) at full width and rank.
    statement = f"`mll` beats `baseline` at exits 1 and 2; full depth costs < {FULL_COST:g} point"
    if needs("baseline", "mll"):
        evidence = Evidence(present["baseline"], present["mll"], task)
        exits = sorted(axes["layer"])[:2]
        exit_deltas = [evidence.difference(grid_cell(axes, settings, layer=layer)) for layer in exits]
        cost = evidence.difference(full)
        ok = all(holds(delta, above=0) for delta in exit_deltas) and holds(cost, above=-FULL_COST)
        value = "; ".join(f"exit {layer}: {delta.text()}" for layer, delta in zip(exits, exit_deltas))
        rows.append(Claim(2, "MLL", statement, f"{value}; full {cost.text()}", ok))
    else:
        rows.append(Claim(2, "MLL", statement, "not run", None))

    # 3. MEL: every rank below R, against the fixed-rank factorisation truncated afterwards.
    statement = (f"below R, `mel` keeps ≥ {CLEAR_SHARE:.0%} more of its rank-R score than `mel_fixed` truncated "
                 f"afterwards; at R within {FULL_COST:g} point")
    if needs("mel", "mel_fixed") and "rank" in axes:
        evidence = Evidence(present["mel_fixed"], present["mel"], task)
        parts, clear = kept_shares(evidence, {f"rank {rank}": grid_cell(axes, settings, rank=rank)
                                              for rank in axes["rank"][1:]}, full)
        at_rank = evidence.difference(full)
        rows.append(Claim(3, "MEL", statement, "; ".join(parts) + f"; at R {at_rank.text()}",
                          clear and holds(at_rank, above=-FULL_COST, below=FULL_COST)))
    else:
        rows.append(Claim(3, "MEL", statement, "not run", None))

    # 4. 3D-ML against the baseline sliced afterwards, every cell.
    statement = f"`3dml` beats `baseline` sliced afterwards in most cells; full cell costs < {COST_3DML:g} points"
    if needs("baseline", "3dml"):
        result = compare(present["baseline"], present["3dml"], task)
        stats = result["groups"]["all"]
        cost = Evidence(present["baseline"], present["3dml"], task).difference(full)
        if stats["better"] is not None:  # most cells: significantly better (interval above 0) in more than half
            most = stats["better"] > stats["cells"] / 2
            counted = f"better in {stats['better']}/{stats['cells']} cells, worse in {stats['worse']}"
        else:
            most = stats["higher"] > stats["cells"] / 2
            counted = f"higher in {stats['higher']}/{stats['cells']} cells"
        rows.append(Claim(4, "3D-ML", statement, f"{counted} (mean {stats['mean_delta']:+.2f} pt); full {cost.text()}",
                          most and holds(cost, above=-COST_3DML)))
    else:
        rows.append(Claim(4, "3D-ML", statement, "not run", None))
    return rows


def seed_agreement(runs_by_seed: list[dict[str, list[dict]]], task: str) -> dict[int, str]:
    """``{claim: "2/3"}``: in how many seeds the claim passes on that seed's runs alone."""
    outcomes = [claims(runs, task) for runs in runs_by_seed]
    return {claim.number: f"{sum(rows[index].passed is True for rows in outcomes)}/{len(outcomes)}"
            for index, claim in enumerate(outcomes[0])}


def verdict(passed: bool | None) -> str:
    return {True: "pass", False: "**fail**", None: "–"}[passed]


def render(results: dict[str, list[Claim]], agreement: dict[str, dict[int, str]], efficiency: list[dict],
           figures: dict[str, str], commands: list[str], setup: dict, smoke: bool) -> str:
    """The results page (Markdown).

    Args:
        results: claims per probe task (:data:`DOMAINS`), from :func:`claims`.
        agreement: per task, in how many seeds each claim passes alone (:func:`seed_agreement`).
        efficiency: one row per run: ``run``, ``seeds``, ``trainable_parameters``, ``peak_memory_mb``, ``step_s``.
        figures: per task, the path of its ``3dml − baseline`` heatmap relative to the page.
        commands: the commands that produced the page.
        setup: ``suite``, ``steps``, ``seeds``, ``backbone``; ``intervals`` (false: the page says the claims are
            decided by point estimates) and ``corpora`` (``{task: content hashes}``), when known.
        smoke: a smoke configuration: the page says its numbers mean nothing.
    """
    lines = ["# Results: the paper's claims at small scale", "",
             "<!-- Generated by `make paper` (experiments/paper.py) from the runs; do not edit by hand. -->", ""]
    if smoke:
        lines += ["> **SMOKE RUN — not the paper suite.** This page was generated by a tiny configuration to show "
                  "the pipeline end to end; its numbers say nothing about the claims. `make paper` replaces it with "
                  "the real suite's results.", ""]
    lines += [f"Suite `{setup['suite']}`: {setup['backbone']}, {setup['steps']} steps per run, seeds "
              f"{setup['seeds']}; every run probed at the end on the same grid of cells (cells a run did not train "
              f"are sliced afterwards: dims cut, layers cut, rank of U·V or of the embedding's SVD truncated). Scores "
              f"are each task's main score (nDCG@10) in points, each run the mean over its seeds. \"Seeds\" counts the "
              f"seeds in which the claim passes on that seed's runs alone.", "", RULE, ""]
    if not setup.get("intervals", True):
        lines += ["> **No intervals yet.** These tables were probed before per-query scores were kept, so each claim "
                  "is decided by its point estimate; re-running `make paper` (or `make probe` on each run's last "
                  "checkpoint) gives every quantity its 95 % interval.", ""]
    if setup.get("corpora"):
        lines += ["Corpora (content hashes of the probe sets): " + "; ".join(
            f"{task} `{'`, `'.join(hashes)}`" for task, hashes in setup["corpora"].items()) + ".", ""]
    for task, rows in results.items():
        lines += [f"## Claims on {task}: {DOMAINS.get(task, task)}", "",
                  "| # | axis | claim | measured | result | seeds |",
                  "|---|---|---|---|---|---|"]
        for claim in rows:
            lines.append(f"| {claim.number} | {claim.axis} | {claim.statement} | {claim.value} | "
                         f"{verdict(claim.passed)} | {agreement.get(task, {}).get(claim.number, '–')} |")
        lines.append("")
        if task in figures:
            lines += [f"`3dml − baseline` per cell on {task} (points; blue: 3dml higher):", "",
                      f"![3dml − baseline, {task}]({figures[task]})", ""]
    lines += [f"{task} ({domain}) was not probed: no translated manual pages here (`make manpages` installs them)."
              for task, domain in DOMAINS.items() if task not in results and task == "ManpageRetrieval"]
    lines += ["## Claim 5: efficiency (from MLflow)", "",
              "| run | seeds | trainable parameters | peak memory (MiB) | step time (s, fastest seed) |", "|---|---|---:|---:|---:|"]
    for row in efficiency:
        lines.append(f"| {row['run']} | {row['seeds']} | {row['trainable_parameters']:,.0f} | "
                     f"{row['peak_memory_mb']:,.0f} | {row['step_s']:.2f} |")
    lines += ["", "Trainable parameters as the optimizer sees them (MEL's factors replace the word embedding); peak "
              "memory is the process's peak resident memory (CUDA: allocated) during training, the mean over seeds; "
              "step time is the batch size over the last 10-step throughput window, of the fastest seed (other "
              "work on the machine only slows a run down, so the fastest is the least disturbed).", ""]
    failed = [(task, claim) for task, rows in results.items() for claim in rows if claim.passed is False]
    lines += ["## Note", ""]
    if failed:
        lines.append("Failed claims: " + "; ".join(f"{claim.number} ({claim.axis}) on {task}" for task, claim in failed)
                     + f". What was checked: the implementation against the paper's formulas "
                       f"(tests/integration/test_reference_losses.py, tests/unit/test_mrl.py, tests/unit/test_mll.py, "
                       f"tests/unit/test_mel.py); "
                       f"the budget ({setup['steps']} steps, far below the paper's 2 epochs); the seeds (the \"seeds\" "
                       f"column: a claim that passes in some seeds and fails in others is within seed noise).")
    else:
        lines.append("Every claim that was run passes.")
    lines += ["", "## Commands", "", "```", *commands, "```", ""]
    return "\n".join(lines)


def final_table(config: DictConfig) -> tuple[Path, Path] | None:
    """The run folder and its probe table at the last step; a finished run without one (its end-of-training probe
    was interrupted) is probed from its checkpoint first (``make probe``). None if the run has no checkpoint."""
    from experiments import probe
    from experiments.run_folders import run_directory

    run_dir, checkpoint = run_directory(config)
    if checkpoint is None:
        return None
    steps = config.trainer.max_steps
    try:
        file = table_file(run_dir)
    except CompareError:
        file = None
    if file is None or file.stem != f"{FILE_PREFIX}{steps}":
        probe.main([str(checkpoint)])
        file = table_file(run_dir)
    return run_dir, file


def efficiency(configs: list[DictConfig], run_dirs: dict[str, list[Path]]) -> list[dict]:
    """Trainable parameters and peak memory of each run from MLflow (``mlflow.search_runs``), the mean over its
    seeds, and its step time in the fastest seed."""
    import mlflow

    from experiments.tracking import RUN_ID_FILE

    first = configs[0]
    mlflow.set_tracking_uri(first.tracking.uri)
    found = mlflow.search_runs(experiment_names=[first.tracking.experiment])
    rows = []
    for name, dirs in run_dirs.items():
        ids = {(run_dir / RUN_ID_FILE).read_text().strip() for run_dir in dirs if (run_dir / RUN_ID_FILE).is_file()}
        runs = found[found["run_id"].isin(ids)]

        def over_seeds(column: str, how: str = "mean") -> float:
            """The seeds' ``how`` (a pandas aggregation) of ``column`` (or of its name before the ``run/`` prefix,
            for runs logged earlier); NaN when no seed logged it."""
            for name in (column, column.replace("metrics.run/device/", "metrics.train/device/").replace(
                    "metrics.run/", "metrics.system/")):
                if name in runs and runs[name].notna().any():
                    return float(runs[name].agg(how))
            return math.nan

        memory = over_seeds("metrics.run/memory/device/peak_cuda_mb")  # device memory when on CUDA
        if math.isnan(memory):
            memory = over_seeds("metrics.run/memory/device/peak_rss_mb")
        rows.append({"run": name, "seeds": len(runs), "peak_memory_mb": memory,
                     "trainable_parameters": over_seeds("metrics.run/model/trainable_parameters"),
                     "step_s": first.data.batch_size / over_seeds("metrics.run/device/samples_per_sec", "max")})
    return rows


TABLES_DIR = "tables"  # beside the page's figures: docs/results/tables/
MANIFEST = "manifest.json"


def compact_table(table: dict) -> dict:
    """What the page reads of a probe table: its step, tasks (with their corpus revisions), the full settings its cell
    names leave out, and per cell the name,
    tags, bytes, each task's main score and their mean (the per-query scores go to the ``.queries.npz`` beside)."""
    return {"step": table["step"], "tasks": table["tasks"], "summary": table.get("summary", {}),
            **({"full_settings": table["full_settings"]} if "full_settings" in table else {}),
            "cells": [{"name": cell["name"], "tags": cell["tags"], "bytes": cell["bytes"],
                       "scores": {task: {"main_score": scores["main_score"]} for task, scores in cell["scores"].items()},
                       "mean_main_score": cell["mean_main_score"]} for cell in table["cells"]]}


def save_tables(folder: Path, tables: list[tuple[str, int, dict, Path]], manifest: dict) -> Path:
    """Writes each run's compact table (``<role>_seed<seed>.json``) and its per-query scores
    (``.queries.npz``, when it has them) into ``folder``, with ``manifest.json``: ``manifest`` (``setup``,
    ``smoke``, ``commands``, ``efficiency``) plus the list of runs. ``tables``: ``(role, seed, table, run
    folder)``. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    for name, seed, table, run_dir in tables:
        file = folder / f"{name}_seed{seed}.json"
        write_atomic(file, json.dumps(compact_table(table), indent=1) + "\n")
        query_file(file).unlink(missing_ok=True)
        if table.get("query_scores"):
            write_query_scores(query_file(file), table["query_scores"])
        runs.append({"role": name, "seed": seed, "table": file.name, "run_dir": str(run_dir)})
    write_atomic(folder / MANIFEST, json.dumps({**manifest, "runs": runs}, indent=1) + "\n")
    return folder


def suite_folder(config: DictConfig, suite_name: str) -> Path:
    """``<output_dir>/suite-<suite>``, the folder above a suite run's own ``output_dir`` (which may add ``seed_<s>``)."""
    folder = Path(config.output_dir)
    while folder.name != f"suite-{suite_name}" and folder != folder.parent:
        folder = folder.parent
    return folder


def write_page(folder: Path, out: Path) -> Path:
    """Writes the results page ``out`` (and its figures in ``<out stem>/``) from the tables saved by
    :func:`save_tables` in ``folder``: the same page whether the runs were just trained or not (``make paper
    ARGS=--from-tables``). Returns ``out``."""
    manifest = json.loads((folder / MANIFEST).read_text())
    tables: dict[int, dict[str, list[dict]]] = {}
    table_files: dict[str, list[Path]] = {}
    for entry in manifest["runs"]:
        table, file = load_table(folder / entry["table"])
        tables.setdefault(entry["seed"], {}).setdefault(entry["role"], []).append(table)
        table_files.setdefault(entry["role"], []).append(file)
    runs = {name: [table for seed in tables.values() for table in seed.get(name, [])] for name in table_files}
    tasks = [task for task in DOMAINS if any(task in table["tasks"] for tables_ in runs.values() for table in tables_)]
    figures_dir = out.parent / out.stem
    figures_dir.mkdir(parents=True, exist_ok=True)
    results, agreement, figures = {}, {}, {}
    for task in tasks:
        results[task] = claims(runs, task)
        agreement[task] = seed_agreement(list(tables.values()), task)
        if "baseline" in runs and "3dml" in runs:
            path = figures_dir / f"3dml_vs_baseline_{task}.png"
            result = compare(runs["baseline"], runs["3dml"], task, (table_files["baseline"], table_files["3dml"]))
            heatmaps(runs["baseline"][0], result, path)
            figures[task] = f"{figures_dir.name}/{path.name}"
    every = [table for tables_ in runs.values() for table in tables_]
    setup = {**manifest["setup"], "seeds": sorted(tables),
             "intervals": bool(every) and all("query_scores" in table for table in every),
             "corpora": {task: sorted({str(table["tasks"][task].get("revision")) for table in every
                                       if task in table["tasks"]}) for task in tasks}}
    out.write_text(render(results, agreement, manifest["efficiency"], figures, manifest["commands"], setup,
                          manifest["smoke"]))
    return out


def write_results(suite_name: str, args: list[str], out: Path | None, smoke: bool, suites_dir: Path | None = None,
                  experiments_dir: Path | None = None) -> Path:
    """Runs (or resumes) the suite, probes what is missing, saves the runs' compact tables under
    ``<out stem>/tables/`` and writes the results page ``out`` from them (:func:`write_page`; None: the suite's
    ``results.md`` beside its runs, ``<output_dir>/suite-<suite>/results.md``). Returns the page's path."""
    from experiments.ablation import SUITES_DIR, run_suite
    from experiments.config import EXPERIMENTS_DIR

    configs = [config for config, _ in run_suite(suite_name, args, suites_dir or SUITES_DIR,
                                                 experiments_dir or EXPERIMENTS_DIR)]
    out = out or suite_folder(configs[0], suite_name) / "results.md"
    found_tables: list[tuple[str, int, dict, Path]] = []
    run_dirs: dict[str, list[Path]] = {}
    for config in configs:
        found = final_table(config)
        if found is None:
            print(f"{config.name} (seed {config.seed}): no checkpoint, left out", file=sys.stderr)
            continue
        found_tables.append((role(config.name), config.seed, load_table(found[1])[0], found[0]))
        run_dirs.setdefault(role(config.name), []).append(found[0])
    tasks = [task for task in DOMAINS if any(task in table["tasks"] for _, _, table, _ in found_tables)]
    first = configs[0]
    folder = out.parent / out.stem / TABLES_DIR
    make_args = " ".join(["--suite", suite_name, *args, "--out", str(out)])
    commands = [f'make paper ARGS="{make_args}"   # runs/resumes the suite, probes, writes this page',
                f'make paper ARGS="--from-tables --out {out}"   # rebuilds this page from {folder}, no training']
    if "baseline" in run_dirs and "3dml" in run_dirs:
        commands += [f"make compare A=\"{' '.join(map(str, run_dirs['baseline']))}\" "
                     f"B=\"{' '.join(map(str, run_dirs['3dml']))}\" ARGS=\"--task {task}\"" for task in tasks]
    setup = {"suite": suite_name, "steps": first.trainer.max_steps,
             "backbone": f"{first.model.source} ({first.model.num_layers or 'all'} blocks), locales "
                         f"{list(first.data.locales)}, batch {first.data.batch_size}"}
    if out.is_file() and not smoke:
        print(f"replaced {out} and its figures in {out.parent / out.stem}/ (before: {setup_line(out.read_text())}); "
              f"git diff {out} shows what changed")
    save_tables(folder, found_tables, {"setup": setup, "smoke": smoke, "commands": commands,
                                       "efficiency": efficiency(configs, run_dirs)})
    return write_page(folder, out)


def setup_line(page: str) -> str:
    """What a results page measured: the start of its ``Suite ...`` line (suite, backbone, budget, seeds)."""
    line = next((line for line in page.splitlines() if line.startswith("Suite ")), "no setup line")
    return line.split(";")[0]


def page_for(suite: str, overrides: list[str], out: str | None) -> Path | None:
    """The page ``--out`` asks for: :data:`COMMITTED_PAGE` for the full suite by default, the suite's folder under
    ``outputs/`` (None here) for any other suite or with overrides.

    Raises:
        ConfigError: ``--out`` names the committed page for a smoke or partial run.
    """
    from experiments.config import ConfigError

    full = suite == FULL_SUITE and not overrides
    if out is None:
        return COMMITTED_PAGE if full else None
    if not full and Path(out).resolve() == COMMITTED_PAGE.resolve():
        raise ConfigError("--out", f"{out} holds the committed results of the full suite; only `make paper` (suite "
                                   f"{FULL_SUITE}, no overrides) writes it; leave --out out to write this run's page "
                                   f"as <output_dir>/suite-{suite}/results.md")
    return Path(out)


def main(argv: list[str]) -> int:
    from experiments.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m experiments.paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="paper", help="suite file under experiments/suites (default: paper)")
    parser.add_argument("--out", help=f"results page (default: {COMMITTED_PAGE} for the full suite, else "
                                      f"<output_dir>/suite-<suite>/results.md)")
    parser.add_argument("--from-tables", nargs="?", const="", metavar="DIR",
                        help="rebuild the page from saved tables without running anything (default DIR: "
                             "<out stem>/tables, e.g. docs/results/tables)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (after the suite's overrides)")
    options = parser.parse_args(argv)
    smoke = options.suite != FULL_SUITE or bool(options.overrides)
    if options.from_tables is not None:
        out = Path(options.out) if options.out else COMMITTED_PAGE
        folder = Path(options.from_tables) if options.from_tables else out.parent / out.stem / TABLES_DIR
        if not (folder / MANIFEST).is_file():
            print(f"--from-tables: no {MANIFEST} in {folder} (`make paper` saves the runs' tables there)",
                  file=sys.stderr)
            return 2
        if json.loads((folder / MANIFEST).read_text()).get("smoke") and out.resolve() == COMMITTED_PAGE.resolve():
            print(f"--from-tables: {folder} holds a smoke or partial run's tables; {COMMITTED_PAGE} is the full "
                  f"suite's page: pass --out", file=sys.stderr)
            return 2
        print(f"results: {write_page(folder, out)}")
        return 0
    try:
        out = write_results(options.suite, options.overrides, page_for(options.suite, options.overrides, options.out),
                            smoke)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"results: {out}" + (f" (a smoke or partial run: {COMMITTED_PAGE} is left as it is)" if smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
