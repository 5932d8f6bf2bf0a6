"""Split a probe's scoring over forked processes: mteb scores one cell at a time in one Python thread, so on a
machine whose other cores idle during the probe (training waits for it) a second process halves the scoring time.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")


def usable_processes(requested: int) -> int:
    """``requested`` capped at the cores this process may run on."""
    return max(1, min(requested, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def _helper(work: Callable[[list], Any], share: list, connection) -> None:
    # The parent's handlers (e.g. a graceful stop that saves a checkpoint) are not this process's business.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection.send(work(share))
    connection.close()


def map_shares(work: Callable[[list[Item]], Any], items: Sequence[Item], processes: int) -> list[Any]:
    """``[work(items[0::n]), work(items[1::n]), ...]`` with ``n = processes``: share 0 here, the others in forked
    processes at the same time.

    The helpers are forks, so ``work`` and everything it reads are inherited, not pickled; only results travel back
    (pickled through a pipe). ``work`` must not touch CUDA or a process group (a fork cannot), and must leave
    nothing the parent needs in its own memory. A helper that dies before answering costs one warning: its share
    is done here.
    """
    items = list(items)
    processes = max(1, min(processes, len(items)))
    if processes == 1:
        return [work(items)]
    context = multiprocessing.get_context("fork")
    helpers = []
    for index in range(1, processes):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_helper, args=(work, items[index::processes], send), daemon=True)
        process.start()
        send.close()  # the helper holds the only sending end: its exit ends the pipe
        helpers.append((process, receive))
    results = [work(items[0::processes])]
    for index, (process, receive) in enumerate(helpers, start=1):
        try:
            results.append(receive.recv())
        except EOFError:
            process.join()
            log.warning("probe: a scoring process ended without its scores (exit code %s); scoring its share here",
                        process.exitcode)
            results.append(work(items[index::processes]))
        finally:
            receive.close()
            process.join()
    return results
