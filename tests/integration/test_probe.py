"""MTEB probes: hand-built embeddings give the scores mteb must compute, the single encoding sliced per cell equals
encoding every cell separately, and a probe leaves weights, modes, the MEL rank and the RNG streams untouched."""

import contextlib
import logging
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.encoding import CellEmbeddings, Slot, split_views
from evaluation.scoring import Prober, preserved_rng, summary
from datamodules.gettext_corpus import Pair
from contracts.cells import Cell, view_name
from lightning_modules.views import View

with preserved_rng():  # mteb reseeds the global generators on import
    import mteb  # noqa: F401
    from datasets import Dataset
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining
    from mteb.abstasks.task_metadata import TaskMetadata

    from evaluation.grid import CellModel, evaluate, input_texts, model_meta
    from evaluation.tasks import GettextBitextMining, GettextRetrieval, build_tasks

META = model_meta("matryoshka-lab/test", "step-0", 4, None, True)
PREFIXES = SimpleNamespace(query_prefix="q: ", passage_prefix="p: ")


def hand_encoder(vectors: dict[str, list[float]]):
    """A stand-in for GridEncoder whose cache holds the given (prefixed) texts, one 4-d cell."""
    cache = CellEmbeddings()
    cache.add(list(vectors), [Cell({"layer": 1, "dim": 4}, 16)], [Slot(0, 4)],
              [torch.tensor(list(vectors.values()), dtype=torch.float32)])
    return SimpleNamespace(cache=cache, tokenize=PREFIXES)


def one_hot(i: int) -> list[float]:
    return [float(i == j) for j in range(4)]


PAIRS = {"de": [Pair("en zero", "de null", "de", "t"), Pair("en one", "de eins", "de", "t")],
         "kk": [Pair("en two", "kk eki", "kk", "t"), Pair("en three", "kk ush", "kk", "t")]}


def test_bitext_mining_scores_of_hand_built_embeddings():
    pairs = {"de": [Pair(f"en {i}", f"de {i}", "de", "t") for i in range(4)], "kk": PAIRS["kk"]}
    vectors = {f"p: en {i}": one_hot(i) for i in range(4)}  # English sources are read as passages
    # de: translations 0, 1, 3 find their source; "de 2" lies next to "en 3" -> predictions 0, 1, 3, 3.
    vectors.update({"q: de 0": one_hot(0), "q: de 1": one_hot(1), "q: de 2": [0, 0, 0.1, 1], "q: de 3": one_hot(3)})
    vectors.update({"p: en two": one_hot(0), "p: en three": one_hot(1),
                    "q: kk eki": one_hot(0), "q: kk ush": one_hot(1)})
    task = GettextBitextMining(pairs)
    roles = {text: role for role, text in task.probe_inputs()}
    scores = evaluate(CellModel(hand_encoder(vectors), 0, META, may_encode=False, roles=roles), task, 8)
    assert scores["subsets"] == {"de-en": 0.75, "kk-en": 1.0}
    assert scores["main_score"] == pytest.approx(0.875) and scores["accuracy"] == pytest.approx(0.875)
    # de, weighted over the 4 gold classes: precision (1 + 1 + 0 + 1/2) / 4, F1 (1 + 1 + 0 + 2/3) / 4.
    assert scores["precision"] == pytest.approx((0.625 + 1.0) / 2)
    assert scores["f1"] == pytest.approx(((2 + 2 / 3) / 4 + 1.0) / 2)


def test_retrieval_scores_of_hand_built_embeddings():
    documents = {"p: en zero": one_hot(0), "p: en one": one_hot(1), "p: en two": one_hot(2), "p: en three": one_hot(3)}
    queries = {"q: de null": one_hot(0),                     # its source at rank 1
               "q: de eins": [0.9, 0.8, 0, 0],               # rank 2 (behind "en zero")
               "q: kk eki": one_hot(2),                      # rank 1
               "q: kk ush": [0.9, 0.8, 0, 0.7]}              # rank 3
    scores = evaluate(CellModel(hand_encoder({**documents, **queries}), 0, META, may_encode=False),
                      GettextRetrieval(PAIRS), 8)
    assert scores["ndcg_at_10"] == pytest.approx((1 + 1 / math.log2(3) + 1 + 1 / math.log2(4)) / 4, abs=1e-5)
    assert scores["main_score"] == scores["ndcg_at_10"]
    assert scores["recall_at_1"] == pytest.approx(0.5) and scores["recall_at_10"] == pytest.approx(1.0)


