"""What the benchmark items share: the model variants they compare, the context that builds them once, one
training batch and one optimizer step, and the result row."""

from __future__ import annotations

import gc
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import build_module, compose_variant, to_device, translation_texts, weighted_loss
from contracts.batch_layout import pack


# Plugin overrides of the variants compared in items 1, 5 and 6 (on top of the experiment file).
VARIANTS = {
    "plain": ["plugins.mll=null", "plugins.mrl=null", "plugins.mel=null"],
    "mll+mrl": ["plugins.mel=null"],
    "3d-ml": [],
    "3d-ml+ffn": ["plugins.ffn={}"],
}


def row(item: str, name: str, ratio: float, goal: str | None, met: bool | None, detail: str, **raw) -> dict:
    return {"item": item, "name": name, "ratio": round(ratio, 3), "goal": goal, "met": met, "detail": detail,
            "raw": raw}


@dataclass
class Context:
    """Models and data shared by the items (built once, released when no longer needed)."""

    args: Namespace
    device: torch.device
    work_dir: Path
    modules: dict = field(default_factory=dict)
    pairs_cache: list | None = None

    def config(self, variant: str):
        return compose_variant(self.args.experiment, [*VARIANTS[variant], f"model.max_length={self.args.max_length}"])

    def module(self, variant: str):
        """``(module, tokenize, config)`` of a variant of the experiment."""
        if variant not in self.modules:
            config = self.config(variant)
            self.modules[variant] = (*build_module(config, self.device), config)
        return self.modules[variant]

    def release(self, *variants: str) -> None:
        for variant in variants:
            self.modules.pop(variant, None)
        gc.collect()

    def pairs(self, count: int) -> list[tuple[str, str]]:
        if self.pairs_cache is None or len(self.pairs_cache) < count:
            self.pairs_cache = translation_texts(self.args.corpus, count)
        return self.pairs_cache[:count]

    def batch(self, tokenize) -> dict:
        """One training batch: queries in several languages, their English translations as positives."""
        pairs = self.pairs(self.args.batch_size)
        return to_device(tokenize([xx for xx, _ in pairs], [en for _, en in pairs]), self.device)


def training_batches(config, tokenize, corpus_dir: str, count: int) -> list[dict]:
    """The first ``count`` padded training batches of an experiment's DataModule (its locales, sampling and batch
    size), from the gettext corpus in ``corpus_dir``."""
    import copy

    from omegaconf import OmegaConf

    from datamodules.pairs import TranslationPairsDataModule

    data = OmegaConf.merge(config.data, {"dir": corpus_dir, "corpus": "gettext", "num_workers": 0})
    padded = copy.copy(tokenize)
    padded.packing = False  # the tokenizer lays batches out (it took data.packing when the model was built)
    datamodule = TranslationPairsDataModule(data, padded, config.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    return [next(batches) for _ in range(count)]


def packed(batch: dict, pad_id: int) -> dict:
    """The same batch packed (same texts, same order)."""
    texts = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return {**batch, **pack(texts, pad_id)}


def train_step(module, batch: dict, optimizer, counter: list[int]):
    """One optimizer step of ``module`` on ``batch`` as a callable for :func:`~bench.common.compare`; ``counter`` is
    the step number (MEL draws its rank from it)."""
    def run():
        optimizer.zero_grad(set_to_none=True)
        weighted_loss(module, batch, counter[0]).backward()  # MEL draws this step's rank from the step number
        optimizer.step()
        counter[0] += 1
    return run
