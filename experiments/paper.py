"""``python -m experiments.paper [--suite paper] [--out docs/results.md] [key=value ...]`` (``make paper``): the
paper's claims at small scale, measured.

Runs (or resumes: finished runs end at once) the suite ``experiments/suites/<suite>.yaml``, makes sure every run has
its final probe table (probing its last checkpoint when the end-of-training probe is missing), then writes the
results page FROM THE RUNS: the claims table (each claim of the paper a row per probe domain with its number and
pass/fail, from :func:`evaluation.comparison.compare` over the seeds' mean per cell), the heatmaps of
``3dml − baseline`` per cell (``compare.heatmaps``), the efficiency of each run (from MLflow) and the commands.

Runs are matched to the claims by experiment name without the ``paper_`` prefix (``paper_mel_fixed`` -> ``mel_fixed``);
a claim whose runs are not in the suite is reported as not run.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from evaluation.comparison import CompareError, cell_scores, compare, heatmaps, load_table, table_file
from evaluation.report import FILE_PREFIX
from contracts.cells import view_name

ROLE_PREFIX = "paper_"
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


def grid_cell(axes: dict[str, list], **tags) -> str:
    """The name of the cell with ``tags`` and the largest value of every other axis (``layer_4/dim_32/rank_192``)."""
    return view_name({key: tags.get(key, values[0]) for key, values in axes.items()})


def mean_scores(tables: list[dict], task: str) -> dict[str, float]:
    """``{cell: score}``, the mean over ``tables`` (seeds) of ``task``'s main score, for cells every table has."""
    per_table = [cell_scores(table, task, Path(f"table{index}")) for index, table in enumerate(tables)]
    return {name: sum(scores[name][1] for scores in per_table) / len(per_table)
            for name in per_table[0] if all(name in scores for scores in per_table)}


def share(scores: dict[str, float], cell: str, full: str) -> float:
    """The part of the full cell's score that ``cell`` keeps."""
    return scores[cell] / scores[full] if scores[full] else math.nan


def kept_shares(nested: dict[str, float], other: dict[str, float], cells: dict[str, str], full: str
                ) -> tuple[list[str], bool]:
    """For each ``{label: cell}``: the share of its full-cell score each run keeps there, as text, and whether
    ``nested`` keeps at least :data:`CLEAR_SHARE` more than ``other`` at every one of them."""
    parts, clear = [], True
    for label, cell in cells.items():
        gain = share(nested, cell, full) - share(other, cell, full)
        clear = clear and gain >= CLEAR_SHARE
        parts.append(f"{label}: {share(nested, cell, full):.1%} vs {share(other, cell, full):.1%} ({100 * gain:+.1f})")
    return parts, clear


def claims(runs: dict[str, list[dict]], task: str) -> list[Claim]:
    """The four pass/fail claims of the paper on ``task``'s main score, each side the mean over its tables (seeds).

    Args:
        runs: probe tables per role (``baseline``, ``mrl``, ``mll``, ``mel``, ``mel_fixed``, ``3dml``), all of the
            same grid of cells (the tags layer, dim and rank).
        task: the probe task whose main score is compared.
    """
    missing = [name for name, tables in runs.items() if not tables or task not in tables[0].get("tasks", {})]
    present = {name: tables for name, tables in runs.items() if name not in missing}
    axes = grid([tables[0] for tables in present.values()]) if present else {}
    full = grid_cell(axes) if present else ""
    rows = []

    def needs(*names: str) -> bool:
        return all(name in present for name in names)

    # 1. MRL: the widest ladder widths at or below d/8 and d/16.
    statement = (f"`mrl` keeps ≥ {CLEAR_SHARE:.0%} more of its full-cell score than `baseline` sliced afterwards at "
                 f"d/8 and d/16; full cell costs < {FULL_COST:g} point")
    if needs("baseline", "mrl"):
        base, mrl = mean_scores(present["baseline"], task), mean_scores(present["mrl"], task)
        delta_full = compare(present["baseline"], present["mrl"], task)["deltas"][full]
        width = axes["dim"][0]
        dims = {fraction: max((d for d in axes["dim"] if d <= width / fraction), default=min(axes["dim"]))
                for fraction in (8, 16)}
        parts, clear = kept_shares(mrl, base, {f"d/{fraction} (dim {dim})": grid_cell(axes, dim=dim)
                                               for fraction, dim in dims.items()}, full)
        ok = delta_full > -FULL_COST and clear
        rows.append(Claim(1, "MRL", statement, "; ".join(parts) + f"; full {delta_full:+.2f} pt", ok))
    else:
        rows.append(Claim(1, "MRL", statement, "not run", None))

    # 2. MLL: exits 1 and 2 (the two shallowest) at full width and rank.
    statement = f"`mll` beats `baseline` at exits 1 and 2; full depth costs < {FULL_COST:g} point"
    if needs("baseline", "mll"):
        deltas = compare(present["baseline"], present["mll"], task)["deltas"]
        exits = sorted(axes["layer"])[:2]
        exit_deltas = [deltas[grid_cell(axes, layer=layer)] for layer in exits]
        ok = all(delta > 0 for delta in exit_deltas) and deltas[full] > -FULL_COST
        value = "; ".join(f"exit {layer}: {delta:+.2f} pt" for layer, delta in zip(exits, exit_deltas))
        rows.append(Claim(2, "MLL", statement, f"{value}; full {deltas[full]:+.2f} pt", ok))
    else:
        rows.append(Claim(2, "MLL", statement, "not run", None))

    # 3. MEL: every rank below R, against the fixed-rank factorisation truncated afterwards.
    statement = (f"below R, `mel` keeps ≥ {CLEAR_SHARE:.0%} more of its rank-R score than `mel_fixed` truncated "
                 f"afterwards; at R within {FULL_COST:g} point")
    if needs("mel", "mel_fixed") and "rank" in axes:
        nested, fixed = mean_scores(present["mel"], task), mean_scores(present["mel_fixed"], task)
        delta_full = compare(present["mel_fixed"], present["mel"], task)["deltas"][full]
        parts, clear = kept_shares(nested, fixed, {f"rank {rank}": grid_cell(axes, rank=rank)
                                                   for rank in axes["rank"][1:]}, full)
        ok = abs(delta_full) < FULL_COST and clear
        rows.append(Claim(3, "MEL", statement, "; ".join(parts) + f"; at R {delta_full:+.2f} pt", ok))
    else:
        rows.append(Claim(3, "MEL", statement, "not run", None))

    # 4. 3D-ML against the baseline sliced afterwards, every cell.
    statement = f"`3dml` beats `baseline` sliced afterwards in most cells; full cell costs ≤ {COST_3DML:g} points"
    if needs("baseline", "3dml"):
        result = compare(present["baseline"], present["3dml"], task)
        stats, delta_full = result["groups"]["all"], result["deltas"][full]
        ok = stats["higher"] > stats["cells"] / 2 and delta_full >= -COST_3DML
        rows.append(Claim(4, "3D-ML", statement, f"higher in {stats['higher']}/{stats['cells']} cells (mean "
                          f"{stats['mean_delta']:+.2f} pt, sign p {stats['sign_test_p']:.3f}); "
                          f"full {delta_full:+.2f} pt", ok))
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
        setup: ``suite``, ``steps``, ``seeds``, ``backbone``.
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
              f"seeds in which the claim passes on that seed's runs alone.", ""]
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
    from experiments.run import run_directory

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


