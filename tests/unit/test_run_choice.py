"""Which run a command continues (``resume: auto | true | false``) and how a settings change is listed: run folders
written by hand (a ``config.yaml`` and a checkpoint), nothing trained."""

from pathlib import Path

from omegaconf import OmegaConf

from experiments.config import compose
from experiments.run_folders import fixed_changes, new_run_note, run_directory, trained_config


def command(tmp_path: Path, *overrides: str):
    return compose("tiny", [f"output_dir={tmp_path}", *overrides])


def finished_run(tmp_path: Path, stamp: str, *overrides: str) -> Path:
    """A run folder as training leaves it: its resolved config.yaml and checkpoints/last.ckpt."""
    run_dir = tmp_path / "tiny" / stamp
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(command(tmp_path, *overrides), resolve=True))
    return run_dir


def trained(run_dir: Path) -> dict:
    return trained_config(run_dir, run_dir / "checkpoints" / "last.ckpt")


def test_the_default_continues_the_newest_run_with_the_same_fixed_settings(tmp_path):
    older = finished_run(tmp_path, "20260101-000000")
    finished_run(tmp_path, "20260102-000000", "data.locales=[de]")  # newer, another training
    config = command(tmp_path, "trainer.max_steps=30", "probe.every_n_steps=5")  # changes a resume may apply
    assert config.resume == "auto"
    assert run_directory(config) == (older, older / "checkpoints" / "last.ckpt")


def test_the_default_starts_a_new_run_when_none_matches_and_says_why_in_one_line(tmp_path):
    newest = finished_run(tmp_path, "20260102-000000")
    finished_run(tmp_path, "20260101-000000", "seed=5")
    config = command(tmp_path, "data.locales=[de]")
    run_dir, checkpoint = run_directory(config)
    assert checkpoint is None and run_dir.parent == tmp_path / "tiny" and not run_dir.exists()
    assert new_run_note(config, run_dir) == (
        f"new run {run_dir}: no run of tiny has these settings (newest, {newest.name}: "
        f"data.locales: ['de', 'fr'] -> ['de']); resume=true continues the newest one")


def test_resume_true_takes_the_newest_run_and_false_a_new_one(tmp_path):
    finished_run(tmp_path, "20260101-000000")
    newest = finished_run(tmp_path, "20260102-000000", "data.locales=[de]")
    assert run_directory(command(tmp_path, "resume=true")) == (newest, newest / "checkpoints" / "last.ckpt")
    run_dir, checkpoint = run_directory(command(tmp_path, "resume=false"))
    assert checkpoint is None and run_dir.parent == tmp_path / "tiny" and not run_dir.exists()
    assert new_run_note(command(tmp_path, "resume=false"), run_dir) is None


def test_the_change_list_names_each_changed_value_once_and_no_unchanged_key(tmp_path):
    """Before: a block switched on listed ``plugins.mel: None -> None`` and ``plugins.mel.rank: None -> 8``."""
    run_dir = finished_run(tmp_path, "20260101-000000", "plugins.mel=null")
    assert fixed_changes(command(tmp_path, "plugins.mel.rank=8"), trained(run_dir)) == [
        "plugins.mel: None -> {'rank': 8, 'ranks': [16, 8]}"]
    assert fixed_changes(command(tmp_path, "plugins.mel=null", "trainer.max_steps=99"), trained(run_dir)) == []
    assert fixed_changes(command(tmp_path, "plugins.mel=null", "optim.lr=0.01", "seed=3"), trained(run_dir)) == [
        "optim.lr: 0.001 -> 0.01", "seed: 0 -> 3"]
