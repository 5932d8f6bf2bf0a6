"""``python -m experiments.mine NAME [mine.key=value ...] [key=value ...]`` (``make mine SOURCE=NAME``): hard negatives.

Mines hard negatives for every training source of experiment ``NAME`` into ``data/mined/<NAME>`` (the recipe,
the output and how it resumes: :mod:`datamodules.mining_pipeline`), encoding with the experiment's pretrained backbone
(``mine.model=backbone``) or a training checkpoint's full cell (``mine.model=<path>.ckpt``).

Example:
    .venv/bin/python -m experiments.mine quickstart mine.max_queries=1000 mine.max_pool=4000 mine.max_score=0.9
    make exp NAME=quickstart ARGS="data.corpus=folder data.dir=data/mined/quickstart resume=false"
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.mining_pipeline import mine
from datamodules.mining_recipe import BACKBONE, OPTION_PREFIX, MiningConfig
from datamodules.sources import DataError
from experiments.config import ConfigError, available_experiments, compose, merge_layer, run_command
from experiments.loading import RunLoadError, load_run
from lightning_modules.embedding_model import EmbeddingModel

def compose_mining(name: str, args: list[str]) -> tuple[DictConfig, MiningConfig]:
    """The experiment's config (``key=value`` overrides) and the mining options (``mine.key=value``), validated.

    Raises:
        ConfigError: naming the key (``mine.top_k``, ``data.direction``, ...) and what is allowed.
    """
    options = [arg[len(OPTION_PREFIX):] for arg in args if arg.startswith(OPTION_PREFIX)]
    config = compose(name, [arg for arg in args if not arg.startswith(OPTION_PREFIX)])
    try:
        dotlist = OmegaConf.from_dotlist(options)
    except OmegaConfBaseException as error:
        raise ConfigError("ARGS", f"cannot parse mining options {options}: {error}") from None
    schema = OmegaConf.structured(MiningConfig)
    mining = OmegaConf.to_object(merge_layer(schema, dotlist, "ARGS", prefix=OPTION_PREFIX))
    if mining.min_negatives is None:
        mining.min_negatives = int(config.data.negatives.get("retrieval", 0))
    validate_mining(mining, config)
    return config, mining


def validate_mining(mining: MiningConfig, config: DictConfig) -> None:
    """Value checks of the mining options; raises ConfigError naming ``mine.<key>``."""
    def check(key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(OPTION_PREFIX + key, f"{getattr(mining, key)!r} not allowed: {allowed}")

    check("top_k", mining.top_k >= 1, "must be >= 1")
    check("skip_top", 0 <= mining.skip_top < mining.top_k, f"must be in [0, mine.top_k) = [0, {mining.top_k})")
    check("max_score", -1.0 <= mining.max_score <= 1.0, "must be a cosine in [-1, 1]")
    check("max_ratio", mining.max_ratio > 0, "must be > 0 (a fraction of the positive's score)")
    room = mining.top_k - mining.skip_top
    check("keep", 1 <= mining.keep <= room, f"must be in [1, mine.top_k - mine.skip_top] = [1, {room}]")
    check("min_negatives", 0 <= mining.min_negatives <= mining.keep,
          f"must be in [0, mine.keep] = [0, {mining.keep}] (default: data.negatives.retrieval)")
    check("max_queries", mining.max_queries is None or mining.max_queries >= 1, "must be >= 1 (or null: all rows)")
    check("max_pool", mining.max_pool is None or mining.max_pool >= 1, "must be >= 1 (or null: every passage)")
    check("batch_size", mining.batch_size >= 1, "must be >= 1")
    check("cache_chunk", mining.cache_chunk >= 1, "must be >= 1")
    check("samples", mining.samples >= 0, "must be >= 0")
    check("model", mining.model == BACKBONE or Path(mining.model).is_file(),
          f"`{BACKBONE}` (the experiment's backbone) or a checkpoint file (outputs/<NAME>/<timestamp>/checkpoints/"
          "last.ckpt)")
    if config.data.direction == "both":
        raise ConfigError("data.direction", "both not allowed for mining: a mined folder has one direction; "
                          "choose xx2en or en2xx")


class Encoder:
    """``encoder(texts, role) -> [n, d]`` float32 normalised embeddings (``role``: ``query`` or ``passage``, which
    picks the tokenizer's prefix), from the experiment's backbone or a checkpoint's full cell; eval mode, no grad.
    The model loads on first use, so a finished mining run (every encoding cached) never loads it."""

    def __init__(self, config: DictConfig, mining: MiningConfig) -> None:
        self.config, self.mining = config, mining

    @functools.cached_property
    def model(self) -> EmbeddingModel:
        if self.mining.model == BACKBONE:
            from experiments.run import build

            backbone_config = self.config.copy()
            backbone_config.plugins, backbone_config.model.num_layers = {}, None
            module, datamodule = build(backbone_config)  # no run: the pretrained backbone
            model = EmbeddingModel(module.eval(), datamodule.tokenize)
        else:
            try:
                model = load_run(self.mining.model).model
            except RunLoadError as error:
                raise ConfigError(OPTION_PREFIX + "model", str(error)) from None
        model.batch_size = self.mining.batch_size  # one forward per encoder call: mining batches the texts
        return model

    @functools.cached_property
    def cell(self):
        return self.model.full_cell()

    def __call__(self, texts: list[str], role: str) -> np.ndarray:
        return self.model.encode(texts, self.cell, role).float().numpy()


def mine_and_report(name: str, args: list[str]) -> int:
    config, mining = compose_mining(name, args)
    try:
        report = mine(config, mining, Encoder(config, mining))
    except DataError as error:
        raise ConfigError(error.key, str(error)) from None
    out, total = report["out"], report["total"]
    encoded = (f"{total['texts_encoded']} texts encoded, {total['texts_encoded_per_s']:.1f}/s" if total["texts_encoded"]
               else "every encoding from the cache")
    print(f"\nmined {total['rows_written']} rows from {total['queries']} queries in {total['seconds']:.0f} s "
          f"({total['queries_per_s']:.1f} queries/s; {encoded}) into {out}")
    print(f"report: {out}/report.md\ntrain with and without the mined negatives (identical query/passage batches):")
    print(f'  make exp NAME={name} ARGS="data.corpus=folder data.dir={out} resume=false"')
    print(f'  make exp NAME={name} ARGS="data.corpus=folder data.dir={out} data.negatives.retrieval=0 resume=false"')
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger(mine.__module__).setLevel(logging.INFO)  # the per-source progress lines
    options = ", ".join(f"{field.name}={field.default}" for field in dataclasses.fields(MiningConfig))
    return run_command(argv, "python -m experiments.mine NAME [mine.key=value ...] [key=value ...]",
                       f"experiments: {', '.join(available_experiments())}\nmining options (mine.key=value): "
                       f"{options}", mine_and_report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
