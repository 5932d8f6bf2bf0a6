"""Forked scoring shares: every item is worked on exactly once, in order of shares, and a helper that dies is
redone in the calling process."""

import logging
import os

from evaluation.shares import map_shares, usable_processes


def with_pid(items: list[int]) -> tuple[int, list[int]]:
    return os.getpid(), [item * 10 for item in items]


def test_shares_are_strided_and_the_helpers_are_other_processes():
    parent = os.getpid()
    shares = map_shares(with_pid, range(7), 3)
    assert [values for _, values in shares] == [[0, 30, 60], [10, 40], [20, 50]]
    pids = [pid for pid, _ in shares]
    assert pids[0] == parent and parent not in pids[1:] and len(set(pids)) == 3


def test_one_process_or_fewer_items_than_processes():
    parent = os.getpid()
    assert map_shares(with_pid, [1, 2], 1) == [(parent, [10, 20])]
    assert [values for _, values in map_shares(with_pid, [5], 4)] == [[50]]
    assert map_shares(with_pid, [], 2) == [(parent, [])]


def test_a_helper_that_dies_has_its_share_done_here(caplog):
    parent = os.getpid()

    def dies_in_a_helper(items: list[int]) -> tuple[int, list[int]]:
        if os.getpid() != parent:
            os._exit(3)
        return with_pid(items)

    with caplog.at_level(logging.WARNING):
        shares = map_shares(dies_in_a_helper, range(4), 2)
    assert shares == [(parent, [0, 20]), (parent, [10, 30])]
    assert [record.message for record in caplog.records] == [
        "probe: a scoring process ended without its scores (exit code 3); scoring its share here"]


def test_usable_processes_is_capped_by_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert usable_processes(1) == 1 and usable_processes(cores + 5) == cores and usable_processes(0) == 1
