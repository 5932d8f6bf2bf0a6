"""make paper: the results page from saved tables (what it shows, its byte-identical rebuild, the committed page's
rebuild from the committed tables), which page a suite may write, and a tiny suite end to end."""

import json
import math
import shutil
import threading
from pathlib import Path

import pytest

from experiments.paper import COMMITTED_PAGE, main
from evaluation.learning_curves import curve
from experiments.results_page import write_page
from experiments.saved_tables import TABLES_DIR, save_tables, tables_lock
from tests.unit.test_claims import TASK, runs, table, with_queries



def efficiency(seed: int) -> dict:
    return {"trainable_parameters": 1234567.0, "peak_memory_mb": 2048.4 + seed, "step_s": 0.456 + seed,
            "device": f"cpu: 2 cores, torch threads {seed + 1}"}


def save_suites(folder: Path, queries: bool = True) -> Path:
    """Two saved suites as make paper saves them: ``tiny`` (every role, seeds 0 and 1; 3dml and the MEL runs train
    MEL, the others are also scored untruncated) and ``tiny_long`` (the MEL pair with learning curves over 3 steps)."""
    def scored(base_table: dict, seed: int) -> dict:
        return with_queries(base_table, 0.05, seed) if queries else base_table

    main_runs = {**runs(), "baseline": [table(0.60, untruncated=1.1)], "mrl": [table(0.595, untruncated=1.1, dim=True)],
                 "mll": [table(0.58, untruncated=1.1, layer=True)]}
    tables = [(name, seed, scored(tables_[0], seed), Path(f"/runs/{name}/{seed}"))
              for seed in (0, 1) for name, tables_ in main_runs.items()]
    for _, _, saved, _ in tables:
        saved["tasks"][TASK]["revision"] = "abc123"
        saved["seconds"] = 12.5
        saved["overlap_dropped"] = {TASK: {"de": 3, "fr": 1, "pool": 2}}
    save_tables(folder / "tiny", tables, {"setup": {"suite": "tiny", "steps": 12, "backbone": "tiny_bert"},
                                          "smoke": True, "commands": ["make paper ARGS=--suite tiny"],
                                          "page_suites": ["tiny", "tiny_long", "tiny_xl"]},
                efficiency=[efficiency(seed) for _, seed, _, _ in tables])
    long_tables, curves = [], {}
    for seed in (0, 1):
        for name, nested in (("mel", True), ("mel_fixed", False)):
            steps = [scored(table(0.5 + 0.05 * step, rank=nested), seed) | {"step": step} for step in (0, 1, 2)]
            steps[-1]["tasks"][TASK]["revision"] = "abc123"
            long_tables.append((name, seed, steps[-1], Path(f"/runs/long/{name}/{seed}")))
            curves[name, seed] = curve(steps)
    save_tables(folder / "tiny_long", long_tables, {"setup": {"suite": "tiny_long", "steps": 1500,
                                                              "backbone": "tiny_bert"}, "smoke": True,
                                                    "commands": ["make paper ARGS=--suite tiny_long"]}, curves)
    return folder