class PairSimilarity(AbsTaskSTS):
    """An in-memory STS task (registry tasks of this type go through the same encoder)."""

    metadata = TaskMetadata(
        name="HandSTS", type="STS", main_score="cosine_spearman", description="hand-built pairs",
        dataset={"path": "local/hand", "revision": "1"}, category="t2t", modalities=["text"], eval_splits=["test"],
        eval_langs=["eng-Latn"], date=None, domains=None, task_subtypes=None, license="not specified",
        annotations_creators="derived", dialect=[], sample_creation="found", bibtex_citation="")
    min_score, max_score = 0, 5

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = {"default": {"test": Dataset.from_dict(
            {"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"], "score": [0.0, 2.5, 5.0]})}}
        self.data_loaded = True


def test_sts_scores_of_hand_built_embeddings():
    half = [math.cos(math.pi / 3), math.sin(math.pi / 3), 0, 0]  # cosine 0.5 with e0
    vectors = {"q: a": one_hot(0), "q: x": one_hot(1), "q: b": one_hot(0), "q: y": half, "q: c": one_hot(2),
               "q: z": one_hot(2)}
    scores = evaluate(CellModel(hand_encoder(vectors), 0, META, may_encode=False), PairSimilarity(), 8)
    # cosines 0, 0.5, 1 against gold 0, 2.5, 5: perfectly linear.
    assert scores["cosine_spearman"] == pytest.approx(1.0) and scores["cosine_pearson"] == pytest.approx(1.0)


def test_bitext_metrics_equal_mteb_sklearn_ones():
    task = GettextBitextMining(PAIRS)
    rng = np.random.default_rng(0)
    for n in (1, 7, 64):
        for noisy in (0.0, 0.5, 1.0):
            predictions = np.where(rng.random(n) < noisy, rng.integers(0, n, n), np.arange(n))
            neighbours = [{"corpus_id": int(p), "score": 0.0} for p in predictions]
            gold = list(zip(range(n), range(n)))
            reference = AbsTaskBitextMining._compute_metrics(task, neighbours, gold)  # sklearn's
            assert task._compute_metrics(neighbours, gold) == pytest.approx(reference, abs=1e-12)


def test_input_texts_reads_the_column_in_loader_order():
    from mteb._create_dataloaders import _create_dataloader_from_texts

    texts = [f"text {i}" for i in range(70)]
    loader = _create_dataloader_from_texts(texts, batch_size=32)
    assert input_texts(loader) == [text for batch in loader for text in batch["text"]] == texts


def test_split_views_shares_one_source_per_exit():
    exit_2, exit_4 = torch.randn(3, 8), torch.randn(3, 8)
    views = [View(exit_2[:, :d], tags={"layer": 2, "dim": d, "rank": 16}) for d in (8, 4)]
    views += [View(exit_4[:, :d], tags={"layer": 4, "dim": d, "rank": 16}) for d in (8, 4)]
    views.append(View(torch.tanh(exit_4), tags={"layer": 4, "dim": 8, "squash": "tanh", "rank": 16}))
    cells, slots, sources = split_views(views, num_layers=4)
    assert [(slot.source, slot.width) for slot in slots] == [(0, 8), (0, 4), (1, 8), (1, 4), (2, 8)]
    assert len(sources) == 3 and all(source.shape == (3, 8) for source in sources)
    assert torch.equal(sources[0], exit_2) and torch.equal(sources[1], exit_4)
    assert cells[4].name == "layer_4/dim_8/squash_tanh/rank_16"
    bare, _, _ = split_views([View(exit_4)], num_layers=4)  # no plugin: full depth and width
    assert bare[0].tags == {"layer": 4, "dim": 8}
    assert [cell.bytes for cell in cells] == [32, 16, 32, 16, 32]  # float32: 4 bytes per coordinate
    packed, _, _ = split_views([View(exit_4[:, :4], bits_per_value=1)], num_layers=4)
    assert packed[0].bytes == 1  # 4 sign bits still take a whole byte


