"""The experiment files, suites (make ablation) and the runs table (make runs)."""

import io
import shutil

import mlflow
import pytest
import torch

from experiments.ablation import available_suites, load_suite, run_suite, suite_configs, with_seeds
from experiments.config import EXPERIMENTS_DIR, ConfigError, available_experiments, compose, plugin_configs
from experiments.run import build, build_plugins, describe_backbone
from experiments.runs_table import axes_of, differing_params, format_table, print_runs, headline_keys
from experiments.run_summary import tail_mean
from tests.conftest import run_overrides

ABLATIONS = {"baseline": set(), "mrl": {"mrl"}, "mll": {"mll"}, "mel": {"mel"}, "mrl_mll": {"mrl", "mll"},
             "3dml": {"mrl", "mll", "mel"}, "3dml_reference": {"mrl", "mll", "mel"}}


def test_every_experiment_file_says_what_it_runs_in_a_header_comment():
    assert set(ABLATIONS) | {"quickstart", "tiny"} <= set(available_experiments())
    for name in available_experiments():
        first = (EXPERIMENTS_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# "), name
    reference = (EXPERIMENTS_DIR / "3dml_reference.yaml").read_text()
    assert "NOT reproduced" in reference and "Qwen3-0.6B" in reference and "global RNG" in reference


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_trains_the_axes_its_name_says_with_the_paper_ladders(name):
    config = compose(name)
    assert set(plugin_configs(config)) == ABLATIONS[name]
    assert config.loss.gather == ("none" if name == "3dml_reference" else "full")
    plugins = {type(plugin).__name__: plugin for plugin in build_plugins(config, describe_backbone(config))}
    # multilingual-e5-small: 12 blocks, 384-d; the numbers the headers state
    if "MLL" in plugins:
        assert plugins["MLL"].layers == [1, 2, 4, 8, 12]
    if "MRL" in plugins:
        assert plugins["MRL"].dims == [384, 256, 128, 64, 32, 16, 8]
    if "MEL" in plugins:
        assert plugins["MEL"].settings == [192, 128, 64]
        assert plugins["MEL"].probabilities == pytest.approx([0.5, 1 / 3, 1 / 6])


@pytest.fixture
def smoke_configs(tmp_path, corpus_dir, mlflow_dir):
    return suite_configs(load_suite("smoke"), run_overrides(tmp_path, corpus_dir, mlflow_dir))


def test_a_suite_shares_backbone_data_seed_and_budget_and_logs_into_one_mlflow_experiment(smoke_configs, tmp_path):
    assert [config.name for config in smoke_configs] == list(ABLATIONS)
    for config in smoke_configs:
        assert config.tracking.experiment == "suite-smoke"
        assert config.output_dir == f"{tmp_path}/outputs/suite-smoke"
        assert config.model.source == "tiny_bert" and config.trainer.max_steps == 12  # from tiny.yaml + the suite
        assert set(plugin_configs(config)) == ABLATIONS[config.name]  # tiny.yaml's own plugins are not taken
    overridden = suite_configs(load_suite("smoke"), ["trainer.max_steps=3", "tracking.experiment=mine"])
    assert {(config.trainer.max_steps, config.tracking.experiment) for config in overridden} == {(3, "mine")}
    assert "smoke" in available_suites() and "quickstart" in available_suites()


@pytest.mark.parametrize("suite", available_suites())
def test_every_suite_file_composes_and_validates(suite):
    configs = suite_configs(load_suite(suite))
    assert len(configs) == len(load_suite(suite).experiments) * max(1, len(load_suite(suite).seeds))
    assert {config.tracking.experiment for config in configs} == {f"suite-{suite}"}


def test_a_suite_with_seeds_runs_every_experiment_once_per_seed_into_its_own_folder():
    configs = suite_configs(load_suite("paper"), ["output_dir=out"])
    names = ["paper_baseline", "paper_mrl", "paper_mll", "paper_mel", "paper_mel_fixed", "paper_3dml"]
    assert [(config.seed, config.name) for config in configs] == [(seed, name) for seed in (0, 1, 2) for name in names]
    assert {config.output_dir for config in configs} == {f"out/suite-paper/seed_{seed}" for seed in (0, 1, 2)}
    assert configs[7].tracking.run_name == "paper_mrl-seed_1"
    assert {config.trainer.max_steps for config in configs} == {240}


def test_a_suite_runs_some_of_its_seeds_when_asked():
    configs = suite_configs(with_seeds(load_suite("paper_long"), [2]), ["output_dir=out"])
    assert [(config.seed, config.name) for config in configs] == [(2, "paper_mel"), (2, "paper_mel_fixed")]
    assert {config.trainer.max_steps for config in configs} == {1500} and configs[0].probe.final.every_probe
    assert with_seeds(load_suite("paper_long"), None).seeds == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"--seeds`: \[7\] not among the seeds of suite paper_long: \[0, 1, 2\]"):
        with_seeds(load_suite("paper_long"), [2, 7])


