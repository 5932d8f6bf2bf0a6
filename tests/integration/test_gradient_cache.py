"""Gradient caching (``loss.cache_chunk_size``): the cached step's loss and parameter gradients equal the uncached
step's, for every axis and loss plugin, padded and packed, with dropout replayed per chunk."""

import mlflow
import pytest
import torch
from torch import nn

from datamodules.tokenization import BatchTokenizer
from experiments.config import ConfigError, compose
from experiments.run import build, train
from lightning_modules.backbone_adapter import last_token_pool, mean_pool
from lightning_modules.backbones.tiny import byte_tokenizer
from lightning_modules.distributed import enable_activation_checkpointing
from lightning_modules.gradient_cache import GradientCache, chunks_of
from lightning_modules.views import EmbeddingBundle

QUERIES = ["Datei nicht gefunden", "Speichern unter", "Ungültige Eingabe", "Verbindung getrennt",
           "Drucken abbrechen"]
PASSAGES = ["File not found", "Save as", "Invalid input", "Connection lost", "Cancel printing"]
NEGATIVES = [["Open file", "Save all"], ["Print", "Quit"], ["Valid input", "Input method"],
             ["Connected", "Lost and found"], ["Print preview", "Cancel"]]
# All axes and the loss plugin at once: exits 2 and 4, widths 32 .. 8, MEL ranks, FFN widths, int8 views, teacher.
ALL_AXES = ["plugins.mll={layers: [2, 4]}", "plugins.mrl={}", "plugins.mel={rank: 16, ranks: [16, 8]}",
            "plugins.ffn={}", "plugins.precision={}", "plugins.distill={}"]
TOLERANCE = 1e-5


def tiny_module(source: str, overrides: list[str] = (), dropout: float = 0.0):
    """The tiny experiment's module with all axes, in train mode, its dropout set to ``dropout``."""
    config = compose("tiny", [f"model.source={source}", *ALL_AXES, *overrides])
    module, _ = build(config)
    for submodule in module.backbone.modules():
        if isinstance(submodule, nn.Dropout):
            submodule.p = dropout
        if hasattr(submodule, "attention_dropout"):  # Qwen3 attention (no other dropout in the model)
            submodule.attention_dropout = dropout
    return module.train(), config


def tiny_batch(source: str, packing: bool = False) -> dict:
    family = "decoder" if source == "tiny_qwen3" else "encoder"
    return BatchTokenizer(byte_tokenizer(), family, max_length=48, packing=packing)(QUERIES, PASSAGES, NEGATIVES)


def uncached_step(module, batch: dict, step: int) -> float:
    """The uncached training step's loss; its gradients land in the parameters."""
    views = module.views(batch, step)
    total = module.weighted_total(views, module.view_losses(views, batch))
    total.backward()
    return total.item()


def cached_step(module, batch: dict, step: int, chunk_size: int) -> float:
    """The cached step as ``training_step`` runs it, with the backward Lightning runs on its result."""
    _, _, total = GradientCache(chunk_size).step(module, batch, step)
    total.backward()
    return total.item()


def chunkwise_graph_step(module, batch: dict, step: int, chunk_size: int) -> float:
    """The reference under dropout: the batch embedded chunk by chunk WITH a graph (each chunk draws its own dropout
    masks, as the cached step does), the hidden states joined into one bundle, the uncached loss code on it."""
    for plugin in module.plugins:
        plugin.before_forward(step)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    outputs = [module.backbone.model(input_ids=ids[start:start + chunk_size],
                                     attention_mask=mask[start:start + chunk_size], output_hidden_states=True)
               for start in range(0, len(ids), chunk_size)]
    hidden = [torch.cat([(*out.hidden_states[:-1], out.last_hidden_state)[layer] for out in outputs])
              for layer in range(module.backbone.info.num_layers + 1)]
    pool = last_token_pool if module.backbone.family == "decoder" else mean_pool
    bundle = EmbeddingBundle(tuple(hidden), lambda states: pool(states, mask), module.backbone.exit_norm)
    views = module.expand(bundle)
    total = module.weighted_total(views, module.view_losses(views, batch))
    total.backward()
    return total.item()