def write_results(suite_name: str, args: list[str], out: Path, smoke: bool, suites_dir: Path | None = None,
                  experiments_dir: Path | None = None) -> Path:
    """Runs (or resumes) the suite, probes what is missing and writes the results page ``out`` with its figures in
    ``<out stem>/``. Returns ``out``."""
    from experiments.ablation import SUITES_DIR, run_suite
    from experiments.config import EXPERIMENTS_DIR

    configs = [config for config, _ in run_suite(suite_name, args, suites_dir or SUITES_DIR,
                                                 experiments_dir or EXPERIMENTS_DIR)]
    tables: dict[int, dict[str, list[dict]]] = {}
    run_dirs: dict[str, list[Path]] = {}
    table_files: dict[str, list[Path]] = {}
    for config in configs:
        found = final_table(config)
        if found is None:
            print(f"{config.name} (seed {config.seed}): no checkpoint, left out", file=sys.stderr)
            continue
        tables.setdefault(config.seed, {}).setdefault(role(config.name), []).append(load_table(found[1])[0])
        run_dirs.setdefault(role(config.name), []).append(found[0])
        table_files.setdefault(role(config.name), []).append(found[1])
    runs = {name: [table for seed in tables.values() for table in seed.get(name, [])] for name in run_dirs}
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
            heatmaps(runs["baseline"][0], result, path)  # its title names the runs by their folders
            figures[task] = f"{figures_dir.name}/{path.name}"
    first = configs[0]
    make_args = " ".join(["--suite", suite_name, *args, "--out", str(out)])
    commands = [f'make paper ARGS="{make_args}"   # runs/resumes the suite, probes, writes this page']
    if "baseline" in run_dirs and "3dml" in run_dirs:
        commands += [f"make compare A=\"{' '.join(map(str, run_dirs['baseline']))}\" "
                     f"B=\"{' '.join(map(str, run_dirs['3dml']))}\" ARGS=\"--task {task}\"" for task in tasks]
    setup = {"suite": suite_name, "steps": first.trainer.max_steps, "seeds": sorted(tables),
             "backbone": f"{first.model.source} ({first.model.num_layers or 'all'} blocks), locales "
                         f"{list(first.data.locales)}, batch {first.data.batch_size}"}
    page = render(results, agreement, efficiency(configs, run_dirs), figures, commands, setup, smoke)
    out.write_text(page)
    return out


def main(argv: list[str]) -> int:
    from experiments.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m experiments.paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="paper", help="suite file under experiments/suites (default: paper)")
    parser.add_argument("--out", default="docs/results.md", help="results page (default: docs/results.md)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (after the suite's overrides)")
    options = parser.parse_args(argv)
    smoke = options.suite != "paper" or bool(options.overrides)
    try:
        out = write_results(options.suite, options.overrides, Path(options.out), smoke)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
