"""Exact resume on 2 ranks (gloo, forked processes): one checkpoint holds every rank's shard positions."""

from __future__ import annotations

import multiprocessing
import pickle
import socket
from types import SimpleNamespace

import torch

from datamodules.pairs import TranslationPairsDataModule
from tests.data_helpers import consume, echo, folder_config

WORLD, STEPS = 2, 12


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_main(rank: int, port: int, config, phase: str, tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        datamodule = TranslationPairsDataModule(config, echo, seed=2)
        datamodule.trainer = SimpleNamespace(world_size=WORLD, global_rank=rank)
        datamodule.setup("fit")
        if phase == "resumed":
            datamodule.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
        seen = consume(datamodule, 2 * STEPS if phase == "straight" else STEPS)
        state = datamodule.state_dict()  # a collective: every rank takes part, as in Lightning's checkpointing
        if rank == 0 and phase == "first":
            torch.save(state, tmp_path / "state.pt")
        (tmp_path / f"{phase}-{rank}.pkl").write_bytes(pickle.dumps(seen))
    finally:
        dist.destroy_process_group()


def run_phase(config, phase: str, tmp_path) -> list[list[tuple]]:
    context, port = multiprocessing.get_context("fork"), free_port()
    processes = [context.Process(target=rank_main, args=(rank, port, config, phase, tmp_path)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0, f"{phase}: a rank failed (exit code {process.exitcode})"
    return [pickle.loads((tmp_path / f"{phase}-{rank}.pkl").read_bytes()) for rank in range(WORLD)]


def test_two_ranks_resume_their_own_shards_from_one_checkpoint(tmp_path):
    config = folder_config(tmp_path, ["data.num_workers=2"])
    straight = run_phase(config, "straight", tmp_path)
    first = run_phase(config, "first", tmp_path)
    resumed = run_phase(config, "resumed", tmp_path)
    for rank in range(WORLD):
        assert first[rank] + resumed[rank] == straight[rank]
    assert [batch[:2] for batch in straight[0]] == [batch[:2] for batch in straight[1]]  # same source sequence
    assert not {q for batch in straight[0] for q in batch[2]} & {q for batch in straight[1] for q in batch[2]}
