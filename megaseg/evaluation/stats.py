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

A second interval resamples the *support draws* within each task instead
(:func:`stratified_bootstrap_means` with the draws of each task as a group, weighted by their
queries; seeds from :func:`unit_seed`): it covers only the randomness of which support
examples were drawn, for the evaluated tasks and subjects, and is what is left to report when a
dataset has too few tasks for the interval over tasks to mean anything (with n <= 3 tasks that
one is the [min, max] of the task means, see :func:`is_task_range`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from megaseg.evaluation.defaults import DEFAULT_LEVEL, DEFAULT_RESAMPLES


def _indices(n: int, resamples: int, seed: int | Sequence[int]) -> np.ndarray:
    """``(resamples, n)`` task indices drawn with replacement (``seed``: an int or a sequence of
    ints, as :func:`numpy.random.default_rng` takes)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _counts(n: int, resamples: int, seed: int | Sequence[int]) -> np.ndarray:
    """``(resamples, n)``: how often each unit is drawn in each resample."""
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], _indices(n, resamples, seed)), 1.0)
    return counts


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
    # Mean over a resample = counts @ values / n: counts (resamples, n) avoids gathering
    # (..., resamples, n) copies.
    return values @ _counts(n, resamples, seed).T / n


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


def unit_seed(seed: int, *names: str) -> list[int]:
    """The seed of one stratum (e.g. a task's draws): ``[seed, crc32(name), ...]``.

    It depends on the names only (not on which other datasets or tasks are in the run), so two
    methods, or two runs, on the same task resample the same draws (paired intervals).
    """
    return [int(seed), *(zlib.crc32(str(n).encode()) for n in names)]


def stratified_bootstrap_means(
    groups: Sequence,
    resamples: int = DEFAULT_RESAMPLES,
    seeds: Sequence[int | Sequence[int]] = (),
    weights: Sequence | None = None,
) -> np.ndarray:
    """Bootstrap means of the mean of group means, each group resampled on its own:
    ``groups[g]`` ``(..., n_g)`` -> ``(..., resamples)``.

    ``seeds``: one per group (an int or a sequence of ints); ``weights``: None, or one
    ``(n_g,)`` array of positive weights per group: a group's mean over a resample is then
    ``sum(count * w * v) / sum(count * w)`` (with query counts as weights and draw means as
    values, the mean over every query of the resampled draws, so the full sample gives the
    group's plain mean over queries). The same indices are used for every leading index, so a
    stack of methods is resampled paired.
    """
    if not len(groups):
        raise ValueError("no groups")
    if len(seeds) != len(groups):
        raise ValueError(f"{len(seeds)} seeds for {len(groups)} groups")
    if weights is not None and len(weights) != len(groups):
        raise ValueError(f"{len(weights)} weight arrays for {len(groups)} groups")
    total = None
    for g, (values, s) in enumerate(zip(groups, seeds, strict=True)):
        values = np.asarray(values, dtype=np.float64)
        if weights is None:
            means = bootstrap_means(values, resamples, s)
        else:
            w = np.asarray(weights[g], dtype=np.float64)
            n = values.shape[-1]
            if n == 0:
                raise ValueError("bootstrap of an empty set")
            if w.shape != (n,) or not np.all(w > 0):
                raise ValueError(f"group {g}: weights must be {n} positive numbers, got {w!r}")
            counts = _counts(n, resamples, s)
            means = (values * w) @ counts.T / (counts @ w)
        total = means if total is None else total + means
    return total / len(groups)


def percentile_interval(
    means: np.ndarray, level: float = DEFAULT_LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of bootstrap means ``(..., resamples)`` -> 2 x ``(...)``."""
    alpha = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(means, dtype=np.float64), [alpha, 1 - alpha], axis=-1)
    return lo, hi


def is_task_range(n: int, level: float = DEFAULT_LEVEL) -> bool:
    """Whether the percentile bootstrap over ``n`` units is just their [min, max] (or one value).

    A resample is all-minimum with probability ``n**-n``; once that exceeds the tail
    ``(1 - level) / 2`` the lower bound is the minimum (n <= 3 at 95%: 1/27 = 3.7% > 2.5%).
    """
    return n <= 1 or float(n) ** -n > (1 - level) / 2


__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_RESAMPLES",
    "bootstrap_ci",
    "bootstrap_means",
    "is_task_range",
    "percentile_interval",
    "stratified_bootstrap_ci",
    "stratified_bootstrap_means",
    "unit_seed",
]