def test_the_results_page_shows_claims_intervals_full_cells_curves_and_costs(tmp_path):
    folder = save_suites(tmp_path / "results" / TABLES_DIR)
    page = write_page(folder, tmp_path / "results.md").read_text()
    assert "SMOKE RUN" in page and "## Claims on GettextRetrieval" in page
    assert "Suite `tiny_xl`: **not run yet**" in page and "Suite `tiny_long`: **not" not in page
    rows = [line for line in page.splitlines() if line.startswith("| ") and " | MEL" in line]
    assert [row.split(" | ")[1] for row in rows] == ["MEL", "MEL, 1,500 steps"]  # the long pair adds its row
    assert "| 2 | MLL |" in page and "| **fail** | 0/2 |" in page and " pt [" in page
    # Real full cells: 3dml (rank 16 at most) against the baseline untruncated; the page says who has none.
    assert "full (layer_4/dim_64/rank_16) -7." in page
    assert ("No uncompressed cell: `3dml`, `mel`, `mel_fixed` train MEL, which replaces the word embedding by factors "
            "of rank 16 (d = 64); their full cell is `layer_4/dim_64/rank_16`. The other runs' full cell is the "
            "untruncated `layer_4/dim_64`.") in page
    assert "Final evaluation: GettextRetrieval 200 queries." in page and "GettextRetrieval `abc123`" in page
    assert "training split (text equal after case, punctuation and whitespace are normalised): GettextRetrieval 4 " \
           "pairs, 2 pool sentences." in page
    # Per role: seeds, mean parameters and memory, the fastest seed's step time, the final evaluation's mean seconds.
    assert "| baseline | 2 | 1,234,567 | 2,049 | 0.46 | 12 |" in page and "| mel (tiny_long) | 2 | nan |" in page
    # Where the step times were measured, per suite (tiny_long logged no device).
    assert "\nMeasured on: `tiny`: cpu: 2 cores, torch threads 1, cpu: 2 cores, torch threads 2.\n" in page
    assert "![3dml − baseline, GettextRetrieval](results/3dml_vs_baseline_GettextRetrieval.png)" in page
    assert "![learning curves, tiny_long](results/learning_curves_tiny_long.png)" in page
    assert (tmp_path / "results" / "learning_curves_tiny_long.png").stat().st_size > 10_000
    # A glob of a role's tables (make compare A="<suite>/mel_seed*.json") finds tables only: curves are in curves/.
    assert sorted(path.name for path in (folder / "tiny_long").glob("mel_seed*.json")) == ["mel_seed0.json",
                                                                                            "mel_seed1.json"]
    assert "Failed claims: " in page and "; 2 (MLL) on GettextRetrieval;" in page
    assert "make paper ARGS=--suite tiny\nmake paper ARGS=--suite tiny_long" in page


def test_a_suite_saved_one_seed_at_a_time_keeps_its_other_seeds(tmp_path, capsys):
    setup = {"suite": "tiny", "steps": 12, "backbone": "tiny_bert"}
    manifest = {"setup": setup, "smoke": True, "commands": []}
    for seed in (1, 0):  # --seeds 1, then --seeds 0: both kept, in seed order
        save_tables(tmp_path, [(name, seed, table(0.6), Path(f"/runs/{name}/{seed}")) for name in ("baseline", "mrl")],
                    manifest, efficiency=[efficiency(seed)] * 2)
    runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
    assert [(entry["role"], entry["seed"]) for entry in runs] == [("baseline", 0), ("mrl", 0), ("baseline", 1),
                                                                  ("mrl", 1)]
    assert runs[2]["efficiency"] == efficiency(1)
    # Another setup (a longer budget) replaces the saved runs instead of mixing them, and says so.
    save_tables(tmp_path, [("baseline", 2, table(0.6), Path("/runs/b/2"))], {**manifest, "setup": {**setup, "steps": 24}})
    assert [entry["seed"] for entry in json.loads((tmp_path / "manifest.json").read_text())["runs"]] == [2]
    assert sorted(file.name for file in tmp_path.iterdir()) == ["baseline_seed2.json", "manifest.json"]
    assert "replacing the saved runs of another setup" in capsys.readouterr().out


