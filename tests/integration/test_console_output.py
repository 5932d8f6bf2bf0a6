"""What ``make exp`` prints when its output is not a terminal (CI logs, a pipe): its own lines and one progress bar
per phase by default; the libraries' notices about themselves with ``--verbose``."""

import os
import re
import subprocess
import sys

from experiments.console import MLFLOW_LEVEL_ENV
from experiments.run_metadata import PROJECT_ROOT
from tests.conftest import run_overrides

TINY = ["trainer.max_steps=3", "resume=false", "trainer.enable_progress_bar=true", "data.locales=[de]",
        "plugins.mll.layers=[2,4]", "plugins.mrl.dims=[32,16]"]
PROBE = ["probe.enabled=true", "probe.every_n_steps=0", "probe.locales=[de]", "probe.max_pairs_per_locale=8",
         "probe.batch_size=16"]
BAR = re.compile(r"^(?P<name>[\w ]+?):\s+\d+%\|")
# One of each notice the issue counted (Lightning's device line and tip, MLflow's INFO lines, a deprecation inside
# Lightning) and Lightning's own bars.
THIRD_PARTY = ("GPU available", "TPU available", "litlogger", " INFO mlflow", "LeafSpec", "Trainer.fit` stopped")


def run_cli(tmp_path, corpus_dir, mlflow_dir, *args: str) -> list[str]:
    """The non-empty lines of ``python -m experiments.run tiny ...`` (stdout and stderr, a bar's redraws split)."""
    overrides = [o for o in run_overrides(tmp_path, corpus_dir, mlflow_dir) if not o.startswith(("trainer.", "probe."))]
    # without the MLflow level an in-process run of an earlier test set (quiet_libraries): a user's shell has none
    environment = {key: value for key, value in os.environ.items() if key != MLFLOW_LEVEL_ENV}
    environment["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-m", "experiments.run", "tiny", *overrides, *TINY, *args],
                          cwd=PROJECT_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    lines = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", done.stdout).replace("\r", "\n").splitlines()
    return [line.strip() for line in lines if line.strip()]


def test_a_tiny_run_prints_its_bars_and_four_lines(tmp_path, corpus_dir, mlflow_dir):
    lines = run_cli(tmp_path, corpus_dir, mlflow_dir, *PROBE)
    bars = [line for line in lines if BAR.match(line)]
    own = [line for line in lines if not BAR.match(line)]
    assert [line.split()[0] for line in own] == ["finished", "checkpoint:", "MLflow", "make"], own
    assert {BAR.match(line)["name"] for line in bars} == {"train", "probe step 0", "probe step 3"}
    assert any("| 3/3 " in line and "loss=" in line for line in bars if line.startswith("train"))
    # the probe bar counts the grid's 8 cells (exits 2, 4 × dims 32, 16 × ranks 16, 8) and ends with the score
    assert any(re.search(r"\| 8/8 .*mean main score \d\.\d{4} at layer_4/dim_32/rank_16", line)
               for line in bars if line.startswith("probe step 0"))
    assert not [line for line in lines if any(notice in line for notice in THIRD_PARTY)]


def test_verbose_shows_what_the_libraries_print(tmp_path, corpus_dir):
    store = tmp_path / "store"  # a new store: MLflow says (INFO) that it creates its tables
    store.mkdir()
    output = "\n".join(run_cli(tmp_path, corpus_dir, store, "probe.enabled=false", "--verbose"))
    for notice in THIRD_PARTY:
        assert notice in output, notice
