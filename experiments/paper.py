"""``python -m experiments.paper [--suite SUITE] [--out PAGE] [--from-tables [DIR]] [key=value ...]`` (``make paper``):
the paper's claims at small scale, measured. ``make paper`` runs the suites of the committed page, ``paper`` (six
runs × three seeds at 240 steps, every claim) and ``paper_long`` (the long MEL pair, claim 3 at 1,500 steps, with
learning curves), and writes ``docs/results.md``; ``--suite paper_long`` runs one of them and rebuilds the page from
every saved suite. Any other suite, or overrides, write ``<output_dir>/suite-<suite>/results.md`` and never touch
the committed page.

Runs (or resumes: finished runs end at once) each suite ``experiments/suites/<suite>.yaml``, makes sure every run has
its final probe table (probing its last checkpoint when the end-of-training probe is missing), saves each run's
compact table (main scores, per-query scores, learning curve, corpus content hashes) with a manifest (setup,
efficiency from MLflow, commands) under ``<out stem>/tables/<suite>/`` (``docs/results/tables/paper/``), then writes
the results page FROM THOSE TABLES (:mod:`experiments.results_page`; the claims and their one rule:
:mod:`evaluation.claims`). ``--from-tables`` writes the page from saved tables without running anything: the same
bytes (``test_the_committed_page_rebuilds_byte_identical_from_the_committed_tables``).

Runs are matched to the claims by experiment name without the ``paper_`` prefix (``paper_mel_fixed`` -> ``mel_fixed``);
a claim whose runs are not in the suite is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from evaluation.comparison import CompareError, load_table, table_file
from evaluation.report import FILE_PREFIX, PROBE_DIR
from evaluation.learning_curves import curve
from experiments.results_page import write_page
from experiments.saved_tables import MANIFEST, TABLES_DIR, save_tables

ROLE_PREFIX = "paper_"
PAGE_SUITES = ("paper", "paper_long")  # the suites of the committed page, in the order make paper runs them
COMMITTED_PAGE = Path("docs/results.md")
# The page lists `make compare` commands for the first of these (A, B) role pairs a suite has: 3D-ML against the
# baseline (suite paper), nested against fixed-rank MEL (suite paper_long).
COMPARED_PAIRS = (("baseline", "3dml"), ("mel_fixed", "mel"))


def role(experiment: str) -> str:
    return experiment.removeprefix(ROLE_PREFIX)


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


def efficiency(configs: list[DictConfig], run_dirs: list[Path]) -> list[dict]:
    """Per run (in the order of ``configs``): its trainable parameters, peak memory and step time from MLflow
    (``mlflow.search_runs``), NaN for what it did not log, and the device it ran on (its ``device`` tag, with the
    torch threads: step times measured on different devices or thread counts do not compare)."""
    import mlflow

    from experiments.mlflow_logger import RUN_ID_FILE

    first = configs[0]
    mlflow.set_tracking_uri(first.tracking.uri)
    found = mlflow.search_runs(experiment_names=[first.tracking.experiment])
    rows = []
    for config, run_dir in zip(configs, run_dirs):
        run_id = (run_dir / RUN_ID_FILE).read_text().strip() if (run_dir / RUN_ID_FILE).is_file() else None
        logged = found[found["run_id"] == run_id]

        def metric(column: str) -> float:
            """``column`` (or its name before the ``run/`` prefix, for runs logged earlier); NaN when not logged."""
            for name in (column, column.replace("metrics.run/device/", "metrics.train/device/").replace(
                    "metrics.run/", "metrics.system/")):
                if name in logged and logged[name].notna().any():
                    return float(logged[name].iloc[0])
            return math.nan

        devices = logged["tags.device"].dropna() if "tags.device" in logged else ()  # NaN: a run logged before it
        memory = metric("metrics.run/memory/device/peak_cuda_mb")  # device memory when on CUDA
        if math.isnan(memory):
            memory = metric("metrics.run/memory/device/peak_rss_mb")
        rows.append({"trainable_parameters": metric("metrics.run/model/trainable_parameters"),
                     "peak_memory_mb": memory,
                     "step_s": config.data.batch_size / metric("metrics.run/device/samples_per_sec"),
                     "device": devices.iloc[0] if len(devices) else None})
    return rows


def suite_folder(config: DictConfig, suite_name: str) -> Path:
    """``<output_dir>/suite-<suite>``, the folder above a suite run's own ``output_dir`` (which may add ``seed_<s>``)."""
    folder = Path(config.output_dir)
    while folder.name != f"suite-{suite_name}" and folder != folder.parent:
        folder = folder.parent
    return folder


