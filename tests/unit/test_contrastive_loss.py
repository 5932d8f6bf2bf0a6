import math

import pytest
import torch

from lightning_modules.losses import ContrastiveLoss, gather_positives

# Queries, positives, then one hard negative per query (unnormalised on purpose: the loss normalises).
EMBEDDINGS = torch.tensor([[2.0, 0.0], [0.0, 3.0],     # q1, q2
                           [1.0, 0.0], [1.0, 1.0],     # p1, p2
                           [0.0, 5.0], [4.0, 0.0]])    # n1, n2
COS_Q2_P2 = 1 / math.sqrt(2)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_hard_negative_and_in_batch_terms_match_hand_computation():
    terms = ContrastiveLoss(temperature=1.0)(EMBEDDINGS, num_queries=2, negatives_per_query=1)
    # q1: [cos(q1,p1), cos(q1,n1)] = [1, 0]; q2: [cos(q2,p2), cos(q2,n2)] = [1/√2, 0]; target 0.
    hard = (softplus(-1.0) + softplus(-COS_Q2_P2)) / 2
    # q1 vs [p1, p2] = [1, 1/√2], target p1; q2 vs [p1, p2] = [0, 1/√2], target p2.
    in_batch = (softplus(COS_Q2_P2 - 1.0) + softplus(-COS_Q2_P2)) / 2
    assert terms["hard"].item() == pytest.approx(hard, rel=1e-6)
    assert terms["in_batch"].item() == pytest.approx(in_batch, rel=1e-6)


def test_views_of_equal_width_are_computed_together_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    loss = ContrastiveLoss(temperature=0.05)
    embeddings = [torch.randn(4 * 4, width, requires_grad=True) for width in (16, 8, 16, 8, 16)]
    together = loss.per_view(embeddings, num_queries=4, negatives_per_query=2)
    one_by_one = [loss(view, num_queries=4, negatives_per_query=2) for view in embeddings]
    for grouped, single in zip(together, one_by_one):
        assert grouped.keys() == single.keys() == {"hard", "in_batch"}
        assert all(torch.allclose(grouped[term], single[term], atol=1e-6) for term in single)
    weights = torch.rand(len(embeddings))

    def gradients(per_view_terms):
        total = sum(weight * sum(terms.values()) for weight, terms in zip(weights, per_view_terms))
        return torch.autograd.grad(total, embeddings)

    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gradients(together), gradients(one_by_one)))
    stacked = loss(torch.stack(embeddings[::2]), num_queries=4, negatives_per_query=2)  # [views, texts, width]
    assert stacked["hard"].shape == (3,) and torch.allclose(stacked["hard"][1], one_by_one[2]["hard"], atol=1e-6)


def test_temperature_divides_the_cosines():
    terms = ContrastiveLoss(temperature=0.05)(EMBEDDINGS.double(), num_queries=2, negatives_per_query=1)
    assert terms["hard"].item() == pytest.approx((softplus(-20.0) + softplus(-COS_Q2_P2 / 0.05)) / 2, rel=1e-5)


def test_without_negatives_only_the_in_batch_term_and_source_switch():
    loss = ContrastiveLoss(temperature=1.0)
    assert set(loss(EMBEDDINGS[:4], num_queries=2)) == {"in_batch"}
    assert set(loss(EMBEDDINGS, 2, 1, in_batch=False)) == {"hard"}
    with pytest.raises(ValueError, match="no loss term"):
        loss(EMBEDDINGS[:4], 2, 0, in_batch=False)


def test_bad_shapes_and_settings_are_rejected():
    with pytest.raises(ValueError, match="expected 6"):
        ContrastiveLoss()(EMBEDDINGS[:5], num_queries=2, negatives_per_query=1)
    with pytest.raises(ValueError, match="none, local, full"):
        ContrastiveLoss(gather="all")
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=0)


@pytest.mark.parametrize("mode", ["none", "local", "full"])
def test_single_process_gather_is_identity_with_zero_offset(mode):
    passages = torch.randn(3, 4, requires_grad=True)
    gathered, offset = gather_positives(passages, mode)
    assert gathered is passages and offset == 0
