"""What a volume's labelled slices say about the slices between them, with no model at all.

Three fills of a ``(D, H, W)`` stack from the labelled slices ``{index: (H, W) integer map}``,
each label value on its own, filling only between the outermost slices that hold it (beyond
them the structure's end is unknown, and none of these guesses it):

- :func:`nearest_fill`: each slice copies the value's mask from its nearest labelled slice (a
  slice labelled all background counts: nothing is copied from it);
- :func:`distance_prior`: the signed distance maps of the two labelled slices around a slice,
  mixed by its position between them (shape-based interpolation), as a probability; the
  session's shape prior (:mod:`megaseg.annotate`, ``method="guided"``);
- :func:`itk_fill`: ITK's morphological contour interpolation, what 3D Slicer's *Fill between
  slices* runs (``pip install megaseg[interpolation]``; optional).

Slices are along axis 0 here; :class:`megaseg.annotate.VolumeSession` moves its axis there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

Labelled = Mapping[int, np.ndarray]
"""``{slice index: (H, W) integer label map}``; 0 is background."""


def label_values(labelled: Labelled) -> list[int]:
    """The nonzero values of the labelled slices, sorted."""
    return sorted({int(v) for lab in labelled.values() for v in np.unique(lab) if v != 0})


def holding(labelled: Labelled, value: int) -> list[int]:
    """The labelled slices that hold ``value``, sorted."""
    return sorted(i for i, lab in labelled.items() if (lab == value).any())


def nearest_fill(labelled: Labelled, depth: int) -> np.ndarray:
    """``(D, H, W)`` labels: every slice between the outermost slices holding a value copies
    that value from the nearest labelled slice (ties: the lower index); labelled slices as
    given. Raises ValueError for an index outside ``0..depth-1``."""
    shape = _check(labelled, depth)
    out = np.zeros((depth, *shape), np.int64)
    order = np.array(sorted(labelled))
    for value in label_values(labelled):
        where = holding(labelled, value)
        for i in range(where[0], where[-1] + 1):
            nearest = int(order[np.argmin(np.abs(order - i))])
            out[i][labelled[nearest] == value] = value
    for i, lab in labelled.items():
        out[i] = lab
    return out


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool -> float32 distance to the boundary in pixels, negative inside."""
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return (outside - inside).astype(np.float32)


def distance_prior(
    labelled: Labelled, depth: int, value: int, softness: float = 1.0
) -> tuple[np.ndarray, list[int]]:
    """Shape-based interpolation of one value: ``(probabilities (n, H, W) float32, slices)``.

    For each slice strictly between two consecutive slices that hold ``value`` with no
    labelled slice without it in between (there the structure is known to be absent),
    ``sigmoid(-d / softness)`` with ``d`` the signed distances of the two masks mixed linearly
    by position. ``slices`` lists those slices, sorted; ``softness`` is in pixels.
    """
    _check(labelled, depth)
    where = holding(labelled, value)
    absent = sorted(i for i in labelled if i not in where)
    probs, slices = [], []
    for a, b in zip(where, where[1:], strict=False):
        if b - a < 2 or any(a < i < b for i in absent):
            continue
        da = signed_distance(labelled[a] == value)
        db = signed_distance(labelled[b] == value)
        for i in range(a + 1, b):
            probs.append(_mix(da, db, (i - a) / (b - a), softness))
            slices.append(i)
    if not probs:
        return np.zeros((0, *_check(labelled, depth)), np.float32), []
    return np.stack(probs).astype(np.float32), slices


@dataclass(frozen=True)
class ValuePlan:
    """Where one label value is looked for (:func:`guided_plan`).

    between: slices between two labelled slices that hold it (the structure is there);
    walks: ``(first, [j1, j2, ...])``: from a labelled slice holding it, outward, the slices
        where it may go on (none is labelled), nearest first.
    looks: per walk that stops at its limit, the slice one more limit further on (or the
        last before a labelled slice, if nearer), where the model is asked whether the
        structure has ended by then, as its labelled slices say it should; None where the
        walk itself ends at a labelled slice or goes on to the volume's end (which lies
        within one more limit: :func:`guided_plan`), or where one labelled slice holds the
        value (no spacing: its walks stop after its in-plane extent, with no taper and no
        look).
    spacing: the mean distance between its labelled slices (None with one).
    """

    between: list[int]
    walks: list[tuple[int, list[int]]]
    limit: int | None = None  # a spacing: the longest walk; None: one labelled slice
    looks: list[int | None] = field(default_factory=list)
    spacing: float | None = None  # the mean distance between its labelled slices

    @property
    def slices(self) -> list[int]:
        walked = (j for _, walk in self.walks for j in walk)
        return sorted({*self.between, *walked, *(j for j in self.looks if j is not None)})


