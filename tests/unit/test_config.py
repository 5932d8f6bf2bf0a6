import shutil
import subprocess
import sys

import pytest

from experiments.config import EXPERIMENTS_DIR, ConfigError, available_experiments, compose, plugin_configs
from experiments.run import build, build_plugins, describe_backbone
from lightning_modules.plugins import BUILTIN_PLUGINS


def error_of(name: str, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        config = compose(name, overrides)
        build_plugins(config, describe_backbone(config))
    message = str(error.value)
    assert "\n" not in message  # one line
    return message


@pytest.mark.parametrize("overrides, fragments", [
    (["model.sauce=hf"], ["`model.sauce`", "unknown key", "source, path", "closest: source (from ARGS)"]),
    (["trainer.max_stepz=3"], ["`trainer.max_stepz`", "not an argument of lightning.Trainer", "max_steps"]),
    (["data.batch_size=many"], ["`data.batch_size`", "'many'", "Integer"]),
    (["seed=1.5"], ["`seed`", "Integer"]),
    (["loss.gather=all"], ["`loss.gather`", "'all' not allowed", "none, local, full", "from ARGS"]),
    (["data.direction=sideways"], ["`data.direction`", "xx2en, en2xx, both"]),
    (["loss.temperature=0"], ["`loss.temperature`", "0.0 not allowed", "[0.001, 100.0]"]),
    (["plugins.mrl.dims=[16,512]"], ["`plugins.mrl.dims`", "[512]", "[1, 32]", "hidden size"]),
    (["plugins.mll.layers=[2,9]"], ["`plugins.mll.layers`", "[9]", "[1, 4]", "depth"]),
    (["plugins.mel.rank=64"], ["`plugins.mel.rank`", "[1, 32]", "vocab 260", "hidden size 32"]),
    (["plugins.mrl.dimz=[8]"], ["`plugins.mrl.dimz`", "unknown key", "dims, weights"]),
    (["plugins.mel.rank=big"], ["`plugins.mel.rank`", "'big'"]),
    (["plugins.xyz={}"], ["`plugins.xyz`", "unknown plugin", "mll, mrl, mel", "_target_"]),
    (["model.num_layers=9"], ["`model`", "[1, 4]"]),
    # before: a TypeError inside Trainer, a torch ValueError after the MLflow run started, "multiple values for
    # keyword argument", or nothing at all (a negative LR floor ascends the gradient)
    (["trainer.max_steps=abc"], ["`trainer.max_steps`", "'abc'", "takes int"]),
    (["trainer.max_time=5"], ["`trainer.max_time`", "str | timedelta"]),
    (["optim.betas=[2,3]"], ["`optim.betas`", "[2.0, 3.0]", "[0, 1)"]),
    (["trainer.logger=false"], ["`trainer.logger`", "set by the run", "tracking.*"]),
    (["trainer.callbacks=[]"], ["`trainer.callbacks`", "set by the run"]),
    (["trainer.default_root_dir=/tmp/x"], ["`trainer.default_root_dir`", "set by the run", "output_dir"]),
    (["optim.min_lr=-0.01"], ["`optim.min_lr`", "-0.01", "[0, lr = 0.001]"]),
    (["optim.min_lr=0.01"], ["`optim.min_lr`", "[0, lr = 0.001]"]),
    (["optim.warmup_steps=-5"], ["`optim.warmup_steps`", "-5 must be >= 0"]),
    # each section checks itself in __post_init__; the composition prefixes the section (and keeps nested keys)
    (["data.pool_batches=0"], ["`data.pool_batches`", "0 must be >= 1"]),
    (["data.caps.de=0"], ["`data.caps.de`", "0 must be >= 1"]),
    (["data.locales=[]"], ["`data.locales`", "at least one locale"]),
    (["probe.batch_size=0"], ["`probe.batch_size`", "0 must be > 0"]),
    (["model.source=hf"], ["`model.path`", "required when model.source is hf"]),
    (["model.family=both"], ["`model.family`", "'both' not allowed; choose one of auto, encoder, decoder"]),
    (["seed=-1"], ["`seed`", "-1 must be >= 0"]),
    (["checkpoint_every=0"], ["`checkpoint_every`", "0 must be > 0"]),
    (["loss.temperature=1e-30"], ["`loss.temperature`", "1e-30", "[0.001, 100.0]"]),
])
def test_bad_values_stop_with_one_line_naming_key_and_allowed(overrides, fragments):
    message = error_of("tiny", overrides)
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_experiment_lists_available_ones():
    message = error_of("nope", [])
    assert "`NAME`" in message and "quickstart" in message


def test_overrides_apply_last_and_tracking_defaults_to_name():
    config = compose("tiny", ["trainer.max_steps=3", "plugins.mel=null", "optim.betas=[0.8,0.9]"])
    assert config.trainer.max_steps == 3 and config.plugins.mel is None and list(config.optim.betas) == [0.8, 0.9]
    assert config.tracking.experiment == "tiny" and config.name == "tiny" and config.resume == "auto"
    info = describe_backbone(config)
    assert [type(p).__name__ for p in build_plugins(config, info)] == ["MLL", "MRL"]


@pytest.mark.parametrize("name", available_experiments())
def test_every_experiment_file_composes_and_validates(name):
    config = compose(name)
    plugins = build_plugins(config, describe_backbone(config))
    assert {type(p) for p in plugins} == {BUILTIN_PLUGINS[k] for k, v in config.plugins.items() if v is not None}


def test_tiny_experiment_builds_without_training(tmp_path):
    module, datamodule = build(compose("tiny", [f"output_dir={tmp_path}"]))
    assert [type(p).__name__ for p in module.plugins] == ["MLL", "MRL", "MEL"]  # ordered by stage


@pytest.mark.parametrize("name", ["../experiments/tiny", str(EXPERIMENTS_DIR / "tiny"), "tiny.yaml", "base"])
def test_a_name_that_is_a_path_or_no_experiment_is_refused(name):
    message = error_of(name, [])
    assert "`NAME`" in message and "not a path" in message and "tiny" in message


def test_a_plugin_target_outside_the_allowed_packages_is_refused_without_importing_it(tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    (tmp_path / "payload.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass X: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("payload.X", "this.X"):
        message = error_of("tiny", [f"plugins.x._target_={target}"])
        assert "`plugins.x`" in message and "not in an allowed package" in message
        assert "nothing was imported" in message
    assert not marker.exists() and "payload" not in sys.modules
    message = error_of("tiny", ["plugins.x._target_=os;rm"])
    assert "not a dotted class path" in message
    allowed = compose("tiny", ["plugin_packages=[payload]", "plugins.x._target_=payload.X"])
    with pytest.raises(ConfigError, match="not a MatryoshkaPlugin subclass"):
        plugin_configs(allowed)  # listed in plugin_packages: imported, then checked
    assert marker.exists()


@pytest.fixture
def experiments_dir(tmp_path):
    for name in ("base", "tiny"):
        shutil.copy(EXPERIMENTS_DIR / f"{name}.yaml", tmp_path)
    return tmp_path


def test_a_yaml_syntax_error_names_file_and_line(experiments_dir):
    (experiments_dir / "broken.yaml").write_text("model:\n  source: tiny_bert\nplugins: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as error:
        compose("broken", experiments_dir=experiments_dir)
    assert str(error.value).startswith(f"config error at `{experiments_dir / 'broken.yaml'}:4`: YAML syntax error")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, overrides, where", [
    ("optim:\n  lr: ${nope.lr}\n", [], "interp.yaml:2"),
    ("seed: 1\n", ["data.dir=${nope}"], "ARGS"),
])
def test_a_bad_interpolation_names_key_and_where_it_was_written(experiments_dir, text, overrides, where):
    (experiments_dir / "interp.yaml").write_text(text)
    with pytest.raises(ConfigError) as error:
        compose("interp", overrides, experiments_dir=experiments_dir)
    message = str(error.value)
    assert "\n" not in message and "cannot resolve" in message and where in message


def test_a_bad_name_in_an_experiment_file_names_the_file(experiments_dir):
    (experiments_dir / "choice.yaml").write_text("distributed:\n  precision: fp8\n")
    message = str(pytest.raises(ConfigError, compose, "choice", experiments_dir=experiments_dir).value)
    assert message == (f"config error at `distributed.precision`: 'fp8' not allowed; choose one of auto, 32-true, "
                       f"bf16-mixed (from {experiments_dir / 'choice.yaml'})")


def test_a_section_raises_with_its_own_field_name_and_the_composition_adds_the_section():
    from contracts.config_error import ConfigError as SharedConfigError
    from lightning_modules.config import OptimConfig

    with pytest.raises(SharedConfigError) as error:
        OptimConfig(lr=0.001, min_lr=0.01)
    assert error.value.key == "min_lr" and str(error.value) == (
        "config error at `min_lr`: 0.01 not allowed; allowed range [0, lr = 0.001]")
    assert str(error.value.under("optim")) == ("config error at `optim.min_lr`: 0.01 not allowed; "
                                               "allowed range [0, lr = 0.001]")
    assert ConfigError is SharedConfigError  # one class: a component's error is caught as the run's


def test_the_section_configs_import_neither_experiments_nor_torch():
    code = ("import sys, evaluation.config, datamodules.config, lightning_modules.config\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('experiments', 'torch', 'lightning')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