def test_cache_lookup_slices_then_renormalises():
    cache = CellEmbeddings()
    full = torch.tensor([[3.0, 4.0, 12.0], [1.0, 0.0, 5.0]])
    cache.add(["a", "b"], [Cell({"layer": 1, "dim": 3}, 12), Cell({"layer": 1, "dim": 2}, 8)],
              [Slot(0, 3), Slot(0, 2)], [full])
    torch.testing.assert_close(cache.lookup(["b", "a"], 1), torch.tensor([[1.0, 0.0], [0.6, 0.8]]))


@pytest.fixture(scope="module")
def tiny_module(corpus_dir):
    from experiments.config import compose
    from experiments.run import build

    config = compose("tiny", [f"data.dir={corpus_dir}", "plugins.mll.layers=[2,4]", "plugins.mrl.dims=[32,16]"])
    module, datamodule = build(config)
    with preserved_rng():
        tasks = build_tasks(["GettextBitextMining", "GettextRetrieval"], corpus_dir, ["de", "kk"], 12)
    return module, datamodule.tokenize, tasks


class NaiveCell(CellModel):
    """The reference: encodes every text again for its cell (what the shared encoding avoids)."""

    def __init__(self, module, tokenize, task, layer: int, dim: int):
        super().__init__(SimpleNamespace(tokenize=tokenize), 0, META, roles={t: r for r, t in task.probe_inputs()})
        self.module, self.tokenize, self.layer, self.dim = module, tokenize, layer, dim

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        batch = self.tokenize.encode(self.keys(inputs, prompt_type))
        with torch.no_grad():
            bundle = self.module.backbone(batch["input_ids"], batch["attention_mask"])
        return F.normalize(bundle.layer(self.layer)[:, : self.dim], dim=-1)


def test_sliced_single_encoding_scores_equal_per_cell_encoding(tiny_module):
    module, tokenize, tasks = tiny_module
    table = Prober(module, tokenize, tasks, batch_size=16).run(step=3)
    assert [cell["name"] for cell in table["cells"]] == [
        f"layer_{l}/dim_{d}/rank_{r}" for r in (16, 8) for l in (2, 4) for d in (32, 16)]
    texts = {(role, text) for task in tasks for role, text in task.probe_inputs()}  # shared by the two tasks
    assert table["texts_encoded_per_device"] == [2 * len(texts)]  # each text once per rank, not once per cell
    module.eval()
    for cell in table["cells"]:
        for task in tasks:
            with module.applied({"rank": cell["tags"]["rank"]}):
                naive = evaluate(NaiveCell(module, tokenize, task, cell["tags"]["layer"], cell["tags"]["dim"]), task,
                                 16)
            mine = cell["scores"][task.metadata.name]
            assert mine["subsets"] == pytest.approx(naive["subsets"], abs=1e-6), cell["name"]
            assert {k: v for k, v in mine.items() if k != "subsets"} == pytest.approx(
                {k: v for k, v in naive.items() if k != "subsets"}, abs=1e-6), cell["name"]
    assert table["summary"]["full"]["cell"] == "layer_4/dim_32/rank_16"
    assert table["summary"]["cheapest"]["cell"] == "layer_2/dim_16/rank_8"


