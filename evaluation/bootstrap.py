"""Paired bootstrap of two sides' per-query scores over many cells at once: the resampled means behind the 95 %
intervals of :mod:`evaluation.comparison` and of the claims of :mod:`experiments.paper`.

A side is one run or several (seeds) scored on the same queries. Each resample draws the queries with replacement,
the same draw for both sides (paired: a query that is hard for A is hard for B) and for every cell; with several
seeds on a side it first draws that side's seeds with replacement (hierarchical: seeds, then queries), so the
interval also holds the run-to-run spread. Tasks are resampled independently (their queries differ) and averaged,
as the mean main score averages them. Intervals are percentile intervals of the resampled statistic.

Why not ``scipy.stats.bootstrap(paired=True)``: it handles one statistic at a time and has no hierarchical
resampling. Measured on this 2-core machine (others' tests running) for 60 cells × 2,000 queries × 10,000
resamples: scipy's percentile interval 3.0 s per cell (182 s for 60 cells, BCa 3.9 s per cell); one shared draw
here 4.2 s for all 60 cells (drawing the indices is most of it; the means are one matrix product per chunk).
``test_one_seed_interval_matches_scipy_s_paired_bootstrap`` checks both agree on the one-seed case.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
CHUNK = 1_000  # resamples per matrix product: ~16 MB of counts for 2,000 queries


def _counts(generator: np.random.Generator, draws: int, size: int) -> np.ndarray:
    """``[draws, size]``: how often each of ``size`` items is drawn in each of ``draws`` resamples of ``size``."""
    indices = generator.integers(0, size, (draws, size)) + np.arange(draws)[:, None] * size
    return np.bincount(indices.ravel(), minlength=draws * size).reshape(draws, size).astype(np.float64)


def resampled_means(tasks: list[tuple[np.ndarray, np.ndarray]], resamples: int = RESAMPLES, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap distributions of each side's score per cell: ``(A, B)``, each ``[resamples, cells]``.

    Args:
        tasks: per task ``(a, b)``, each ``[seeds, cells, queries]`` (the same queries in the same order on both
            sides; a side's seed and cell counts are the same in every task, the sides' cells may differ). A side's
            score of a cell is the mean over tasks of the mean over its seeds of the mean over queries.
        resamples: bootstrap resamples.
        seed: the generator's seed (the same inputs give the same intervals).
    """
    generator = np.random.default_rng(seed)
    seeds = [tasks[0][side].shape[0] for side in (0, 1)]
    # Seed weights per side: multiplicity of each seed in the resample over the seed count (all 1 with one seed).
    weights = [_counts(generator, resamples, count) / count for count in seeds]
    means = [np.zeros((resamples, tasks[0][side].shape[1])) for side in (0, 1)]
    for a, b in tasks:
        queries = a.shape[2]
        for start in range(0, resamples, CHUNK):
            stop = min(start + CHUNK, resamples)
            counts = _counts(generator, stop - start, queries) / queries
            for side, values in enumerate((a, b)):
                per_seed = (counts @ values.reshape(-1, queries).astype(np.float64).T).reshape(
                    stop - start, values.shape[0], values.shape[1])
                means[side][start:stop] += np.einsum("rs,rsc->rc", weights[side][start:stop], per_seed) / len(tasks)
    return means[0], means[1]


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` percentile interval of each column of ``[resamples, ...]`` samples: ``(low, high)``."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return low, high


def difference_intervals(tasks: list[tuple[np.ndarray, np.ndarray]], resamples: int = RESAMPLES,
                         level: float = LEVEL, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` interval of B − A per cell (same units as the scores): ``(low, high)``, each ``[cells]``."""
    a, b = resampled_means(tasks, resamples, seed)
    return percentile_interval(b - a, level)
