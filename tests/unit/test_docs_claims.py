"""Numbers and promises in the docs that the software decides: how many experiments the smoke suite runs, and that
the folders the README writes to are git-ignored."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from experiments.ablation import load_suite
from experiments.config import available_experiments

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("page", ["README.md", "docs/ablations.md"])
def test_the_smoke_suite_line_counts_what_the_suite_runs(page):
    """Before: "every ablation (~1 min)", for 7 of 22 experiments."""
    (line,) = [line for line in (ROOT / page).read_text().splitlines() if line.startswith("make ablation SUITE=smoke")]
    counted = re.search(r"# (\d+) of the (\d+) experiments \(([^)]*)\)", line)
    assert counted, line
    suite = load_suite("smoke").experiments
    assert (int(counted[1]), int(counted[2])) == (len(suite), len(available_experiments()))
    assert [name.strip() for name in counted[3].replace("each axis", "mrl, mll, mel").split(",")] == suite


def test_the_folders_the_readme_writes_to_are_git_ignored():
    """Before: the README's ``OUT=exports/...`` left an untracked folder in ``git status``."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (ROOT / "README.md").read_text()
    written = re.findall(r"\bOUT=(\S+)", readme) + ["outputs/quickstart/x/checkpoints/last.ckpt", "mlruns/mlflow.db"]
    assert any(path.startswith("exports/") for path in written)
    for path in written:
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not git-ignored"
