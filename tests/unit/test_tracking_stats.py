"""RunStats: the training clock survives a resume, and peak memory is measured per training session."""

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.run_stats import RunStats, peak_rss_mb, reset_peak_memory

CPU_MODULE = SimpleNamespace(device=torch.device("cpu"))
NO_LOGGER = SimpleNamespace(logger=None, global_step=0)


def test_the_training_clock_continues_from_the_checkpoint():
    before = RunStats()
    before.on_train_start(NO_LOGGER, CPU_MODULE)
    before._session_start -= 5.0  # as if this session had trained for 5 s
    state = before.state_dict()
    assert state["elapsed_s"] == pytest.approx(5.0, abs=0.5)
    after = RunStats()
    after.load_state_dict(state)
    assert after.elapsed() == state["elapsed_s"]  # nothing counted between the checkpoint and the restart
    after.on_train_start(NO_LOGGER, CPU_MODULE)
    time.sleep(0.05)
    assert state["elapsed_s"] + 0.05 <= after.elapsed() < state["elapsed_s"] + 5.0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak reset needs Linux /proc")
def test_peak_memory_is_reset_at_the_start_of_training():
    reset_peak_memory(torch.device("cpu"))
    baseline = peak_rss_mb()
    block = bytearray(200 * 2**20)  # 200 MiB, touched (zero-filled) so it is resident
    with_block = peak_rss_mb()
    del block
    reset_peak_memory(torch.device("cpu"))
    assert with_block - baseline >= 190
    assert peak_rss_mb() < with_block - 150  # the earlier peak is forgotten