def test_packed_probe_equals_the_padded_one_with_mteb_s_own_helpers(tiny_module, monkeypatch):
    """The fast path (packed forwards, light mteb helpers) against the reference (padded forwards, mteb's own
    loaders and metrics): embeddings within float rounding, every score of every cell the same."""
    import copy

    from evaluation import grid
    from evaluation.encoding import GridEncoder

    module, tokenize, tasks = tiny_module
    padded = copy.copy(tokenize)
    padded.packing = False
    texts = Prober(module, tokenize, tasks)._announced_texts()
    encoders = {}
    module.eval()
    with torch.no_grad():
        for name, batching in (("packed", tokenize), ("padded", padded)):
            encoders[name] = GridEncoder(module, batching, batch_size=16, device=torch.device("cpu"))
            encoders[name].encode_missing(texts)
    assert tokenize.packing and len(texts) > 16  # several packed forwards, each with texts of all lengths
    for cell in range(len(encoders["padded"].cache.cells)):
        torch.testing.assert_close(encoders["packed"].cache.lookup(texts, cell),
                                   encoders["padded"].cache.lookup(texts, cell), rtol=0, atol=1e-5)
    fast = Prober(module, tokenize, tasks, batch_size=16).run(step=2)
    monkeypatch.setattr(grid, "light_mteb", contextlib.nullcontext)
    reference = Prober(module, padded, tasks, batch_size=16).run(step=2)
    assert [cell["name"] for cell in fast["cells"]] == [cell["name"] for cell in reference["cells"]]

    def flat(cell: dict) -> dict[str, float]:
        return {f"{task}/{key}/{subset}": value for task, scores in cell["scores"].items()
                for key, values in scores.items()
                for subset, value in (values.items() if key == "subsets" else [("", values)])}

    for mine, theirs in zip(fast["cells"], reference["cells"]):
        assert flat(mine) == pytest.approx(flat(theirs), abs=1e-6, nan_ok=True), mine["name"]


def test_probe_leaves_weights_modes_rank_and_rng_untouched(tiny_module):
    module, tokenize, tasks = tiny_module
    module.train()
    module.backbone.model.embeddings.eval()  # a submodule deliberately in eval mode stays so
    mel = module.model_side[0]
    mel.set(8)
    weights = {name: value.clone() for name, value in module.state_dict().items()}
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = (random.random(), np.random.random(), torch.rand(1))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    Prober(module, tokenize, tasks, batch_size=16).run(step=0)
    assert (random.random(), np.random.random(), torch.rand(1)) == before
    assert mel.current() == 8 and module.training and not module.backbone.model.embeddings.training
    assert module.backbone.model.encoder.training
    for name, value in module.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_a_task_without_announced_texts_is_encoded_in_its_warm_up_cell(tiny_module):
    module, tokenize, _ = tiny_module
    with preserved_rng():
        task = PairSimilarity()  # like a registry task: no probe_inputs, texts seen only when mteb encodes them
        task.load_data()
    table = Prober(module, tokenize, [task], batch_size=16).run(step=1)
    assert len(table["cells"]) == 8 and all("HandSTS" in cell["scores"] for cell in table["cells"])
    assert table["texts_encoded_per_device"] == [2 * 6]  # its 6 texts, once per rank


class BrokenTask(GettextBitextMining):
    def load_data(self, num_proc=None, **kwargs):
        super().load_data()
        self.dataset = {subset: {"probe": data["probe"].remove_columns("sentence2")}
                        for subset, data in self.dataset.items()}


def test_failing_task_is_logged_and_the_others_are_scored(tiny_module, caplog):
    module, tokenize, tasks = tiny_module
    with preserved_rng():
        broken = BrokenTask(tasks[0].pairs)
        broken.metadata = broken.metadata.model_copy(update={"name": "BrokenBitext"})
        broken.load_data()
    with caplog.at_level(logging.ERROR):
        table = Prober(module, tokenize, [broken, tasks[1]], batch_size=16).run(step=5)
    assert list(table["errors"]) == ["BrokenBitext"] and list(table["tasks"]) == ["GettextRetrieval"]
    assert all(list(cell["scores"]) == ["GettextRetrieval"] for cell in table["cells"])
    assert [r.message for r in caplog.records if "BrokenBitext" in r.message][0].startswith(
        "probe: task BrokenBitext failed at step 5")


