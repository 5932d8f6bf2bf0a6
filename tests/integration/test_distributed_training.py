"""``train()`` on 2 CPU processes (gloo): FSDP2 really shards, one FSDP2 or DDP step equals one process on the
global batch, and FSDP2's distributed checkpoints save and resume exactly.

FSDP2 runs under torchrun (the multi-node launcher; ranks start together), DDP under Lightning's own launcher
(``trainer.devices=2``: rank 0 re-runs the command for rank 1)."""

import math
from pathlib import Path

import mlflow
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from experiments.config import compose
from experiments.run import RUN_DIR_ENV, train
from tests.distributed import WORLD_SIZE, run_worker
from tests.distributed.train_worker import use_fixed_batches


@pytest.fixture(scope="module")
def common(tmp_path_factory, corpus_dir, mlflow_dir):
    """Overrides shared by the 2-process runs and the one-process reference (the tiny experiment, fixed batches)."""
    out = tmp_path_factory.mktemp("distributed")
    return out, [f"data.dir={corpus_dir}", f"tracking.uri=sqlite:///{mlflow_dir}/mlflow.db",
                 f"tracking.artifact_dir={mlflow_dir}/artifacts", "trainer.enable_progress_bar=false",
                 "data.locales=[de]", "checkpoint_every=1", "probe.enabled=false"]


