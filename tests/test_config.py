import pytest

from experiments.config import ConfigError, available_experiments, compose
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
    (["model.sauce=hf"], ["`model.sauce`", "unknown key", "source"]),
    (["trainer.max_stepz=3"], ["`trainer.max_stepz`", "not an argument of lightning.Trainer", "max_steps"]),
    (["data.batch_size=many"], ["`data.batch_size`", "'many'", "Integer"]),
    (["seed=1.5"], ["`seed`", "Integer"]),
    (["loss.gather=all"], ["`loss.gather`", "none, local, full"]),
    (["data.direction=sideways"], ["`data.direction`", "xx2en, en2xx, both"]),
    (["loss.temperature=0"], ["`loss.temperature`", "> 0"]),
    (["plugins.mrl.dims=[16,512]"], ["`plugins.mrl.dims`", "[512]", "[1, 32]", "hidden size"]),
    (["plugins.mll.layers=[2,9]"], ["`plugins.mll.layers`", "[9]", "[1, 4]", "depth"]),
    (["plugins.mel.rank=64"], ["`plugins.mel.rank`", "[1, 32]", "vocab 260", "hidden size 32"]),
    (["plugins.mrl.dimz=[8]"], ["`plugins.mrl.dimz`", "unknown key", "dims, weights"]),
    (["plugins.mel.rank=big"], ["`plugins.mel.rank`", "'big'"]),
    (["plugins.xyz={}"], ["`plugins.xyz`", "unknown plugin", "mll, mrl, mel", "_target_"]),
    (["model.num_layers=9"], ["`model`", "[1, 4]"]),
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
    assert config.tracking.experiment == "tiny" and config.name == "tiny" and config.resume is True
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
