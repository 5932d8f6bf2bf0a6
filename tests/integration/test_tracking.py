"""What lands in MLflow: strict names, exact params, tags, the store check, resume without duplicate steps, heatmaps."""

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from experiments import run as run_module
from experiments.config import ConfigError
from experiments.run import main, train
from experiments.config import ConfigError
from experiments.mlflow_logger import StrictMLFlowLogger
from experiments.run_metadata import PROJECT_ROOT, config_hash, log_params, run_tags
from experiments.run_summary import final_view_losses, heatmap_figure, log_run_summary, view_grids
from experiments.store import EXPERIMENT_KIND_TAG, TrackingError, check_tracking
from experiments.tracking import experiment_description, system_metrics


@pytest.fixture
def logger_for(mlflow_dir):
    """``logger_for(run_id=None)``: a StrictMLFlowLogger on the session store (a new run, or attached to one)."""
    def make(run_id=None):
        return StrictMLFlowLogger(experiment_name="tracking-tests", tracking_uri=f"sqlite:///{mlflow_dir}/mlflow.db",
                                  artifact_location=(mlflow_dir / "artifacts").as_uri(), run_id=run_id)

    return make


def history(logger, key):
    return [(m.step, m.value) for m in sorted(logger.experiment.get_metric_history(logger.run_id, key),
                                              key=lambda m: m.step)]


@pytest.mark.parametrize("name", ["train/loss/layer=4", "probe/acc@1", "train/loss:hard", "train//loss", "/loss",
                                  "loss/", "train/loss/couche_é"])
def test_a_metric_name_mlflow_or_lightning_would_change_raises(logger_for, name):
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        logger_for().log_metrics({name: 1.0}, step=0)


def test_valid_metric_names_are_stored_exactly(logger_for):
    logger = logger_for()
    logger.log_metrics({"train/loss/layer_4/dim_64/rank_128": 0.5, "run/device/samples-per sec.x": 2.0}, step=3)
    assert set(logger.experiment.get_run(logger.run_id).data.metrics) == {
        "train/loss/layer_4/dim_64/rank_128", "run/device/samples-per sec.x"}


def test_a_resumed_logger_logs_each_step_once_and_keeps_the_first_values(logger_for):
    killed = logger_for()
    for step in range(6):  # the killed process logged steps 0..5; say its last checkpoint was at step 3
        killed.log_metrics({"train/loss": float(step), **({"train/lr": 10.0 + step} if step < 3 else {})}, step=step)
    resumed = logger_for(run_id=killed.run_id)
    for step in range(3, 9):  # the resumed process recomputes 3..5, then goes on
        resumed.log_metrics({"train/loss": 100.0 + step, "train/lr": 200.0 + step}, step=step)
    assert history(resumed, "train/loss") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0),
                                              (6, 106.0), (7, 107.0), (8, 108.0)]
    assert history(resumed, "train/lr") == [(0, 10.0), (1, 11.0), (2, 12.0), *[(s, 200.0 + s) for s in range(3, 9)]]


def test_params_keep_exact_keys_and_values_and_long_values_go_to_an_artifact(logger_for, tmp_path):
    logger = logger_for()
    client, run_id = logger.experiment, logger.run_id
    changed = log_params(client, run_id, {"plugins.mrl.dims": "[384, 64]", "at.limit": "x" * 6000,
                                          "data.locales": "y" * 6001})
    params = client.get_run(run_id).data.params
    assert changed == {}
    assert params["plugins.mrl.dims"] == "[384, 64]" and params["at.limit"] == "x" * 6000
    assert "6001 characters" in params["data.locales"] and "params/data.locales.txt" in params["data.locales"]
    stored = Path(client.download_artifacts(run_id, "params/data.locales.txt", str(tmp_path))).read_text()
    assert stored == "y" * 6001
    # MLflow params are immutable: a changed value is reported, the first one stays
    assert log_params(client, run_id, {"plugins.mrl.dims": "[384]"}) == {"plugins.mrl.dims": ("[384, 64]", "[384]")}
    assert client.get_run(run_id).data.params["plugins.mrl.dims"] == "[384, 64]"
    with pytest.raises(ValueError, match="corpus.train_pairs.sr@latin"):
        log_params(client, run_id, {"corpus.train_pairs.sr@latin": "3"})


