"""``python -m experiments.ablation SUITE [key=value ...]``: run a suite of experiments, one after another, into one
MLflow experiment, on the same backbone, data, seed and step budget, so their numbers are comparable.

A suite is ``experiments/suites/<SUITE>.yaml``::

    experiments: [baseline, mrl, mll, mel, mrl_mll, 3dml, 3dml_reference]
    like: tiny                      # everything but `plugins` from experiments/tiny.yaml
    overrides: [trainer.max_steps=6]
    seeds: [0, 1, 2]                # optional: every experiment once per seed

Each run is composed as ``base.yaml`` -> ``<experiment>.yaml`` -> the ``like`` file without its plugins -> the
suite's ``overrides`` -> the command line's ``key=value`` (so the suite decides backbone, data and budget, and each
experiment only which axes it trains). Runs go to the MLflow experiment ``suite-<SUITE>`` and to
``<output_dir>/suite-<SUITE>/<experiment>/<timestamp>/``; re-running the same command resumes each experiment's last
run (finished ones end at once), ``resume=false`` starts fresh runs. With ``seeds``, the runs of seed s set ``seed=s``,
go to ``<output_dir>/suite-<SUITE>/seed_<s>/<experiment>/<timestamp>/`` and are named ``<experiment>-seed_<s>`` in
MLflow; all experiments of one seed run before the next seed's.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.config import EXPERIMENTS_DIR, ConfigError, compose, run_command

if TYPE_CHECKING:
    from experiments.run import TrainResult

SUITES_DIR = EXPERIMENTS_DIR / "suites"
# What every run of a suite must share; experiments may differ only in plugins, loss and optimizer settings.
SHARED_SECTIONS = ("seed", "model", "data", "trainer", "distributed")


@dataclass
class Suite:
    """A named list of experiments trained under the same conditions.

    Args:
        name: the file stem under ``experiments/suites/``.
        experiments: experiment names (files under ``experiments/``), run in this order.
        like: an experiment whose settings except ``plugins`` every run takes (backbone, data, optimizer, budget).
        overrides: dot-list overrides applied to every run after ``like``.
        seeds: run every experiment once per seed (empty: once, with the config's seed).
    """

    name: str = ""
    experiments: list[str] = field(default_factory=list)
    like: str | None = None
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    @property
    def mlflow_experiment(self) -> str:
        return f"suite-{self.name}"


def available_suites(suites_dir: Path = SUITES_DIR) -> list[str]:
    return sorted(path.stem for path in suites_dir.glob("*.yaml"))


def load_suite(name: str, suites_dir: Path = SUITES_DIR) -> Suite:
    """Reads and type-checks ``<suites_dir>/<name>.yaml``; ConfigError naming the file and key otherwise."""
    path = suites_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("SUITE", f"no suite file {path}; available: {', '.join(available_suites(suites_dir))}")
    try:
        suite = OmegaConf.merge(OmegaConf.structured(Suite), OmegaConf.load(path))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {error.full_key}", str(error).splitlines()[0]) from None
    if not suite.experiments:
        raise ConfigError(f"{path}: experiments", "needs at least one experiment name")
    suite.name = name
    return OmegaConf.to_object(suite)


def suite_layers(suite: Suite, experiments_dir: Path = EXPERIMENTS_DIR) -> list[tuple[str, DictConfig]]:
    """The config layers a suite puts between each experiment file and the command line."""
    layers = []
    if suite.like:
        like_file = experiments_dir / f"{suite.like}.yaml"
        if not like_file.is_file():
            raise ConfigError(f"suite {suite.name}: like", f"no experiment file {like_file}")
        like = OmegaConf.load(like_file)
        like.pop("plugins", None)  # each experiment decides its own axes
        layers.append((f"{like_file} (suite {suite.name}: like, without plugins)", like))
    layers.append((f"suite {suite.name}", OmegaConf.create({"tracking": {"experiment": suite.mlflow_experiment}})))
    try:
        overrides = OmegaConf.from_dotlist(list(suite.overrides))
    except OmegaConfBaseException as error:
        raise ConfigError(f"suite {suite.name}: overrides", f"cannot parse {suite.overrides}: {error}") from None
    layers.append((f"suite {suite.name}: overrides", overrides))
    return layers


def suite_configs(suite: Suite, args: list[str] | None = None,
                  experiments_dir: Path = EXPERIMENTS_DIR) -> list[DictConfig]:
    """Every run's config (per seed, if the suite has seeds), composed and validated (plugins included) before any
    of them trains.

    Raises:
        ConfigError: a bad experiment or override, or runs of one seed that would not share :data:`SHARED_SECTIONS`.
    """
    from experiments.run import build_plugins, describe_backbone

    layers = suite_layers(suite, experiments_dir)
    configs = []
    for seed in suite.seeds or [None]:
        seed_layers = layers if seed is None else [*layers, (f"suite {suite.name}: seed {seed}", OmegaConf.create(
            {"seed": seed}))]
        group = []
        for name in suite.experiments:
            config = compose(name, list(args or []), experiments_dir, layers=seed_layers)
            build_plugins(config, describe_backbone(config))  # plugin errors now, not after the first run trained
            config.output_dir = str(Path(config.output_dir) / f"suite-{suite.name}")
            if seed is not None:
                config.output_dir = str(Path(config.output_dir) / f"seed_{seed}")
                config.tracking.run_name = config.tracking.run_name or f"{name}-seed_{seed}"
            group.append(config)
        check_shared(suite, group)
        configs += group
    return configs


def check_shared(suite: Suite, configs: list[DictConfig]) -> None:
    first = configs[0]
    for config in configs[1:]:
        for key in SHARED_SECTIONS:
            mine, theirs = OmegaConf.select(config, key), OmegaConf.select(first, key)
            if mine != theirs:
                raise ConfigError(key, f"suite {suite.name}: {config.name} runs {_show(mine)} but {first.name} runs "
                                       f"{_show(theirs)}; set it in the suite (like / overrides) so runs compare")


def _show(value) -> str:
    return str(OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value)


def with_seeds(suite: Suite, seeds: list[int] | None) -> Suite:
    """The suite with only ``seeds`` of its seeds (all of them for None), for a suite run one part at a time.

    Raises:
        ConfigError: naming ``--seeds`` when one is not a seed of the suite.
    """
    if not seeds:
        return suite
    unknown = [seed for seed in seeds if seed not in suite.seeds]
    if unknown:
        raise ConfigError("--seeds", f"{unknown} not among the seeds of suite {suite.name}: {suite.seeds}")
    return replace(suite, seeds=[seed for seed in suite.seeds if seed in seeds])


def run_suite(name: str, args: list[str] | None = None, suites_dir: Path = SUITES_DIR,
              experiments_dir: Path = EXPERIMENTS_DIR, seeds: list[int] | None = None
              ) -> list[tuple[DictConfig, TrainResult]]:
    """Trains every experiment of the suite in order (of ``seeds`` only, when given: :func:`with_seeds`); returns
    each run's config and result."""
    from experiments.run import train

    suite = with_seeds(load_suite(name, suites_dir), seeds)
    configs = suite_configs(suite, args, experiments_dir)
    runs = []
    for index, config in enumerate(configs, 1):
        print(f"\n[{index}/{len(configs)}] suite {suite.name}: {config.name} (seed {config.seed})", flush=True)
        runs.append((config, train(config)))
        gc.collect()  # free this run's model before the next one's peak-memory count starts
    return runs


def run_and_compare(name: str, args: list[str]) -> int:
    from experiments.runs_table import print_runs

    runs = run_suite(name, args)
    tracking = runs[0][0].tracking
    print(f"\nsuite {name}: {len(runs)} runs in MLflow experiment {tracking.experiment!r} ({tracking.uri})")
    print_runs(tracking.uri, [tracking.experiment])
    return 0


def main(argv: list[str]) -> int:
    return run_command(argv, "python -m experiments.ablation SUITE [key=value ...]",
                       f"suites: {', '.join(available_suites())}", run_and_compare)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