def learning_curve(config: DictConfig, run_dir: Path) -> dict | None:
    """The run's learning curve (:func:`~evaluation.learning_curves.curve` of every probe table of training) when each
    probe was the final evaluation (``probe.final.every_probe``); None otherwise."""
    if not config.probe.final.every_probe:
        return None
    return curve([load_table(file)[0] for file in sorted((run_dir / PROBE_DIR).glob(f"{FILE_PREFIX}*.json"))])


def run_and_save(suite_name: str, args: list[str], out: Path | None, smoke: bool, suites_dir: Path | None = None,
                 experiments_dir: Path | None = None, seeds: list[int] | None = None) -> Path:
    """Runs (or resumes) the suite (only ``seeds`` of its seeds, when given), probes what is missing and saves the
    runs' compact tables under ``<out stem>/tables/<suite>/`` (None: the suite's page beside its runs,
    ``<output_dir>/suite-<suite>/results.md``), beside the saved tables of its other seeds. Returns the page's path."""
    from experiments.ablation import SUITES_DIR, run_suite
    from experiments.config import EXPERIMENTS_DIR

    configs = [config for config, _ in run_suite(suite_name, args, suites_dir or SUITES_DIR,
                                                 experiments_dir or EXPERIMENTS_DIR, seeds)]
    out = out or suite_folder(configs[0], suite_name) / "results.md"
    found_tables: list[tuple[str, int, dict, Path]] = []
    probed: list[DictConfig] = []
    curves = {}
    for config in configs:
        found = final_table(config)
        if found is None:
            print(f"{config.name} (seed {config.seed}): no checkpoint, left out", file=sys.stderr)
            continue
        found_tables.append((role(config.name), config.seed, load_table(found[1])[0], found[0]))
        probed.append(config)
        found_curve = learning_curve(config, found[0])
        if found_curve is not None:
            curves[role(config.name), config.seed] = found_curve
    first = configs[0]
    folder = out.parent / out.stem / TABLES_DIR
    make_args = " ".join(["--suite", suite_name, *args, *(["--out", str(out)] if out != COMMITTED_PAGE else [])])
    commands = [f'make paper ARGS="{make_args}"   # runs/resumes suite {suite_name}, probes, rebuilds the page']
    roles = {name for name, _, _, _ in found_tables}
    pair = next((pair for pair in COMPARED_PAIRS if set(pair) <= roles), None)
    if pair is not None:  # commands on the saved tables: a clone has them
        (a, b), saved = pair, folder / suite_name
        commands += [f'make compare A="{saved}/{a}_seed*.json" B="{saved}/{b}_seed*.json" ARGS="--task {task}"'
                     for task in ("GettextRetrieval", "ManpageRetrieval")
                     if any(task in table["tasks"] for _, _, table, _ in found_tables)]
    setup = {"suite": suite_name, "steps": first.trainer.max_steps,
             "backbone": f"{first.model.source} ({first.model.num_layers or 'all'} blocks), locales "
                         f"{list(first.data.locales)}, batch {first.data.batch_size}"}
    manifest = {"setup": setup, "smoke": smoke, "commands": commands}
    if not smoke:  # the page says which of its suites are not saved yet
        manifest["page_suites"] = list(PAGE_SUITES)
    save_tables(folder / suite_name, found_tables, manifest, curves,
                efficiency(probed, [run_dir for _, _, _, run_dir in found_tables]))
    return out