def guided_plan(
    labelled: Labelled, depth: int, reach: float = 1.0, scale: tuple[float, float] = (1.0, 1.0)
) -> dict[int, ValuePlan]:
    """Per label value: the slices between its labelled slices and the walks beyond them.

    A walk starts at a labelled slice holding the value whose next labelled slice in that
    direction does not hold it (or that has none), and stops before that slice, at the
    volume's end, or after ``ceil(reach * spacing)`` slices, ``spacing`` being the mean
    distance between the labelled slices holding the value. With one such slice no spacing
    is known: the walks stop after the structure's largest extent within that slice
    (:func:`in_plane_extent` by ``scale``, its pixel size over the slice spacing; a
    structure seldom reaches much further along the axis than across, and a model that
    follows it from one slice goes on into look-alikes: the next vertebra, a neighbouring
    nucleus). A labelled slice without the value says it is absent there. A walk that stops
    at a spacing's limit gets a look slice (:class:`ValuePlan`), one more limit further on;
    but where the volume ends within that one more limit, the walk goes on to its end with
    no look: asked at the volume's edge, the model cannot tell a structure the field of view
    cuts (the skull base of a head CT) from a look-alike, and a walk stopped at the limit
    lost the rest of such a structure as soon as one more labelled slice shortened the
    spacing (the head CT's bone: volume Dice 0.766 with slices 25, 52, 79 labelled, 0.716 on
    labelling 92 too; benchmarks/suggest_headroom.py).
    """
    _check(labelled, depth)
    order = sorted(labelled)
    plans = {}
    for value in label_values(labelled):
        where = holding(labelled, value)
        limit = (
            in_plane_extent(labelled[where[0]] == value, scale)
            if len(where) < 2
            else math.ceil(reach * (where[-1] - where[0]) / (len(where) - 1))
        )
        between, walks, looks = [], [], []
        for first in where:
            pos = order.index(first)
            for step in (-1, 1):
                nxt = pos + step
                other = order[nxt] if 0 <= nxt < len(order) else None
                if other is not None and other in where:
                    if step == 1:
                        between += range(first + 1, other)
                    continue
                end = (-1 if step < 0 else depth) if other is None else other
                walk = list(range(first + step, end, step))
                if not walk:
                    continue
                if len(where) > 1 and other is None and len(walk) <= 2 * limit:
                    walks.append((first, walk))  # on to the volume's end: no look
                    looks.append(None)
                    continue
                walks.append((first, walk[:limit]))
                beyond = walk[limit : 2 * limit] if len(where) > 1 else []
                looks.append(beyond[-1] if beyond else None)
        spacing = (where[-1] - where[0]) / (len(where) - 1) if len(where) > 1 else None
        plans[value] = ValuePlan(
            between, walks, None if spacing is None else limit, looks=looks, spacing=spacing
        )
    return plans


def in_plane_extent(mask: np.ndarray, scale: tuple[float, float] = (1.0, 1.0)) -> int:
    """The larger side of ``mask``'s bounding box in slices: its rows and columns times
    ``scale`` (the pixel size along each over the slice spacing), rounded up; 1 at least.
    Rounded to 4 decimals first: a real header's sizes carry float noise (0.9999999 and
    1.0000001 mm), which must not add a slice."""
    rows, cols = np.nonzero(mask)
    sides = ((np.ptp(rows) + 1) * scale[0], (np.ptp(cols) + 1) * scale[1]) if len(rows) else (1,)
    return max(1, math.ceil(round(float(max(sides)), 4)))


def taper(first: np.ndarray, steps: int, limit: int, softness: float = 1.0) -> list[np.ndarray]:
    """``steps`` probabilities ``(H, W)`` of a shape that shrinks from mask ``first`` to
    nothing over ``limit + 1`` slices (eroded evenly: the distance map shifted by the
    largest inscribed radius times ``j / (limit + 1)`` at step ``j``): what is known beyond
    the outermost labelled slice of a structure labelled at spacing ``limit``."""
    d = signed_distance(np.asarray(first, bool))
    radius = float(max(1.0, -d.min()))
    return [_mix(d + radius * j / (limit + 1), d, 0.0, softness) for j in range(1, steps + 1)]


