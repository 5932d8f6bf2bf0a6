"""The probe's light mteb data loaders and helpers (evaluation/grid.py) give exactly mteb's own scores."""

import contextlib
import json
import random

import pytest

from evaluation.scoring import preserved_rng
from datamodules.gettext_corpus import Pair
from tests.integration.test_probe import META, hand_encoder

with preserved_rng():  # mteb reseeds the global generators on import
    from evaluation import grid
    from evaluation.grid import CellModel, evaluate
    from evaluation.tasks import GettextBitextMining, GettextRetrieval

# Three locales of five translations, near-duplicates included, so that rankings are not trivial.
PAIRS = {locale: [Pair(f"en {i}", f"{locale} {i}", locale, "t") for i in range(5)] for locale in ("de", "kk", "ta")}


def scores(task, light: bool, monkeypatch) -> dict:
    generator = random.Random(0)
    texts = sorted({text for _, text in task.probe_inputs()})  # sorted: set order varies with PYTHONHASHSEED
    vectors = {prefix + text: [generator.gauss(0, 1) for _ in range(4)] for text in texts for prefix in ("q: ", "p: ")}
    roles = {text: role for role, text in task.probe_inputs()}
    if not light:
        monkeypatch.setattr(grid, "light_mteb", contextlib.nullcontext)
    return evaluate(CellModel(hand_encoder(vectors), 0, META, may_encode=False, roles=roles), task, 4)


@pytest.mark.parametrize("task_class", [GettextBitextMining, GettextRetrieval])
def test_light_mteb_gives_mteb_s_scores(task_class, monkeypatch):
    task = task_class(PAIRS)
    light = [scores(task, True, monkeypatch) for _ in range(2)]  # the second retrieval call reuses the loaders
    mteb_own = scores(task, False, monkeypatch)
    exact = [json.dumps(result, sort_keys=True) for result in (*light, mteb_own)]  # NaN scores included
    assert exact[0] == exact[1] == exact[2]
    assert 0 < mteb_own["main_score"] < 1  # not a degenerate score that any loader would give


def test_retrieval_prepares_its_queries_and_corpus_once(monkeypatch):
    from mteb._create_dataloaders import create_dataloader

    calls = []

    def counted(dataset, **kwargs):
        calls.append(kwargs.get("prompt_type"))
        return create_dataloader(dataset, **kwargs)

    monkeypatch.setattr(grid, "create_dataloader", counted)
    grid._prepared_loaders.clear()
    task = GettextRetrieval(PAIRS)
    for _ in range(3):  # three cells
        scores(task, True, monkeypatch)
    assert len(calls) == 2  # the queries and the corpus, once


def test_queries_with_positives_keeps_what_mteb_keeps():
    from datasets import Dataset
    from mteb.abstasks.retrieval import _filter_queries_without_positives

    queries = Dataset.from_dict({"id": ["q0", "q1", "q2", "q3"], "text": ["a", "b", "c", "d"]})
    relevant = {"q0": {"d0": 1}, "q1": {}, "q2": {"d2": 1}}  # q1: no positive; q3: no judgement at all
    docs, kept = grid.queries_with_positives(relevant, queries)
    mteb_docs, mteb_kept = _filter_queries_without_positives(relevant, queries)
    assert docs == mteb_docs == {"q0": {"d0": 1}, "q2": {"d2": 1}}
    assert kept[:] == mteb_kept[:] == {"id": ["q0", "q2"], "text": ["a", "c"]}
    assert grid.queries_with_positives(docs, kept)[1] is kept  # nothing to drop: the same queries