def test_efficiency_reads_each_run_s_metrics_and_device_and_leaves_out_what_it_did_not_log(tmp_path, mlflow_dir):
    import mlflow
    from omegaconf import OmegaConf

    from experiments.mlflow_logger import RUN_ID_FILE
    from experiments.paper import efficiency

    config = OmegaConf.create({"tracking": {"uri": f"sqlite:///{mlflow_dir}/mlflow.db", "experiment": "efficiency"},
                               "data": {"batch_size": 32}})
    client = mlflow.MlflowClient(config.tracking.uri)  # not the fluent API: no active experiment left to other tests
    experiment = client.create_experiment("efficiency")
    run_dirs = [tmp_path / "tagged", tmp_path / "untagged"]  # the second logged before runs had a device tag
    for run_dir, tags in zip(run_dirs, ({"device": "cpu: 2 cores, torch threads 1"}, {})):
        run = client.create_run(experiment, tags=tags)
        client.log_metric(run.info.run_id, "run/device/samples_per_sec", 64.0)
        client.log_metric(run.info.run_id, "run/memory/device/peak_rss_mb", 1000.0)
        client.set_terminated(run.info.run_id)
        run_dir.mkdir()
        (run_dir / RUN_ID_FILE).write_text(run.info.run_id)
    previous = mlflow.get_tracking_uri()
    try:
        rows = efficiency([config, config], run_dirs)
    finally:
        mlflow.set_tracking_uri(previous)
    assert rows[0]["step_s"] == 0.5 and rows[0]["peak_memory_mb"] == 1000.0
    assert rows[0]["device"] == "cpu: 2 cores, torch threads 1" and rows[1]["device"] is None
    assert math.isnan(rows[1]["trainable_parameters"])


def test_a_part_of_a_suite_saving_beside_another_waits_for_the_tables_lock(tmp_path):
    """Two ``--seeds`` parts finishing at once: the second's read-modify-write of the manifest waits for the first."""
    manifest = {"setup": {"suite": "tiny", "steps": 12, "backbone": "tiny_bert"}, "smoke": True, "commands": []}
    save_tables(tmp_path / "tiny", [("baseline", 0, table(0.6), Path("/runs/b/0"))], manifest)
    part = threading.Thread(target=save_tables, args=(tmp_path / "tiny", [("baseline", 1, table(0.6),
                                                                             Path("/runs/b/1"))], manifest))
    with tables_lock(tmp_path):  # the other part, still saving
        part.start()
        part.join(timeout=1.0)
        assert part.is_alive()
        assert [entry["seed"] for entry in json.loads((tmp_path / "tiny" / "manifest.json").read_text())["runs"]] == [0]
    part.join(timeout=60)
    assert not part.is_alive()
    assert [entry["seed"] for entry in json.loads((tmp_path / "tiny" / "manifest.json").read_text())["runs"]] == [0, 1]