def test_paper_runs_train_their_axes_and_share_one_grid_of_probe_cells():
    from lightning_modules.backbone_adapter import BackboneInfo
    from lightning_modules.plugins.base import ModelSidePlugin

    configs = {config.name.removeprefix("paper_"): config for config in suite_configs(load_suite("paper"))[:6]}
    info = BackboneInfo(hidden_size=384, num_layers=4, vocab_size=1000, family="encoder", intermediate_size=1536)
    trained = {}
    for name, config in configs.items():
        plugins = {type(plugin).__name__: plugin for plugin in build_plugins(config, info)}
        mel = plugins["MEL"]
        # a run that truncates the rank afterwards also scores its own embedding (full rank 384, named without rank)
        assert (plugins["MLL"].layers, plugins["MRL"].dims, mel.settings) == (
            [1, 2, 4], [384, 256, 128, 64, 32, 16, 8], [384, 192, 128, 64] if mel.posthoc else [192, 128, 64])
        assert isinstance(mel, ModelSidePlugin)
        trained[name] = (sum(w > 0 for w in plugins["MLL"].weights), sum(w > 0 for w in plugins["MRL"].weights),
                         0 if mel.posthoc else sum(p > 0 for p in mel.probabilities))
    # (exits, widths, ranks) each run trains; the rest of the 3 x 7 x 3 grid is probed only
    assert trained == {"baseline": (1, 1, 0), "mrl": (1, 7, 0), "mll": (3, 1, 0), "mel": (1, 1, 3),
                       "mel_fixed": (1, 1, 1), "3dml": (3, 7, 3)}


def test_every_ablation_builds_model_data_and_plugins_without_training(smoke_configs):
    tiny_views = {"baseline": 1, "mrl": 3, "mll": 3, "mel": 1, "mrl_mll": 9, "3dml": 9, "3dml_reference": 9}
    for config in smoke_configs:
        module, datamodule = build(config)
        datamodule.prepare_data()
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        with torch.no_grad():
            views = module.views(batch, step=0)
        assert len(views) == tiny_views[config.name], config.name  # tiny: exits 1, 2, 4 x widths 32, 16, 8


def write_suite(folder, name, text):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return folder


def test_a_suite_whose_runs_would_not_compare_is_refused_before_training(tmp_path):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    shutil.copy(EXPERIMENTS_DIR / "base.yaml", experiments)
    (experiments / "small.yaml").write_text("data: {batch_size: 8}\n")
    (experiments / "large.yaml").write_text("data: {batch_size: 16}\n")
    suites = write_suite(tmp_path / "suites", "uneven", "experiments: [small, large]\n")
    with pytest.raises(ConfigError, match=r"`data`.*large runs .*'batch_size': 16.* small runs .*'batch_size': 8"):
        suite_configs(load_suite("uneven", suites), experiments_dir=experiments)
    assert len(suite_configs(load_suite("uneven", suites), ["data.batch_size=4"], experiments)) == 2
    write_suite(suites, "typo", "experiments: [small, lagre]\n")
    with pytest.raises(ConfigError, match="lagre"):
        suite_configs(load_suite("typo", suites), experiments_dir=experiments)
    write_suite(suites, "unknown_key", "experiments: [small]\nsteps: 3\n")
    with pytest.raises(ConfigError, match="steps"):
        load_suite("unknown_key", suites)
    with pytest.raises(ConfigError, match="no suite file .*available: typo, uneven, unknown_key"):
        load_suite("nope", suites)


