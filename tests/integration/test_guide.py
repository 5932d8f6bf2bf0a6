"""docs/adding_an_axis.md cannot rot: its example plugin, experiment entry and test template are run as written."""

import inspect
import re
from pathlib import Path

from omegaconf import OmegaConf

from experiments.config import compose, plugin_configs

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "adding_an_axis.md"
BLOCK = re.compile(r"```(?:python|yaml)\n# file: (\S+)\n(.*?)```", re.DOTALL)
EXCERPT = re.compile(r"```python\n# excerpt: (\S+)\n(.*?)```", re.DOTALL)


def guide_files() -> dict[str, str]:
    """``{path: code}`` of every fenced block of the guide that starts with ``# file: <path>``."""
    return {path: code for path, code in BLOCK.findall(GUIDE.read_text())}


def test_guide_has_the_plugin_the_experiment_entry_and_the_test_template():
    assert set(guide_files()) == {"my_axes/topk.py", "experiments/topk.yaml", "tests/integration/test_topk.py"}


def test_guide_example_runs_as_written(tmp_path, monkeypatch, tiny_config):
    files = guide_files()
    package = tmp_path / "my_axes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "topk.py").write_text(files["my_axes/topk.py"])
    monkeypatch.syspath_prepend(str(tmp_path))

    entry = tmp_path / "topk.yaml"
    entry.write_text(files["experiments/topk.yaml"])
    config = compose("tiny", layers=[(str(entry), OmegaConf.load(entry))])
    plugin_class, plugin_config = plugin_configs(config)["topk"]
    assert plugin_class.__module__ == "my_axes.topk" and plugin_config.keep == [1.0, 0.25]

    template: dict = {}
    exec(compile(files["tests/integration/test_topk.py"], f"{GUIDE}:tests/integration/test_topk.py", "exec"), template)
    fixtures = {"tiny_config": tiny_config, "tmp_path": tmp_path}
    tests = [function for name, function in template.items() if name.startswith("test_")]
    assert len(tests) == 4
    for test in tests:
        test(**{name: fixtures[name] for name in inspect.signature(test).parameters})


def test_guide_excerpts_are_the_code_of_their_files():
    excerpts = EXCERPT.findall(GUIDE.read_text())
    assert [path for path, _ in excerpts] == ["lightning_modules/plugins/ffn.py"]
    for path, code in excerpts:
        assert code in (ROOT / path).read_text(), f"the guide's excerpt of {path} is out of date"