def test_the_page_rebuilds_byte_identical_from_its_tables(tmp_path, capsys):
    folder = save_suites(tmp_path / "docs" / "results" / TABLES_DIR)
    out = tmp_path / "docs" / "results.md"
    page = write_page(folder, out).read_bytes()
    figures = {path.name: path.read_bytes() for path in (tmp_path / "docs" / "results").glob("*.png")}
    out.unlink()
    assert main(["--from-tables", "--out", str(out)]) == 0  # default folder: <out stem>/tables
    assert out.read_bytes() == page
    assert {path.name: path.read_bytes() for path in (tmp_path / "docs" / "results").glob("*.png")} == figures
    text = page.decode()
    assert "No intervals yet" not in text and " pt [" in text
    # Tables without per-query scores (the runs before they were kept): point estimates, and the page says so.
    for file in folder.glob("*/*.queries.npz"):
        file.unlink()
    assert main(["--from-tables", str(folder), "--out", str(out)]) == 0
    assert "No intervals yet" in out.read_text() and " pt [" not in out.read_text()
    capsys.readouterr()
    assert main(["--from-tables", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"--from-tables: no manifest.json in {tmp_path} or its sub-folders " \
                                              f"(`make paper` saves the runs' tables there)"
    assert main(["--from-tables", str(folder)]) == 2  # smoke tables never become the committed page
    assert "holds a smoke or partial run's tables" in capsys.readouterr().err
    assert json.loads((folder / "tiny" / "manifest.json").read_text())["runs"][0] == {
        "role": "baseline", "seed": 0, "table": "baseline_seed0.json", "run_dir": "/runs/baseline/0",
        "efficiency": efficiency(0)}


def test_the_committed_page_rebuilds_byte_identical_from_the_committed_tables(tmp_path):
    """docs/results.md and its figures are what `make paper ARGS=--from-tables` makes of docs/results/tables."""
    tables = COMMITTED_PAGE.parent / COMMITTED_PAGE.stem / TABLES_DIR
    out = tmp_path / COMMITTED_PAGE.name
    shutil.copytree(tables, tmp_path / COMMITTED_PAGE.stem / TABLES_DIR)
    assert main(["--from-tables", "--out", str(out)]) == 0
    assert out.read_text() == COMMITTED_PAGE.read_text()
    for figure in (tmp_path / COMMITTED_PAGE.stem).glob("*.png"):
        assert figure.read_bytes() == (COMMITTED_PAGE.parent / COMMITTED_PAGE.stem / figure.name).read_bytes(), figure


def test_only_the_page_s_suites_write_the_committed_page(monkeypatch, capsys):
    """Before: ``make paper ARGS="--suite paper_smoke"`` replaced docs/results.md and its figures with a smoke page."""
    import experiments.paper as paper

    pages = []
    monkeypatch.setattr(paper, "write_results",
                        lambda suites, args, out, smoke, seeds: pages.append((suites, out, smoke, seeds)) or out)
    assert paper.main(["--suite", "paper_smoke", "--out", "docs/results.md"]) == 2 and pages == []
    assert "config error at `--out`: docs/results.md holds the committed results of the suites paper, paper_long" in \
           capsys.readouterr().err
    assert paper.main(["--suite", "paper_smoke"]) == 0  # the page goes beside the suite's runs
    assert paper.main(["--suite", "paper", "trainer.max_steps=5"]) == 0  # partial: also there
    assert paper.main(["--suite", "paper_long"]) == 0  # one of the page's suites: the page is rebuilt from all
    assert paper.main([]) == 0
    assert paper.main(["--suite", "paper_long", "--seeds", "0", "1"]) == 0  # a part of a suite, for the same page
    assert pages == [(["paper_smoke"], None, True, None), (["paper"], None, True, None),
                     (["paper_long"], COMMITTED_PAGE, False, None), (["paper", "paper_long"], COMMITTED_PAGE, False, None),
                     (["paper_long"], COMMITTED_PAGE, False, [0, 1])]


TINY_GRID = {
    "paper_baseline": "plugins:\n  mll: {layers: [1, 2, 4], weights: [0.0, 0.0, 1.0]}\n"
                      "  mrl: {dims: [32, 16, 8], weights: [1.0, 0.0, 0.0]}\n"
                      "  mel: {rank: 16, ranks: [16, 8], posthoc: true}\n",
    "paper_3dml": "plugins:\n  mll: {}\n  mrl: {}\n  mel: {rank: 16, ranks: [16, 8]}\n",
}


@pytest.mark.slow
def test_a_tiny_two_run_suite_end_to_end(tmp_path, corpus_dir, mlflow_dir, capsys):
    from experiments.config import EXPERIMENTS_DIR, compose
    from experiments.paper import write_results
    from experiments.run import describe_backbone
    from tests.conftest import run_overrides

    experiments, suites = tmp_path / "experiments", tmp_path / "suites"
    suites.mkdir(parents=True)
    experiments.mkdir()
    for name in ("base", "tiny"):
        shutil.copy(EXPERIMENTS_DIR / f"{name}.yaml", experiments)
    for name, text in TINY_GRID.items():
        (experiments / f"{name}.yaml").write_text(f"# {name}\n{text}")
    (suites / "tiny_paper.yaml").write_text(
        "experiments: [paper_baseline, paper_3dml]\nlike: tiny\nseeds: [0]\noverrides: [trainer.max_steps=12, "
        "checkpoint_every=12, probe.at_start=false, probe.every_n_steps=0, 'probe.tasks=[GettextRetrieval]', "
        "'probe.locales=[de,fr]', probe.max_pairs_per_locale=8]\n")
    (suites / "tiny_long.yaml").write_text(  # the long pair's shape: every probe the final evaluation, ranks only
        "experiments: [paper_3dml]\nlike: tiny\nseeds: [0]\noverrides: [trainer.max_steps=12, checkpoint_every=12, "
        "plugins.mll=null, plugins.mrl=null, probe.at_start=false, probe.every_n_steps=6, probe.final.every_probe=true, "
        "'probe.tasks=[GettextRetrieval]', 'probe.locales=[de,fr]', probe.max_pairs_per_locale=8]\n")
    args = [*run_overrides(tmp_path, corpus_dir, mlflow_dir), "probe.enabled=true"]
    out = write_results(["tiny_paper", "tiny_long"], args, tmp_path / "docs" / "results.md", smoke=True,
                        suites_dir=suites, experiments_dir=experiments)
    page = out.read_text()
    learning = json.loads((tmp_path / "docs" / "results" / "tables" / "tiny_long" / "curves" / "3dml_seed0.json")
                          .read_text())
    assert learning["steps"] == [6, 12] and sorted(learning["cells"]) == ["layer_4/dim_32/rank_16",
                                                                           "layer_4/dim_32/rank_8"]
    assert "![learning curves, tiny_long](results/learning_curves_tiny_long.png)" in page
    assert "| 4 | 3D-ML |" in page and "better in " in page and "/18 cells" in page  # 3 exits x 3 widths x 2 ranks
    assert " pt [" in page and "No intervals yet" not in page  # final probes keep per-query scores
    tables = tmp_path / "docs" / "results" / "tables" / "tiny_paper"
    assert sorted(file.name for file in tables.iterdir()) == [
        "3dml_seed0.json", "3dml_seed0.queries.npz", "baseline_seed0.json", "baseline_seed0.queries.npz",
        "manifest.json"]
    assert "| 1 | MRL |" in page and "not run" in page
    assert (tmp_path / "docs" / "results" / "3dml_vs_baseline_GettextRetrieval.png").is_file()
    # Efficiency from MLflow: 3dml's factors (vocab·16 + 16·32) replace the baseline's vocab x 32 embedding.
    rows = {line.split(" | ")[0].strip("| "): line for line in page.splitlines() if line.startswith(("| baseline",
                                                                                                     "| 3dml"))}
    vocab = describe_backbone(compose("tiny")).vocab_size
    counts = {name: int(row.split(" | ")[2].replace(",", "")) for name, row in rows.items()}
    assert counts["baseline"] - counts["3dml"] == vocab * 32 - 16 * (vocab + 32)
    # Resumed: a second call trains nothing and writes the same claims; without --out, beside the suite's runs.
    again = write_results(["tiny_paper"], args, None, smoke=True, suites_dir=suites, experiments_dir=experiments)
    assert again == tmp_path / "outputs" / "suite-tiny_paper" / "results.md"
    assert (again.parent / "results" / "3dml_vs_baseline_GettextRetrieval.png").is_file()
    assert [line for line in again.read_text().splitlines() if line.startswith("| 4 |")] == \
           [line for line in page.splitlines() if line.startswith("| 4 |")]
    capsys.readouterr()
    write_results(["tiny_paper"], args, out, smoke=False, suites_dir=suites, experiments_dir=experiments)
    assert f"replaced {out} and its figures in {out.parent / 'results'}/ (before: Suite `tiny_paper`: tiny_bert" \
           in capsys.readouterr().out  # a full run says which page it replaced


def test_make_paper_keeps_the_libraries_quiet_unless_verbose(monkeypatch, tmp_path, capsys):
    """Before: make paper's training printed Lightning's device lines and MLflow's INFO lines (make exp did not)."""
    import experiments.console as console

    calls = []
    monkeypatch.setattr(console, "quiet_libraries", lambda: calls.append("quiet"))
    assert main(["--from-tables", str(tmp_path), "--out", str(tmp_path / "page.md")]) == 2
    assert main(["--verbose", "--from-tables", str(tmp_path), "--out", str(tmp_path / "page.md")]) == 2
    assert calls == ["quiet"]