def test_axes_and_differing_params_of_the_runs_table():
    baseline = {"plugins": "{}", "loss.gather": "full", "optim.lr": "0.001", "name": "baseline"}
    mrl = {"plugins.mrl.dims": "None", "loss.gather": "full", "optim.lr": "0.001", "name": "mrl"}
    reference = {"plugins.mel.rank": "None", "plugins.mrl.dims": "None", "plugins.mll.layers": "None",
                 "loss.gather": "none", "optim.lr": "0.001", "name": "3dml_reference"}
    custom = {"plugins.mrl.dims": "[64]", "plugins.squash._target_": "x.Squash", "plugins.squash.weight": "0.5",
              "loss.gather": "full", "optim.lr": "0.001", "name": "custom"}
    assert [axes_of(p) for p in (baseline, mrl, reference, custom)] == ["none", "mrl", "mll+mrl+mel", "mrl+squash"]
    assert differing_params([baseline, mrl, reference]) == ["loss.gather"]  # name and plugin presence are not params
    assert differing_params([mrl, custom]) == ["plugins.mrl.dims"]  # an option with two values is shown
    assert differing_params([mrl, custom, reference]) == ["loss.gather", "plugins.mrl.dims"]
    assert headline_keys({"final/mean_main_score/full", "probe/seconds", "bitext/recall_at_1/layer_4/dim_64/rank_16",
                          "final/bitext/grid_mean", "final/bitext/full", "final/mean_main_score/grid_mean",
                          "train/loss"}) == [
        "final/mean_main_score/full", "final/mean_main_score/grid_mean", "final/bitext/full", "final/bitext/grid_mean"]


def test_a_runs_table_wider_than_the_terminal_puts_the_runs_side_by_side():
    header, rows = ["run", "loss", "probe/mean/full"], [["posthoc", "1.9", "0.88"], ["precision", "2.1", "0.87"]]
    assert format_table(header, rows, max_width=80).splitlines()[2].split() == ["posthoc", "1.9", "0.88"]
    assert format_table(header, rows, max_width=20).splitlines() == [
        "                  posthoc   precision",
        "─────────────────────────────────────",
        "loss                  1.9         2.1",
        "probe/mean/full      0.88        0.87"]


def test_a_suite_trains_each_experiment_into_one_mlflow_experiment_and_the_table_compares_them(tmp_path, corpus_dir,
                                                                                                mlflow_dir):
    suites = write_suite(tmp_path / "suites", "pair", "experiments: [baseline, 3dml_reference]\nlike: tiny\n"
                                                      "overrides: [trainer.max_steps=10]\n")
    runs = run_suite("pair", run_overrides(tmp_path, corpus_dir, mlflow_dir), suites)
    uri = runs[0][0].tracking.uri
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("suite-pair")
    assert {result.run_id for _, result in runs} == {
        run.info.run_id for run in client.search_runs([experiment.experiment_id])}

    out = io.StringIO()
    assert print_runs(uri, ["suite-pair"], out) == 2
    lines = out.getvalue().strip().splitlines()
    header = lines[1].split()
    assert header[:5] == ["run", "status", "steps", "axes", "loss.gather"]
    assert {"loss", "samples/s", "tokens/s", "peak_MB", "wall_s"} <= set(header)
    rows = {line.split()[0].split("-")[0]: dict(zip(header, line.split())) for line in lines[3:]}
    assert rows["baseline"]["axes"] == "none" and rows["3dml_reference"]["axes"] == "mll+mrl+mel"
    assert rows["baseline"]["loss.gather"] == "full" and rows["3dml_reference"]["loss.gather"] == "none"
    for config, result in runs:
        row = rows[config.name]
        assert row["status"] == "FINISHED" and row["steps"] == "10"
        assert float(row["loss"]) == pytest.approx(tail_mean(client, result.run_id, "train/loss"), rel=1e-3)
        wall = client.get_run(result.run_id).data.metrics["train/elapsed_s"]
        assert float(row["wall_s"]) == pytest.approx(wall, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*sorted(ABLATIONS), "quickstart"])
def test_each_experiment_builds_on_its_own_backbone(name, tmp_path, corpus_dir, mlflow_dir):
    module, datamodule = build(compose(name, run_overrides(tmp_path, corpus_dir, mlflow_dir)))
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        assert module.views(batch, step=0)