def write_results(suites: list[str], args: list[str], out: Path | None, smoke: bool, suites_dir: Path | None = None,
                  experiments_dir: Path | None = None, seeds: list[int] | None = None) -> Path:
    """Runs and saves each suite (:func:`run_and_save`; only ``seeds``, when given), then writes the results page
    ``out`` from every suite saved beside it (:func:`~experiments.results_page.write_page`). Returns the page's
    path."""
    before = out.read_text() if out is not None and out.is_file() and not smoke else None
    for suite in suites:
        page = run_and_save(suite, args, out, smoke, suites_dir, experiments_dir, seeds)
    if before is not None:
        print(f"replaced {page} and its figures in {page.parent / page.stem}/ (before: {setup_line(before)}); "
              f"git diff {page} shows what changed")
    return write_page(page.parent / page.stem / TABLES_DIR, page)


def setup_line(page: str) -> str:
    """What a results page measured: the start of its ``Suite ...`` line (suite, backbone, budget, seeds)."""
    line = next((line for line in page.splitlines() if line.startswith("Suite ")), "no setup line")
    return line.split(";")[0]


def page_for(suites: list[str], overrides: list[str], out: str | None) -> Path | None:
    """The page ``--out`` asks for: :data:`COMMITTED_PAGE` for the page's suites (:data:`PAGE_SUITES`) without
    overrides by default, the suite's folder under ``outputs/`` (None here) for any other suite or with overrides.

    Raises:
        ConfigError: ``--out`` names the committed page for a smoke or partial run.
    """
    from experiments.config import ConfigError

    full = set(suites) <= set(PAGE_SUITES) and not overrides
    if out is None:
        return COMMITTED_PAGE if full else None
    if not full and Path(out).resolve() == COMMITTED_PAGE.resolve():
        raise ConfigError("--out", f"{out} holds the committed results of the suites {', '.join(PAGE_SUITES)}; only "
                                   f"`make paper` (those suites, no overrides) writes it; leave --out out to write this "
                                   f"run's page as <output_dir>/suite-<suite>/results.md")
    return Path(out)


def main(argv: list[str]) -> int:
    from experiments.config import ConfigError
    from experiments.console import VERBOSE_FLAG, quiet_libraries, take_verbose

    argv, verbose = take_verbose(argv)
    if not verbose:  # training the suites: the runs' bars and summaries, not the libraries' notices (make exp's rule)
        quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m experiments.paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", help=f"one suite file under experiments/suites (default: {', '.join(PAGE_SUITES)} "
                                        f"in turn)")
    parser.add_argument("--out", help=f"results page (default: {COMMITTED_PAGE} for the page's suites, else "
                                      f"<output_dir>/suite-<suite>/results.md)")
    parser.add_argument("--from-tables", nargs="?", const="", metavar="DIR",
                        help="rebuild the page from saved tables without running anything (default DIR: "
                             "<out stem>/tables, e.g. docs/results/tables)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="run only these of the suite's seeds; the saved tables of its other seeds are kept (a "
                             "suite too long for one sitting, one part at a time)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (after the suite's overrides)")
    parser.add_argument(VERBOSE_FLAG, action="store_true", help="also what the libraries print about themselves")
    options = parser.parse_args(argv)
    suites = [options.suite] if options.suite else list(PAGE_SUITES)
    smoke = not set(suites) <= set(PAGE_SUITES) or bool(options.overrides)
    if options.from_tables is not None:
        out = Path(options.out) if options.out else COMMITTED_PAGE
        folder = Path(options.from_tables) if options.from_tables else out.parent / out.stem / TABLES_DIR
        manifests = [folder / MANIFEST] if (folder / MANIFEST).is_file() else sorted(folder.glob(f"*/{MANIFEST}"))
        if not manifests:
            print(f"--from-tables: no {MANIFEST} in {folder} or its sub-folders (`make paper` saves the runs' tables "
                  f"there)", file=sys.stderr)
            return 2
        if (any(json.loads(file.read_text()).get("smoke") for file in manifests)
                and out.resolve() == COMMITTED_PAGE.resolve()):
            print(f"--from-tables: {folder} holds a smoke or partial run's tables; {COMMITTED_PAGE} is the page of "
                  f"the suites {', '.join(PAGE_SUITES)}: pass --out", file=sys.stderr)
            return 2
        print(f"results: {write_page(folder, out)}")
        return 0
    try:
        out = write_results(suites, options.overrides, page_for(suites, options.overrides, options.out), smoke,
                            seeds=options.seeds)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"results: {out}" + (f" (a smoke or partial run: {COMMITTED_PAGE} is left as it is)" if smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
