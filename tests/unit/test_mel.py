from collections import Counter

import pytest
import torch

from experiments.config import compose
from lightning_modules.backbone_adapter import BackboneInfo
from lightning_modules.plugins import ConfigError, MEL
from lightning_modules.plugins.mel import FactorizedEmbedding, MELConfig

INFO = BackboneInfo(hidden_size=1024, num_layers=28, vocab_size=151_936, family="decoder", intermediate_size=64)


def test_paper_ladder_and_probabilities_for_rank_512():
    plugin = MEL(MELConfig(rank=512), INFO, seed=0)
    assert plugin.settings == [512, 256, 128, 64]
    # ∝ rank: 512/960, 256/960, 128/960, 64/960.
    assert [round(p, 3) for p in plugin.probabilities] == [0.533, 0.267, 0.133, 0.067]


def test_empirical_rank_frequencies_match():
    plugin = MEL(MELConfig(rank=512), INFO, seed=3)
    steps = 20_000
    counts = Counter(plugin.sample(step) for step in range(steps))
    for rank, probability in zip(plugin.settings, plugin.probabilities):
        assert counts[rank] / steps == pytest.approx(probability, abs=0.01)


def test_rank_is_a_pure_function_of_seed_and_step():
    first, again, other_seed = (MEL(MELConfig(rank=512), INFO, seed=s) for s in (7, 7, 8))
    torch.manual_seed(123)  # the global RNG must not matter
    sequence = [first.sample(step) for step in range(200)]
    torch.manual_seed(999)
    assert [again.sample(step) for step in reversed(range(200))] == sequence[::-1]
    assert [other_seed.sample(step) for step in range(200)] != sequence


@pytest.mark.parametrize("config, key", [
    (MELConfig(rank=2048), "rank"),
    (MELConfig(rank=0), "rank"),
    (MELConfig(rank=256, ranks=[256, 512]), "ranks"),
    (MELConfig(rank=256, ranks=[256, 64], probabilities=[1.0]), "probabilities"),
])
def test_invalid_rank_config(config, key):
    with pytest.raises(ConfigError) as error:
        MEL(config, INFO, seed=0)
    assert error.value.key == key


def test_rank_limit_is_min_of_vocab_and_width():
    small_vocab = BackboneInfo(hidden_size=64, num_layers=2, vocab_size=40, family="encoder", intermediate_size=64)
    with pytest.raises(ConfigError, match=r"\[1, 40\]"):
        MEL(MELConfig(rank=48), small_vocab, seed=0)


def factorized(vocab=50, width=12, rank=8, seed=0) -> FactorizedEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return FactorizedEmbedding(torch.randn(vocab, rank, generator=generator),
                               torch.randn(rank, width, generator=generator))


@pytest.mark.parametrize("rank", [8, 5, 1])
def test_gather_first_equals_materialize_then_index_in_values_and_gradients(rank):
    ids = torch.tensor([[3, 7, 7, 0], [49, 1, 3, 2]])
    fast, reference = factorized(), factorized()
    fast.rank = reference.rank = rank
    out_fast, out_reference = fast(ids), reference.forward_materialized(ids)
    torch.testing.assert_close(out_fast, out_reference)
    upstream = torch.randn_like(out_fast)
    (out_fast * upstream).sum().backward()
    (out_reference * upstream).sum().backward()
    torch.testing.assert_close(fast.left.grad, reference.left.grad)
    torch.testing.assert_close(fast.right.grad, reference.right.grad)
    assert fast.left.grad[:, rank:].abs().sum() == 0  # inactive components get no gradient


def test_merged_matrix_reproduces_factorized_forward():
    embedding = factorized()
    embedding.rank = 4
    ids = torch.tensor([0, 5, 9, 49])
    merged = torch.nn.Embedding.from_pretrained(embedding.merged_weight(4))
    torch.testing.assert_close(merged(ids), embedding(ids))


def test_svd_init_reconstructs_the_matrix_and_truncation_is_optimal():
    weight = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    full = FactorizedEmbedding.from_svd(weight, rank=6)
    torch.testing.assert_close(full.merged_weight(), weight, atol=1e-5, rtol=1e-5)
    # Eckart–Young: the rank-2 truncation error equals the norm of the dropped singular values.
    singular_values = torch.linalg.svdvals(weight)
    error = torch.linalg.matrix_norm(full.merged_weight(2).detach() - weight).item()
    assert error == pytest.approx(singular_values[2:].norm().item(), rel=1e-4)
    assert full.num_parameters(2) == 2 * (30 + 6)


def test_model_and_optimizer_hold_no_full_embedding_matrix(tmp_path):
    from experiments.run import build

    config = compose("tiny", [f"output_dir={tmp_path}"])
    module, _ = build(config)
    info = module.backbone.info
    shapes = [tuple(p.shape) for p in module.parameters()]
    assert (info.vocab_size, info.hidden_size) not in shapes
    assert (info.vocab_size, 16) in shapes and (16, info.hidden_size) in shapes
    trainer = type("T", (), {"estimated_stepping_batches": 10})()
    module.trainer = trainer  # configure_optimizers only needs the step count
    optimizer = module.configure_optimizers()["optimizer"]
    optimized = [tuple(p.shape) for group in optimizer.param_groups for p in group["params"]]
    assert (info.vocab_size, info.hidden_size) not in optimized and (info.vocab_size, 16) in optimized


