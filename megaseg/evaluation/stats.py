"""Confidence intervals: percentile bootstrap over TASKS.

The unit of evaluation is the task: a dataset's Dice is the mean of its tasks' Dice (each task
already averaged over its queries and support draws), and its 95% interval comes from
resampling the dataset's tasks with replacement. Queries of one task are not independent
(same anatomy, same support sets), so resampling queries would give intervals that are far
too narrow.

The mean over datasets is the mean of the dataset means; its interval resamples tasks *within*
each dataset (a stratified bootstrap), so every dataset keeps its weight.

Resampling indices depend only on the seed and the number of tasks, so methods evaluated on
the same tasks are resampled identically (their intervals are paired).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megaseg.evaluation.defaults import DEFAULT_LEVEL, DEFAULT_RESAMPLES


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n)`` task indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_means(
    values: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of the last axis: ``(..., n) -> (..., resamples)``.

    The same resampling indices are used for every leading index (vectorized).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    if n == 0:
        raise ValueError("bootstrap of an empty set")
    idx = _indices(n, resamples, seed)
    # Mean over a resample = counts @ values / n: counts (resamples, n) avoids gathering
    # (..., resamples, n) copies.
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)
    return values @ counts.T / n


def bootstrap_ci(
    values,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and percentile-bootstrap interval of the last axis: ``(..., n)`` -> 3 x ``(...)``.

    With one value the interval is that value (zero width: one task says nothing about the
    spread; the tables report the number of tasks beside it).
    """
    values = np.asarray(values, dtype=np.float64)
    means = bootstrap_means(values, resamples, seed)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=-1)
    return values.mean(axis=-1), lo, hi


def stratified_bootstrap_ci(
    groups: Sequence[Sequence[float]],
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int | Sequence[int] = 0,
) -> tuple[float, float, float]:
    """Mean of group means, with an interval that resamples within each group.

    ``groups``: one sequence of task values per dataset. ``seed``: one per group, or one int
    (group ``g`` then uses ``seed + g``); a group resampled with seed ``s`` gets the same
    resamples as :func:`bootstrap_ci` with seed ``s``.
    """
    if not groups:
        raise ValueError("no groups")
    seeds = [seed + g for g in range(len(groups))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(groups):
        raise ValueError(f"{len(seeds)} seeds for {len(groups)} groups")
    means = np.mean(
        [
            bootstrap_means(np.asarray(g, np.float64), resamples, s)
            for g, s in zip(groups, seeds, strict=True)
        ],
        axis=0,
    )
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    point = float(np.mean([np.mean(g) for g in groups]))
    return point, float(lo), float(hi)


__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_RESAMPLES",
    "bootstrap_ci",
    "bootstrap_means",
    "stratified_bootstrap_ci",
]