def test_forked_scoring_gives_the_one_process_table(tiny_module, monkeypatch, tmp_path):
    """Two scoring processes: the same table as one, and a task failing in a cell the helper scores is left out of
    the whole probe, as in one process."""
    from evaluation import grid, scoring as prober

    module, tokenize, tasks = tiny_module
    monkeypatch.setattr(prober, "usable_processes", lambda requested: requested)  # also on a 1-core machine
    single = Prober(module, tokenize, tasks, batch_size=16).run(step=4)
    scorers, parent, score = tmp_path / "pids", os.getpid(), grid.evaluate

    def evaluate_failing_in_the_helper(model, task, batch_size):
        with scorers.open("a") as pids:
            pids.write(f"{os.getpid()}\n")
        if os.getpid() != parent and task.metadata.name == "GettextBitextMining":
            raise ValueError(f"no bitext for cell {model.cell}")
        return score(model, task, batch_size)

    forked = Prober(module, tokenize, tasks, batch_size=16, scoring_processes=2).run(step=4)
    assert forked["cells"] == single["cells"]
    monkeypatch.setattr(grid, "evaluate", evaluate_failing_in_the_helper)
    failing = Prober(module, tokenize, tasks, batch_size=16, scoring_processes=2).run(step=4)
    assert len(set(scorers.read_text().split())) == 2  # this process and one helper, for both MEL ranks
    # Cells (after each rank's warm-up cell 0) alternate between the processes: the helper's first is rank 16's 2.
    assert failing["errors"] == {"GettextBitextMining": "ValueError at layer_4/dim_32/rank_16: no bitext for cell 2"}
    assert [cell["scores"] for cell in failing["cells"]] == [
        {"GettextRetrieval": cell["scores"]["GettextRetrieval"]} for cell in single["cells"]]


def test_unavailable_registry_task_is_skipped_with_one_line(corpus_dir, caplog):
    with caplog.at_level(logging.WARNING), preserved_rng():
        tasks = build_tasks(["GettextBitextMining", "STS12"], corpus_dir, ["de"], 4)
    assert [task.metadata.name for task in tasks] == ["GettextBitextMining"]
    lines = [record.message for record in caplog.records if "STS12" in record.message]
    assert len(lines) == 1 and "not available locally" in lines[0]


def test_probe_config_errors_name_the_key(tiny_config):
    from evaluation.probing import check_tasks
    from experiments.config import ConfigError

    with pytest.raises(ConfigError, match="probe.tasks.*'NoSuchTask'"):
        check_tasks(tiny_config("tiny", ["probe.tasks=[GettextRetrieval,NoSuchTask]"]).probe)
    with pytest.raises(ConfigError, match="probe.final.tasks.*'NoFinalTask'"):
        check_tasks(tiny_config("tiny", ["probe.final.tasks=[ManpageRetrieval,NoFinalTask]"]).probe)
    with pytest.raises(ConfigError, match="probe.every_n_steps"):
        tiny_config("tiny", ["probe.every_n_steps=-1"])
    with pytest.raises(ConfigError, match="probe.batch_size"):
        tiny_config("tiny", ["probe.batch_size=0"])
    with pytest.raises(ConfigError, match=r"probe.scoring_processes`: 0 must be >= 1"):
        tiny_config("tiny", ["probe.scoring_processes=0"])


def test_summary_picks_full_and_cheapest_by_depth_storage_rank_and_per_value_of_a_new_axis():
    def cell(layer, dim, rank, precision, bits, score):
        tags = {"layer": layer, "dim": dim, "rank": rank, "precision": precision}
        return {"name": view_name(tags), "tags": tags, "bytes": -(-dim * bits // 8), "mean_main_score": score}

    cells = [cell(4, 64, 16, "fp32", 32, 0.9), cell(4, 64, 16, "binary", 1, 0.7),
             cell(2, 8, 8, "fp32", 32, 0.5), cell(2, 8, 8, "binary", 1, 0.2), cell(2, 64, 8, "binary", 1, 0.4)]
    chosen = {label: (entry["cell"], entry["mean_main_score"]) for label, entry in summary(cells).items()}
    assert chosen == {
        "full": ("layer_4/dim_64/rank_16/precision_fp32", 0.9),
        "cheapest": ("layer_2/dim_8/rank_8/precision_binary", 0.2),  # 1 byte: fewer than 64-d binary's 8
        "full/precision_fp32": ("layer_4/dim_64/rank_16/precision_fp32", 0.9),
        "cheapest/precision_fp32": ("layer_2/dim_8/rank_8/precision_fp32", 0.5),
        "full/precision_binary": ("layer_4/dim_64/rank_16/precision_binary", 0.7),
        "cheapest/precision_binary": ("layer_2/dim_8/rank_8/precision_binary", 0.2),
    }