def test_explicit_probabilities_pair_with_the_ranks_as_written():
    plugin = MEL(MELConfig(rank=256, ranks=[64, 256], probabilities=[1.0, 3.0]), INFO, seed=0)
    assert plugin.settings == [256, 64] and plugin.probabilities == pytest.approx([0.75, 0.25])


POSTHOC = ["plugins.mel.rank=32", "plugins.mel.ranks=[32,16]", "plugins.mel.posthoc=true"]


def posthoc_module(tmp_path):
    from experiments.run import build

    module, _ = build(compose("tiny", [f"output_dir={tmp_path}", *POSTHOC]))
    module.eval()
    return module, module.model_side[0]


def test_posthoc_trains_the_models_own_embedding_under_names_without_a_rank(tmp_path):
    module, mel = posthoc_module(tmp_path)
    info = module.backbone.info
    embedding = module.backbone.input_embeddings()
    assert isinstance(embedding, torch.nn.Embedding) and (info.vocab_size, info.hidden_size) == embedding.weight.shape
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    mel.before_forward(step=3)  # a non-posthoc run would sample a rank here
    views = module.forward_views(ids, mask)
    assert {view.tags["rank"] for view in views} == {32} and mel.step_metrics() == {"mel/rank": 32.0}  # untruncated
    assert all("rank" not in view.name for view in views)  # ... which names leave out
    assert [cell.tags["rank"] for cell in module.cells()][::len(views)] == [32, 16]  # the probe still sees both ranks
    names = [cell.name for cell in module.cells()]
    assert "layer_4/dim_32" in names and "layer_4/dim_32/rank_16" in names and len(set(names)) == len(names)


def test_posthoc_adds_the_untruncated_setting_to_a_ladder_below_full_rank(tmp_path):
    from experiments.run import build

    module, _ = build(compose("tiny", [f"output_dir={tmp_path}", "plugins.mel.rank=16", "plugins.mel.ranks=[16,8]",
                                       "plugins.mel.posthoc=true"]))
    assert module.settings() == [{"rank": 32}, {"rank": 16}, {"rank": 8}]  # 32 = min(vocab, d): the own embedding
    full = module.full_settings
    assert full == {"rank": 32}
    # the untruncated cells share the names of a run without MEL; the truncated ones those of a MEL run
    plain, _ = build(compose("tiny", [f"output_dir={tmp_path}/plain", "plugins.mel=null"]))
    trained, _ = build(compose("tiny", [f"output_dir={tmp_path}/mel"]))
    names = {cell.name for cell in module.cells()}
    assert {cell.name for cell in plain.cells()} < names and {cell.name for cell in trained.cells()} < names


def test_posthoc_full_rank_is_the_own_embedding_and_the_original_module_is_restored(tmp_path):
    module, mel = posthoc_module(tmp_path)
    original = module.backbone.input_embeddings()
    before = original.weight.detach().clone()
    ids, mask = torch.tensor([[5, 6, 7, 9]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        reference = {view.name: view.embeddings for view in module.forward_views(ids, mask)}
        torch.testing.assert_close(mel._factors().merged_weight(32), before, atol=1e-5, rtol=1e-5)  # SVD exact at d
        with module.applied({"rank": 16}):
            assert module.backbone.input_embeddings() is not original and mel.current() == 16
        with module.applied({"rank": 32}):
            assert module.backbone.input_embeddings() is original and mel.current() == 32
        encoded = module.encode(ids, mask, [cell for cell in module.cells() if cell.tags["rank"] == 32])
    assert module.backbone.input_embeddings() is original and mel.current() == 32
    assert torch.equal(original.weight, before)
    assert set(encoded) == set(reference)
    for name, embeddings in encoded.items():
        torch.testing.assert_close(embeddings, torch.nn.functional.normalize(reference[name], dim=-1))


def test_posthoc_truncation_is_the_svd_of_the_current_weights(tmp_path):
    module, mel = posthoc_module(tmp_path)
    weight = module.backbone.input_embeddings().weight
    with torch.no_grad(), module.applied({"rank": 16}):
        error = torch.linalg.matrix_norm(module.backbone.input_embeddings().merged_weight() - weight).item()
    # Eckart–Young: the rank-16 truncation error is the norm of the dropped singular values.
    assert error == pytest.approx(torch.linalg.svdvals(weight.detach())[16:].norm().item(), rel=1e-4)
    with torch.no_grad():
        weight.mul_(2.0)  # an optimizer step changes the weights in place: the next setting sees them
    with torch.no_grad():
        torch.testing.assert_close(mel._factors().merged_weight(32), weight, atol=2e-5, rtol=1e-5)