def follow(
    first: np.ndarray,
    probs: Sequence[np.ndarray],
    *,
    grow: float = 0.25,
    collapse: float = 0.3,
    confidence: float = 0.7,
) -> tuple[list[np.ndarray], list[bool]]:
    """Follow a structure from a labelled mask through the model's probabilities, outward.

    Args:
        first: ``(H, W)`` bool, the structure on the labelled slice the walk starts from.
        probs: ``(H, W)`` model probabilities of the walk's slices, nearest first.
        grow: each slice's mask stays within ``max(2, grow * r)`` pixels of the previous
            one, ``r`` the radius of a disc of the previous mask's area (a structure moves
            and changes little from one slice to the next; a far-away blob is not it).
        collapse, confidence: the walk stops at the first slice whose mask is empty, smaller
            than ``collapse`` times the previous one, or of mean probability below
            ``confidence``.

    Returns:
        ``(probabilities, kept)``: per slice, the probabilities within reach of the previous
        mask (for the uncertainty) and whether the mask is kept (False from the stop on).
    """
    prev = np.asarray(first, bool)
    out, kept, alive = [], [], bool(prev.any())
    for p in probs:
        if not alive:
            out.append(np.zeros_like(p))
            kept.append(False)
            continue
        radius = max(2.0, grow * math.sqrt(prev.sum() / math.pi))
        near = ndimage.distance_transform_edt(~prev) <= radius
        q = np.where(near, p, 0).astype(np.float32)
        mask = q > 0.5
        area = int(mask.sum())
        alive = area > 0 and area >= collapse * prev.sum() and q[mask].mean() >= confidence
        out.append(q)
        kept.append(alive)
        if alive:
            prev = mask
    return out, kept


def shape_between(a: np.ndarray, b: np.ndarray, t: float, softness: float = 1.0) -> np.ndarray:
    """``(H, W)`` probability of the shape a fraction ``t`` of the way from mask ``a`` to
    mask ``b`` (shape-based interpolation, as :func:`distance_prior`)."""
    return _mix(signed_distance(a), signed_distance(b), t, softness)


def _mix(da: np.ndarray, db: np.ndarray, t: float, softness: float) -> np.ndarray:
    d = (1 - t) * da + t * db
    return (1 / (1 + np.exp(np.clip(d / softness, -50, 50)))).astype(np.float32)


def itk_available() -> bool:
    """Whether ``itk-morphologicalcontourinterpolation`` is installed (without loading ITK,
    whose first use takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("itk.MorphologicalContourInterpolationPython") is not None
    except ImportError:  # no itk package at all
        return False


def itk_fill(labelled: Labelled, depth: int) -> np.ndarray:
    """``(D, H, W)`` labels by ITK's morphological contour interpolation along axis 0 (3D
    Slicer's *Fill between slices*); labelled slices as given. A slice labelled all
    background is invisible to ITK (it sees only slices holding a label).

    Raises ImportError naming the extra when the package is missing.
    """
    shape = _check(labelled, depth)
    try:
        import itk

        interpolator = itk.MorphologicalContourInterpolator
    except (ImportError, AttributeError):
        raise ImportError(
            "itk_fill needs ITK's morphological contour interpolation: "
            "pip install 'megaseg[interpolation]' (itk-morphologicalcontourinterpolation)"
        ) from None
    values = label_values(labelled)
    # ITK's filter is wrapped for unsigned char / short label images: map values to 1..K.
    dtype = np.uint8 if len(values) < 256 else np.uint16
    stack = np.zeros((depth, *shape), dtype)
    for i, lab in labelled.items():
        stack[i] = np.searchsorted(values, lab) + 1
        stack[i][lab == 0] = 0
    # One ITK thread: with its thread pool on several threads, ITK 5.4's filter corrupts the
    # heap on some inputs (measured on a 2-core machine: MNI152 at 3 mm, 5 labelled slices,
    # glibc aborts later, at exit, "malloc(): unsorted double linked list corrupted"); on
    # one thread the output is the same and nothing is corrupted. The process-wide default
    # is restored afterwards.
    threads = itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    try:
        filt = interpolator.New(itk.image_from_array(np.ascontiguousarray(stack)))
        filt.SetAxis(2)  # ITK's axes are numpy's reversed: numpy axis 0 is ITK axis 2
        filt.Update()
        filled = np.asarray(itk.array_from_image(filt.GetOutput()))
    finally:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    out = np.zeros((depth, *shape), np.int64)
    for k, v in enumerate(values, start=1):
        out[filled == k] = v
    for i, lab in labelled.items():
        out[i] = lab
    return out


def _check(labelled: Labelled, depth: int) -> tuple[int, int]:
    """The common ``(H, W)`` of the labelled slices; refuses indices outside the stack."""
    if not labelled:
        raise ValueError("no labelled slice: label at least one slice")
    shapes = {np.shape(lab) for lab in labelled.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"labelled slices must be (H, W) maps of one shape, got {sorted(shapes)}")
    bad = [i for i in labelled if not 0 <= i < depth]
    if bad:
        raise ValueError(f"slices {bad} are outside the stack of {depth} slices")
    return next(iter(shapes))


__all__ = [
    "ValuePlan",
    "distance_prior",
    "follow",
    "guided_plan",
    "in_plane_extent",
    "itk_available",
    "itk_fill",
    "label_values",
    "shape_between",
    "taper",
    "nearest_fill",
]