def test_config_hash_ignores_where_a_run_is_stored_but_not_what_it_trains(tiny_config, tmp_path):
    reference = config_hash(tiny_config("tiny"))
    renamed = tiny_config("tiny", [f"output_dir={tmp_path}/elsewhere", "tracking.experiment=other", "resume=false",
                                   "trainer.log_every_n_steps=7", "checkpoint_every=2"])
    renamed.name = "copy_of_tiny"
    assert config_hash(renamed) == reference
    assert config_hash(tiny_config("tiny", ["optim.lr=0.5"])) != reference
    assert config_hash(tiny_config("tiny", ["plugins.mel=null"])) != reference
    assert config_hash(tiny_config("tiny", ["trainer.max_steps=11"])) != reference


def test_run_tags_record_commit_dirty_flag_versions_and_device(tiny_config):
    tags = run_tags(tiny_config("tiny"))
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if git.returncode == 0:
        status = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert tags["git.commit"] == git.stdout.strip()
        assert tags["git.dirty"] == ("true" if status.stdout.strip() else "false")
    assert tags["versions.torch"] == torch.__version__ and tags["versions.mlflow"] == mlflow.__version__
    assert tags["device"].startswith("cuda: " if torch.cuda.is_available() else "cpu: ")
    assert re.fullmatch(r"[0-9a-f]{12}", tags["config.hash"])
    assert (tags["experiment"], tags["axes"]) == ("tiny", "mll+mrl+mel")  # what the runs table groups by
    assert run_tags(tiny_config("tiny", ["plugins.mel=null", "plugins.mll=null", "plugins.mrl=null"]))["axes"] == "none"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_tracking_server_stops_the_run_before_any_weights_load(tiny_config, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(run_module, "build", lambda config: pytest.fail("build ran despite an unusable store"))
    started = time.perf_counter()
    with pytest.raises(TrackingError, match=re.escape(uri)):
        train(tiny_config("tiny", [f"tracking.uri={uri}"]))
    assert time.perf_counter() - started < 30  # no minutes of MLflow's default retries


def test_an_unwritable_store_stops_the_run_with_one_line_naming_it(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_module, "build", lambda config: pytest.fail("build ran despite an unusable store"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker}/mlflow.db"
    config = tiny_config("tiny", [f"tracking.uri={uri}"])
    with pytest.raises(TrackingError, match=re.escape(uri)):
        train(config)
    # a good store but artifacts cannot be written: named as tracking.artifact_dir (before: as tracking.uri)
    with pytest.raises(ConfigError, match=r"`tracking.artifact_dir`: .*a_file/artifacts is not a writable folder"):
        train(tiny_config("tiny", [f"tracking.artifact_dir={blocker}/artifacts"]))
    overrides = [f"output_dir={tmp_path}/outputs", f"tracking.uri={uri}", "trainer.enable_progress_bar=false"]
    assert main(["tiny", *overrides]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and uri in error and "tracking.uri" in error


def log_views(logger, values):
    for step, per_view in enumerate(values):
        logger.log_metrics({f"train/loss/{view}": value for view, value in per_view.items()}, step=step)


def test_final_view_losses_average_the_last_ten_logged_values_and_become_one_heatmap_per_rank(logger_for, tmp_path):
    logger = logger_for()
    # 12 steps; MEL alternates ranks 16 (even steps) and 8 (odd steps), so each rank's views are logged 6 times
    log_views(logger, [{f"layer_{layer}/dim_{dim}/rank_{16 if step % 2 == 0 else 8}": step + layer + dim / 100
                        for layer in (1, 4) for dim in (8, 32)} for step in range(12)])
    losses = final_view_losses(logger.experiment, logger.run_id, window=3)
    # rank 16: steps 6, 8, 10 -> mean 8; rank 8: steps 7, 9, 11 -> mean 9
    assert losses["layer_4/dim_32/rank_16"] == pytest.approx(8 + 4 + 0.32)
    assert losses["layer_1/dim_8/rank_8"] == pytest.approx(9 + 1 + 0.08)
    grids = view_grids(losses)
    assert set(grids) == {"rank_16", "rank_8"} and set(grids["rank_8"]) == {(1, 8), (1, 32), (4, 8), (4, 32)}

    log_run_summary(logger, window=3)
    client, run_id = logger.experiment, logger.run_id
    plots = {artifact.path for artifact in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/final_view_loss.json", "plots/final_view_loss_rank_16.png",
                     "plots/final_view_loss_rank_8.png"}
    table = json.loads(Path(client.download_artifacts(run_id, "plots/final_view_loss.json", str(tmp_path))).read_text())
    assert table == {"window": 3, "losses": losses}
    png = Path(client.download_artifacts(run_id, "plots/final_view_loss_rank_8.png", str(tmp_path))).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_views_without_a_rank_make_one_heatmap_and_the_baseline_none(logger_for):
    mrl_only, baseline = logger_for(), logger_for()
    log_views(mrl_only, [{"dim_8": 2.0, "dim_32": 1.0}])
    log_views(baseline, [{"full": 1.5}])
    grids = view_grids(final_view_losses(mrl_only.experiment, mrl_only.run_id))
    assert grids == {"": {(None, 8): 2.0, (None, 32): 1.0}}
    log_run_summary(mrl_only)
    log_run_summary(baseline)
    paths = {artifact.path for artifact in mrl_only.experiment.list_artifacts(mrl_only.run_id, "plots")}
    assert paths == {"plots/final_view_loss.json", "plots/final_view_loss.png"}
    baseline_plots = {a.path for a in baseline.experiment.list_artifacts(baseline.run_id, "plots")}
    assert baseline_plots == {"plots/final_view_loss.json"}


def test_a_tiny_run_lands_in_mlflow_and_a_resume_continues_the_same_run(tiny_config, tmp_path):
    config = tiny_config("tiny", ["trainer.max_steps=10"])
    first = train(config)
    client = mlflow.MlflowClient(config.tracking.uri)
    run = client.get_run(first.run_id)
    assert run.info.run_name == f"tiny-{first.run_dir.name}" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["plugins.mel.rank"] == "16" and params["plugins.mel.ranks"] == "[16, 8]"
    assert params["plugins.mrl.dims"] == "None" and params["optim.lr"] == "0.001" and params["name"] == "tiny"
    assert params["corpus.train_pairs.de"].isdigit()
    assert run.data.tags["config.hash"] == config_hash(config) and run.data.tags["git.commit"]
    assert {"train/elapsed_s", "run/memory/device/peak_rss_mb", "run/device/samples_per_sec",
            "run/device/items_per_sec", "train/lr", "train/mel/rank"} <= set(run.data.metrics)
    assert run.data.metrics["run/memory/device/peak_rss_mb"] > 0
    stored = OmegaConf.load(client.download_artifacts(first.run_id, "config.yaml", str(tmp_path)))
    assert OmegaConf.to_container(stored) == OmegaConf.to_container(config, resolve=True)
    plots = {artifact.path for artifact in client.list_artifacts(first.run_id, "plots")}
    assert {"plots/final_view_loss_rank_16.png", "plots/final_view_loss_rank_8.png"} <= plots
    assert run.data.tags["mlflow.note.content"].startswith("A random-init 4-block BERT")  # tiny.yaml's header

    resumed = train(tiny_config("tiny", ["trainer.max_steps=14"]))  # the same command with a larger budget
    assert resumed.run_id == first.run_id and resumed.run_dir == first.run_dir
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "1"
    assert run.data.params["trainer.max_steps"] == "10"  # MLflow keeps the first value ...
    assert run.data.tags["resume.changed_keys"] == "config.hash,trainer.max_steps"  # ... and the change is recorded
    assert any(a.path.startswith("resume/changes-") for a in client.list_artifacts(first.run_id, "resume"))
    for key in run.data.metrics:
        steps = [metric.step for metric in client.get_metric_history(first.run_id, key)]
        assert len(steps) == len(set(steps)), key
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train/loss")) == list(range(14))
    clock = sorted(client.get_metric_history(first.run_id, "train/elapsed_s"), key=lambda metric: metric.step)
    elapsed = [metric.value for metric in clock]
    assert elapsed == sorted(elapsed)  # the clock continues across the resume


def test_an_artifact_dir_that_disagrees_with_the_experiment_stops_the_run_naming_both(tiny_config, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.setattr(run_module, "build", lambda config: pytest.fail("build ran despite a wrong artifact_dir"))
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    first = tiny_config("tiny", [f"tracking.uri={store}", f"tracking.artifact_dir={tmp_path}/first"])
    check_tracking(first)  # creates the experiment with its artifact location
    check_tracking(first)  # the same folder again is fine
    other = [f"tracking.uri={store}", f"tracking.artifact_dir={tmp_path}/second"]
    with pytest.raises(ConfigError, match="tracking.artifact_dir") as raised:
        train(tiny_config("tiny", other))
    message = str(raised.value)
    assert f"{tmp_path}/second disagrees with {tmp_path}/first" in message and "'tiny'" in message
    overrides = [f"output_dir={tmp_path}/outputs", *other, "trainer.enable_progress_bar=false"]
    capsys.readouterr()  # MLflow's own log lines of creating the store
    assert main(["tiny", *overrides]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"{tmp_path}/second" in error and f"{tmp_path}/first" in error
    kind = mlflow.MlflowClient(store).get_experiment_by_name("tiny").tags[EXPERIMENT_KIND_TAG]
    assert kind == "custom_model_development"  # the UI opens it on its runs, not on GenAI traces


def test_the_run_description_is_the_experiment_files_header_comment(tmp_path):
    experiment = tmp_path / "demo.yaml"
    experiment.write_text("# demo: two lines\n#   indented  \n#\n# after a blank one\nplugins: {}\n# not this\n")
    assert experiment_description(experiment) == "demo: two lines\n  indented\n\nafter a blank one"
    (tmp_path / "bare.yaml").write_text("plugins: {}\n")
    assert experiment_description(tmp_path / "bare.yaml") == ""
    assert experiment_description(tmp_path / "missing.yaml") == ""


def test_system_metrics_come_from_mlflows_monitor_while_the_block_runs(logger_for, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    logger = logger_for()
    with system_metrics(logger):
        time.sleep(1.0)
    metrics = logger.experiment.get_run(logger.run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0
    steps = [m.step for m in logger.experiment.get_metric_history(logger.run_id, "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps))) and len(steps) >= 2


def test_the_loss_heatmap_orders_layers_and_dims_as_the_probe_heatmaps_and_has_a_colour_bar():
    figure = heatmap_figure({(4, 8): 2.0, (1, 384): 1.0, (1, 8): 3.0, (4, 384): 0.5}, "run-x rank_16")
    panel, colour_bar = figure.axes
    assert [tick.get_text() for tick in panel.get_xticklabels()] == ["384", "8"]  # widest first, as the probe's
    assert [tick.get_text() for tick in panel.get_yticklabels()] == ["1", "4"]
    assert colour_bar.get_ylabel() == "loss" and panel.get_title() == "run-x rank_16"
    assert [text.get_text() for text in panel.texts] == ["1", "3", "0.5", "2"]  # row by row, in that order
    mrl_only = heatmap_figure({(None, 8): 2.0, (None, 32): 1.0}, "").axes[0]
    assert [tick.get_text() for tick in mrl_only.get_yticklabels()] == ["full"]
    assert [tick.get_text() for tick in mrl_only.get_xticklabels()] == ["32", "8"]