def gradients(module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def assert_same(loss_a: float, grads_a: dict, loss_b: float, grads_b: dict) -> None:
    assert loss_a == pytest.approx(loss_b, abs=TOLERANCE, rel=TOLERANCE)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    # Relative to each tensor's largest gradient (float32 sums in another order differ in the last bits: gradients
    # of magnitude 100 differ by ~1e-5 absolute).
    worst = max(((grads_a[name] - grads_b[name]).abs().max() / grads_b[name].abs().max().clamp_min(1.0)).item()
                for name in grads_a)
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize("source", ["tiny_bert", "tiny_qwen3"])
@pytest.mark.parametrize("packing", [False, True])
def test_cached_step_equals_the_uncached_step_with_every_axis(source, packing):
    module, _ = tiny_module(source)
    batch = tiny_batch(source, packing)  # 5 queries, 5 passages, 10 hard negatives: 20 texts
    for step in (0, 1):  # steps 0 and 1 sample different MEL ranks / FFN widths
        torch.manual_seed(step)
        loss = uncached_step(module, batch, step)
        reference = gradients(module)
        for chunk_size in (1, 3, 7, 20, 64):  # 3 and 7 do not divide 20
            torch.manual_seed(step)
            cached = cached_step(module, batch, step, chunk_size)
            assert_same(cached, gradients(module), loss, reference)


@pytest.mark.parametrize("source", ["tiny_bert", "tiny_qwen3"])
def test_dropout_is_replayed_per_chunk(source):
    module, _ = tiny_module(source, dropout=0.3)
    batch = tiny_batch(source)
    torch.manual_seed(5)
    loss = uncached_step(module, batch, 0)
    reference = gradients(module)
    torch.manual_seed(5)  # one chunk draws the uncached step's masks: the same step
    assert_same(cached_step(module, batch, 0, 64), gradients(module), loss, reference)
    for chunk_size in (3, 8):
        torch.manual_seed(5)
        loss = chunkwise_graph_step(module, batch, 0, chunk_size)
        reference = gradients(module)
        torch.manual_seed(5)
        assert_same(cached_step(module, batch, 0, chunk_size), gradients(module), loss, reference)
    after_step = torch.get_rng_state()
    torch.manual_seed(5)
    chunkwise_graph_step(module, batch, 0, 8)
    module.zero_grad(set_to_none=True)
    assert torch.equal(torch.get_rng_state(), after_step)  # the step consumed randomness once, not twice


def test_cached_step_with_activation_checkpointing_equals_the_uncached_step():
    module, _ = tiny_module("tiny_bert", dropout=0.3)
    batch = tiny_batch("tiny_bert")
    torch.manual_seed(2)
    loss = uncached_step(module, batch, 0)
    reference = gradients(module)
    enable_activation_checkpointing(module.backbone)
    torch.manual_seed(2)
    assert_same(cached_step(module, batch, 0, 64), gradients(module), loss, reference)


def test_packed_chunks_hold_whole_texts_and_all_of_them():
    batch = tiny_batch("tiny_qwen3", packing=True)
    for chunk_size in (1, 4, 9):
        chunks = chunks_of(batch, chunk_size)
        texts = torch.cat([chunk.texts for chunk in chunks])
        assert sorted(texts.tolist()) == list(range(20))
        for chunk in chunks:
            ids = chunk.packing["sequence_ids"]
            assert len(chunk.texts) <= chunk_size or len(chunk.input_ids) == 1  # one row may hold more texts
            for local, text in enumerate(chunk.texts.tolist()):  # every token of each text, in the chunk's numbering
                assert (ids == local).sum() == (batch["packing"]["sequence_ids"] == text).sum()


def test_training_run_with_caching_logs_the_uncached_runs_losses(tiny_config):
    losses = {}
    for name, cache in (("uncached", "null"), ("cached", "3")):
        config = tiny_config("tiny", ["trainer.max_steps=4", "resume=false", f"name=tiny_{name}",
                                      f"loss.cache_chunk_size={cache}"])  # packed batches (the default)
        losses[name] = logged_losses(config, train(config).run_id)
    assert len(losses["cached"]) == 4
    assert losses["cached"] == pytest.approx(losses["uncached"], abs=TOLERANCE)


def test_cached_run_resumes_like_an_uninterrupted_one(tiny_config):
    cached = ["loss.cache_chunk_size=5", "checkpoint_every=2"]
    straight = tiny_config("tiny", [*cached, "trainer.max_steps=4", "resume=false", "name=tiny_straight"])
    expected = logged_losses(straight, train(straight).run_id)
    train(tiny_config("tiny", [*cached, "trainer.max_steps=2", "resume=false", "name=tiny_resumed"]))
    resumed = tiny_config("tiny", [*cached, "trainer.max_steps=4", "name=tiny_resumed"])  # continues the run above
    assert logged_losses(resumed, train(resumed).run_id) == pytest.approx(expected, abs=TOLERANCE)


def logged_losses(config, run_id: str) -> list[float]:
    history = mlflow.MlflowClient(config.tracking.uri).get_metric_history(run_id, "train/loss")
    return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]


def test_chunk_size_below_one_or_with_gradient_accumulation_is_a_config_error():
    with pytest.raises(ConfigError, match="loss.cache_chunk_size"):
        compose("tiny", ["loss.cache_chunk_size=0"])
    with pytest.raises(ConfigError, match="loss.cache_chunk_size.*accumulate_grad_batches"):
        build(compose("tiny", ["loss.cache_chunk_size=4", "trainer.accumulate_grad_batches=2"]))


def test_a_bundle_of_cached_exits_reads_only_those():
    pooled = {2: torch.ones(3, 4), 4: torch.zeros(3, 4)}
    bundle = EmbeddingBundle.of_pooled(pooled, num_layers=4)
    assert bundle.layer(2) is pooled[2] and bundle.root_view().embeddings is pooled[4]
    with pytest.raises(ValueError, match="exit layer 3 was not pooled in this bundle"):
        bundle.layer(3)
