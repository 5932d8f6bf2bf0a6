"""Per-query scores: their mean is mteb's main score for every cell and task, hand-built cases give the values
by hand, and the file beside a table reads back what was written."""

import math

import numpy as np
import pytest
import torch

from evaluation.query_scores import (bitext_query_scores, query_file, read_query_scores, retrieval_query_scores,
                                     write_query_scores)
from evaluation.report import write
from evaluation.scoring import Prober, preserved_rng
from tests.integration.test_probe import tiny_module  # noqa: F401 - a fixture
from tests.integration.test_probe_manpages import man_dir  # noqa: F401 - a fixture

with preserved_rng():
    from tests.integration.test_probe import META, hand_encoder, one_hot
    from evaluation.grid import CellModel, evaluate
    from evaluation.query_scores import query_ids, task_query_scores
    from evaluation.tasks import ManpageRetrieval

# mteb rounds retrieval scores to 5 decimals (bitext accuracy is exact).
MTEB_ROUNDING = 5e-6


def test_query_scores_average_to_mteb_s_main_score(tiny_module):  # noqa: F811
    module, tokenize, tasks = tiny_module
    table = Prober(module, tokenize, tasks, batch_size=16).run(step=3, query_scores=True)
    per_query = table["query_scores"]
    assert set(per_query) == {"GettextBitextMining", "GettextRetrieval"}
    for task in tasks:
        name = task.metadata.name
        assert per_query[name]["ids"] == query_ids(task)
        assert set(per_query[name]["cells"]) == {cell["name"] for cell in table["cells"]}
        for cell in table["cells"]:
            vector = per_query[name]["cells"][cell["name"]]
            assert vector.dtype == np.float32 and len(vector) == len(per_query[name]["ids"])
            assert float(vector.astype(np.float64).mean()) == pytest.approx(
                cell["scores"][name]["main_score"], abs=MTEB_ROUNDING), (name, cell["name"])
    # Not every query scores the same: the vectors carry more than their mean.
    assert any(np.ptp(vector) > 0 for vector in per_query["GettextRetrieval"]["cells"].values())
    assert "query_scores" not in Prober(module, tokenize, tasks, batch_size=16).run(step=3)


def test_retrieval_query_scores_of_known_ranks_among_candidates():
    similarities = torch.tensor([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1], [0.9, 0.5, 0.1], [0.1, 0.2, 0.3]])
    relevance = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    values = retrieval_query_scores(similarities, relevance, top_k=2, candidates=[[0, 1, 2], [0, 1, 2], [0, 1, 2],
                                                                                  [0, 2]])
    # ranks 1, 2, 3 (beyond k = 2), and 2 among its two candidates.
    assert values.tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0, 1 / math.log2(3)])


def test_retrieval_query_scores_equal_torchmetrics_per_query():
    from torchmetrics.functional.retrieval import retrieval_normalized_dcg

    generator = torch.Generator().manual_seed(0)
    similarities = torch.rand(300, 40, generator=generator)
    relevance = (torch.rand(300, 40, generator=generator) < 0.05).long() * torch.randint(1, 3, (300, 40),
                                                                                        generator=generator)
    candidates = [torch.randperm(40, generator=generator)[: 3 + row % 30].tolist() for row in range(300)]
    for columns in (None, candidates):
        values = retrieval_query_scores(similarities, relevance, 10, columns)
        expected = [float(retrieval_normalized_dcg(similarities[row, cols], relevance[row, cols], top_k=10))
                    for row, cols in enumerate(columns or [list(range(40))] * 300)]
        assert values.tolist() == pytest.approx(expected, abs=1e-6)
        assert 0 < values.mean() < 1 and (values == 0).any()  # queries without a relevant candidate score 0


def test_bitext_query_scores_weight_each_subset_to_its_mean():
    de = torch.tensor([[1.0, 0.0], [0.9, 0.1]])  # the second translation finds the first source: 1 of 2
    kk = torch.eye(4)  # 4 of 4
    values = bitext_query_scores([de, kk])
    assert values.tolist() == pytest.approx([1.5, 0.0, 0.75, 0.75, 0.75, 0.75])
    assert values.mean() == pytest.approx((0.5 + 1.0) / 2)


def test_manpage_query_scores_rank_within_each_section(man_dir, tmp_path):  # noqa: F811
    task = ManpageRetrieval.from_corpus(["de"], 10, tmp_path / "corpus", man_dir)
    text = {(page.section, page.page): page.text for pages in task.documents.values() for page in pages}
    vectors = {f"p: {text['man1', name]}": one_hot(i) for i, name in enumerate(["ls.1", "sort.1", "cat.1", "tr.1"])}
    vectors.update({f"p: {text['man5', 'fstab.5']}": [0, 0, 0.6, 0.8], f"p: {text['man5', 'passwd.5']}": [0.6, 0.8, 0, 0]})
    vectors.update({"q: Verzeichnisinhalte auflisten": one_hot(0),             # rank 1
                    "q: Zeilen von Textdateien sortieren": [0.9, 0.8, 0, 0],   # rank 2, behind ls
                    "q: statische Informationen über Dateisysteme": [0, 0, 0, 1]})  # rank 1 in man5 (tr is man1)
    model = CellModel(hand_encoder(vectors), 0, META, may_encode=False, roles=dict(
        (text, role) for role, text in task.probe_inputs()))
    values = task_query_scores(task, model.embed)
    by_id = dict(zip(query_ids(task), values.tolist()))
    assert by_id == pytest.approx({"de/man1/ls.1": 1.0, "de/man1/sort.1": 1 / math.log2(3), "de/man5/fstab.5": 1.0})
    assert values.mean() == pytest.approx(evaluate(model, task, 8)["main_score"], abs=MTEB_ROUNDING)


def test_written_query_scores_read_back_beside_the_table(tmp_path):
    per_query = {"GettextRetrieval": {"ids": ["de-0", "kk-1"], "cells": {
        "layer_4/dim_32": np.array([1.0, 0.5], np.float32), "layer_2/dim_32": np.array([0.25, 0.0], np.float32)}}}
    cells = [{"name": name, "tags": {"layer": layer, "dim": 32}, "bytes": 128,
              "scores": {"GettextRetrieval": {"main_score": 0.5, "subsets": {"default": 0.5}}},
              "mean_main_score": 0.5} for name, layer in (("layer_4/dim_32", 4), ("layer_2/dim_32", 2))]
    table = {"step": 7, "tasks": {"GettextRetrieval": {"main_score": "ndcg_at_10"}}, "cells": cells,
             "query_scores": per_query}
    files = write(table, tmp_path)
    assert files[:2] == [tmp_path / "probe_step_7.json", tmp_path / "probe_step_7.queries.npz"]
    assert "query_scores" not in files[0].read_text()
    read = read_query_scores(files[0])
    assert read["GettextRetrieval"]["ids"] == ["de-0", "kk-1"]
    assert {name: vector.tolist() for name, vector in read["GettextRetrieval"]["cells"].items()} == {
        "layer_4/dim_32": [1.0, 0.5], "layer_2/dim_32": [0.25, 0.0]}
    assert read_query_scores(tmp_path / "probe_step_8.json") == {}
    assert query_file(files[0]) == files[1]
    write_query_scores(tmp_path / "again.queries.npz", per_query)
    assert read_query_scores(tmp_path / "again.queries.npz").keys() == {"GettextRetrieval"}
