"""Gradient caching on 2 CPU processes (gloo), ``gather: full``: one cached DDP or FSDP2 step (chunks of 3 texts, packed
batches, MLL × MRL × MEL) equals one uncached process on the global batch; gradients are reduced once, after the
last chunk."""

import pytest

from tests.distributed import run_worker
from tests.integration.test_distributed_training import (assert_same_weights, common, load_runs,  # noqa: F401
                                                         mean_loss, reference)

CACHED = ["loss.cache_chunk_size=3", "loss.gather=full", "trainer.max_steps=1"]


@pytest.mark.slow  # ~1 min: two 2-process runs
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_cached_step_on_two_processes_equals_one_process_on_the_global_batch(common, reference, strategy):  # noqa: F811
    out, overrides = common
    folder = out / f"cached_{strategy}"
    folder.mkdir()
    run_worker("train_worker", folder, *overrides, f"output_dir={folder}", f"distributed.strategy={strategy}",
               *CACHED, torchrun=strategy == "fsdp2")
    ranks = load_runs(folder, 1)[0]
    loss, weights = reference[1]
    assert mean_loss(ranks) == pytest.approx(loss, abs=1e-5)
    for rank in ranks:
        assert rank["losses"][0] != pytest.approx(loss, abs=1e-3)  # each rank's own loss differs: the test is not trivial
    if strategy == "ddp":
        for rank in ranks:
            assert_same_weights(rank["end"]["params"], weights, initial=rank["start"]["params"])
    else:
        from tests.integration.test_distributed_training import gathered

        assert_same_weights(gathered(ranks), weights, initial=gathered(ranks, "start"))