def load_runs(out: Path, count: int) -> list[list[dict]]:
    return [[torch.load(out / f"run{run}_rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
            for run in range(count)]


@pytest.fixture(scope="module")
def fsdp2(common, reference):
    """One FSDP2 step with a sharded checkpoint, then the same command with max_steps=2, which resumes from it with
    activation checkpointing on (it changes no number). The first run also probes (MTEB: forwards without backward
    on every rank) at its start and end.
    (After ``reference``: torchrun starts both ranks at once, and the MLflow store must exist by then.)"""
    out, overrides = common
    fsdp2 = [*overrides, "distributed.strategy=fsdp2"]
    run_worker("train_worker", out, *fsdp2, "trainer.max_steps=1", "probe.enabled=true", "probe.every_n_steps=0",
               "--", *fsdp2, "trainer.max_steps=2", "distributed.activation_checkpointing=true",
               torchrun=True, env={RUN_DIR_ENV: str(out / "fsdp2_run")})
    return load_runs(out, 2)


@pytest.fixture(scope="module")
def reference(common):
    """One process on the whole global batch: step 1, then resumed to step 2 (1 thread, like each worker: MEL's
    SVD init depends on the LAPACK thread count)."""
    out, overrides = common
    patch = pytest.MonkeyPatch()
    use_fixed_batches(patch.setattr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        for steps in (1, 2):  # the second run overwrites the first one's checkpoint: read it now
            result = train(compose("tiny", [*overrides, f"output_dir={out}/reference", f"trainer.max_steps={steps}"]))
            results[steps] = result.metrics["train/loss"], torch.load(result.checkpoint, weights_only=False)["state_dict"]
    finally:
        torch.set_num_threads(threads)
        patch.undo()
    return results


def logged_losses(ranks: list[dict], mlflow_dir: Path) -> dict[int, float]:
    """``{step: value}`` of the run's ``train/loss`` in MLflow (one run for all ranks)."""
    assert ranks[0]["run_id"] == ranks[1]["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{mlflow_dir}/mlflow.db")
    return {metric.step: metric.value for metric in client.get_metric_history(ranks[0]["run_id"], "train/loss")}


def mean_loss(ranks: list[dict]) -> float:
    """The global batch's loss: every rank's loss is the mean over its equal share of queries."""
    return sum(rank["losses"][0] for rank in ranks) / WORLD_SIZE


def gathered(ranks: list[dict], moment: str = "end") -> dict:
    """Full parameters from every rank's dim-0 shard."""
    return {name: torch.cat([rank[moment]["params"][name] for rank in ranks]) for name in ranks[0][moment]["params"]}


def full_state(checkpoint: str, tmp_path: Path) -> dict:
    dcp_to_torch_save(checkpoint, tmp_path / "full.pt")
    return torch.load(tmp_path / "full.pt", weights_only=False)["state_dict"]


def assert_same_weights(actual: dict, expected: dict, initial: dict | None = None) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if initial is not None and value.ndim == 2:
            assert (value - initial[name]).abs().max() > 1e-4, name  # the step moved it: the check is not trivial
        torch.testing.assert_close(actual[name], value, atol=1e-5, rtol=0, msg=lambda message: f"{name}: {message}")


def test_each_rank_holds_half_of_every_parameter(fsdp2):
    shards = [rank["shards"] for rank in fsdp2[0]]
    assert len(shards[0]) > 60 and any("word_embeddings.left" in name for name in shards[0])  # MEL's factors too
    for name, (local, full, kind) in shards[0].items():
        assert kind == "DTensor", name
        first = math.ceil(full[0] / WORLD_SIZE)  # dim-0 shards; the last rank gets the remainder
        assert local == (first, *full[1:]), name
        assert shards[1][name][0] == (full[0] - first, *full[1:]), name
        assert abs(math.prod(local) - math.prod(full) / 2) <= math.prod(full[1:]), name


def test_fsdp2_step_equals_one_process(fsdp2, reference):
    loss, weights = reference[1]
    assert mean_loss(fsdp2[0]) == pytest.approx(loss, abs=1e-5)
    assert_same_weights(gathered(fsdp2[0]), weights, initial=gathered(fsdp2[0], "start"))


def test_fsdp2_logs_the_loss_of_the_global_batch(fsdp2, reference, mlflow_dir):
    """MLflow's train/loss is the one-process loss of the concatenated batch, not one device's loss (which differs)."""
    first, resumed = fsdp2
    assert logged_losses(resumed, mlflow_dir) == pytest.approx({0: reference[1][0], 1: reference[2][0]}, abs=1e-5)
    for step, ranks in enumerate(fsdp2):
        assert abs(ranks[0]["losses"][-1] - reference[step + 1][0]) > 1e-3  # rank 0's own loss is another number


def test_checkpoint_is_one_shard_per_rank(fsdp2):
    checkpoint = Path(fsdp2[0][0]["checkpoint"])
    assert checkpoint.parts[-3:] == ("fsdp2_run", "checkpoints", "last.ckpt")  # $MATRYOSHKA_RUN_DIR, for every rank
    metadata = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    key = "state_dict.backbone.model.encoder.layer.0.attention.self.query.weight"
    assert [chunk.offsets[0] for chunk in metadata[key].chunks] == [0, 16]  # 32 rows: rank 0 wrote 0-15, rank 1 16-31
    assert {path.name for path in checkpoint.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", ".metadata"}


def test_resume_with_activation_checkpointing_continues_like_one_process(fsdp2, reference, tmp_path):
    for before, after in zip(*fsdp2):
        assert after["start"]["step"] == 1 and after["end"]["step"] == 2
        assert after["activation_checkpointing"] and not before["activation_checkpointing"]
        assert after["checkpoint"] == before["checkpoint"]  # the same run folder, continued
        for part in ("params", "moments"):
            assert after["start"][part].keys() == before["end"][part].keys()
            for name, value in before["end"][part].items():
                assert torch.equal(after["start"][part][name], value), name
    loss, weights = reference[2]
    assert mean_loss(fsdp2[1]) == pytest.approx(loss, abs=1e-5)
    assert_same_weights(gathered(fsdp2[1]), weights, initial=gathered(fsdp2[0], "start"))
    assert_same_weights(full_state(fsdp2[1][0]["checkpoint"], tmp_path), weights)  # the final sharded checkpoint


@pytest.fixture(scope="module")
def ddp(common):
    """One DDP step under Lightning's launcher: ``(out_dir, ranks)``."""
    out, overrides = common
    ddp = out / "ddp"
    ddp.mkdir()
    run_worker("train_worker", ddp, *overrides, f"output_dir={ddp}", "distributed.strategy=ddp", "trainer.max_steps=1")
    return ddp, load_runs(ddp, 1)[0]


@pytest.mark.slow  # ~45 s: Lightning's launcher starts rank 1 only after rank 0 has imported and built everything
def test_ddp_step_equals_one_process(ddp, reference):
    out, ranks = ddp
    loss, weights = reference[1]
    assert mean_loss(ranks) == pytest.approx(loss, abs=1e-5)
    runs = list((out / "tiny").iterdir())
    assert len(runs) == 1  # rank 1, started by Lightning's launcher, wrote into rank 0's run folder
    for rank in ranks:
        assert all(kind == "Parameter" for _, _, kind in rank["shards"].values())  # replicated, not sharded
        assert_same_weights(rank["end"]["params"], weights)


@pytest.mark.slow  # the DDP run above
def test_ddp_logs_the_loss_of_the_global_batch(ddp, reference, mlflow_dir):
    _, ranks = ddp
    assert logged_losses(ranks, mlflow_dir) == pytest.approx({0: reference[1][0]}, abs=1e-5)
    assert abs(ranks[0]["losses"][0] - reference[1][0]) > 1e-3  # rank 0's own loss is another number


@pytest.fixture(scope="module")
def dropout_runs(common, fsdp2):
    """Dropout on, FSDP2 on 2 ranks: 4 steps straight, and 2 steps then the same command resumed to 4, each in its
    own run folder: ``(straight, [first, resumed])``. (After ``fsdp2``: its torchrun must have created the store.)"""
    out, overrides = common
    runs = {}
    for name, phases in (("straight", [["trainer.max_steps=4"]]),
                         ("resumed", [["trainer.max_steps=2"], ["trainer.max_steps=4"]])):
        folder = out / f"dropout_{name}"
        folder.mkdir()
        dropout = [*overrides, "distributed.strategy=fsdp2", "model.tiny.dropout=0.1", "checkpoint_every=2"]
        arguments = " -- ".join(" ".join([*dropout, *phase]) for phase in phases).split(" ")
        run_worker("train_worker", folder, *arguments, torchrun=True, env={RUN_DIR_ENV: str(folder / "run")})
        runs[name] = load_runs(folder, len(phases))
    return runs["straight"][0], runs["resumed"]


@pytest.mark.slow  # ~50 s beyond the fixtures above: two more torchrun launches
def test_a_resume_with_dropout_continues_every_rank_like_the_straight_run(dropout_runs):
    """Each rank gets its own generators back (before: both restarted from the seed and drew other masks)."""
    straight, (first, resumed) = dropout_runs
    for rank in range(WORLD_SIZE):
        assert first[rank]["losses"] + resumed[rank]["losses"] == straight[rank]["losses"], rank
    assert_same_weights(gathered(resumed), gathered(straight))
    saved = torch.load(Path(first[0]["checkpoint"]) / "meta.pt", weights_only=True)["random_states"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])  # the ranks' states differ
