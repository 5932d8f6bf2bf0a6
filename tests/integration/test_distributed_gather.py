"""Cross-device in-batch negatives with 2 gloo processes: ``full`` equals one process on the global batch; ``none``
(the reference code) gives passages no gradient from the in-batch term; ``local`` keeps the local slice's."""

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses import ContrastiveLoss
from tests.distributed import WORLD_SIZE, run_worker
from tests.distributed.gather_worker import NEGATIVES, QUERIES, TEMPERATURE, encoder, global_inputs, layout

LOCAL = QUERIES // WORLD_SIZE


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    run_worker("gather_worker", out)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def one_process(hard_negative: bool) -> tuple[dict, dict]:
    """Loss terms and encoder gradients of one process on the concatenated global batch."""
    model = encoder()
    terms = ContrastiveLoss(TEMPERATURE, hard_negative=hard_negative)(model(layout(*global_inputs())), QUERIES, NEGATIVES)
    sum(terms.values()).backward()
    return {key: value.item() for key, value in terms.items()}, {name: p.grad for name, p in model.named_parameters()}


def in_batch_embedding_grads(rank: int, remote_passages_learn: bool) -> torch.Tensor:
    """Hand-written reference: gradient of rank ``rank``'s in-batch loss (its queries against all positives, targets
    at offset rank·LOCAL) with respect to every global embedding row; remote positives detached unless asked."""
    embeddings = encoder()(layout(*global_inputs())).detach().requires_grad_()
    queries = F.normalize(embeddings[rank * LOCAL: (rank + 1) * LOCAL], dim=-1)
    positives = F.normalize(embeddings[QUERIES: 2 * QUERIES], dim=-1)
    if not remote_passages_learn:
        own = torch.zeros(QUERIES, 1, dtype=torch.bool)
        own[rank * LOCAL: (rank + 1) * LOCAL] = True
        positives = torch.where(own, positives, positives.detach())
    logits = queries @ positives.T / TEMPERATURE
    F.cross_entropy(logits, torch.arange(LOCAL) + rank * LOCAL).backward()
    return embeddings.grad


def rows(rank: int) -> tuple[slice, slice]:
    """This rank's query rows and positive rows in the global layout."""
    return slice(rank * LOCAL, (rank + 1) * LOCAL), slice(QUERIES + rank * LOCAL, QUERIES + (rank + 1) * LOCAL)


def test_label_offsets_per_rank(ranks):
    assert [rank["offset"] for rank in ranks] == [0, LOCAL]


@pytest.mark.parametrize("hard_negative", [True, False])
def test_full_gather_loss_and_gradients_equal_one_process(ranks, hard_negative):
    terms, grads = one_process(hard_negative)
    for mode in ("none", "local", "full"):  # the forward pass is the same in every mode
        for key, value in terms.items():
            mean = sum(rank["results"][mode, hard_negative]["terms"][key] for rank in ranks) / WORLD_SIZE
            assert mean == pytest.approx(value, abs=1e-5), (mode, key)
    for rank in ranks:
        for name, grad in grads.items():
            assert grad.abs().max() > 1e-3
            torch.testing.assert_close(rank["results"]["full", hard_negative]["param_grads"][name], grad,
                                       atol=1e-5, rtol=0, msg=name)
    # Without the remote positives' gradient the encoder learns something else.
    none_grad = ranks[0]["results"]["none", hard_negative]["param_grads"]["weight"]
    assert (none_grad - grads["weight"]).abs().max() > 1e-3


def test_embedding_gradients_per_mode(ranks):
    for index, rank in enumerate(ranks):
        query_rows, positive_rows = rows(index)
        local_rows = slice(LOCAL, 2 * LOCAL)  # this rank's positives in its own layout
        own = in_batch_embedding_grads(index, remote_passages_learn=False)
        for mode in ("none", "local", "full"):  # queries learn from every positive in every mode
            torch.testing.assert_close(rank["results"][mode, False]["embedding_grad"][:LOCAL], own[query_rows],
                                       atol=1e-5, rtol=0)
        assert rank["results"]["none", False]["embedding_grad"][local_rows].abs().max() == 0
        torch.testing.assert_close(rank["results"]["local", False]["embedding_grad"][local_rows], own[positive_rows],
                                   atol=1e-5, rtol=0)
        every_rank = sum(in_batch_embedding_grads(other, remote_passages_learn=True) for other in range(WORLD_SIZE))
        full = rank["results"]["full", False]["embedding_grad"][local_rows]
        torch.testing.assert_close(full, every_rank[positive_rows], atol=1e-5, rtol=0)
        assert (full - own[positive_rows]).abs().max() > 1e-3  # remote queries' gradient arrives
