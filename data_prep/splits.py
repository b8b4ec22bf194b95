"""Subject splits of a dataset: the hashed 70/15/15 split, or the one its spec declares.

A pure function of (seed, dataset, subject) except for the small-dataset guarantee of
:func:`assign_splits`; the store writer applies it when it consolidates a dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

SPLIT_FRACTIONS = (("train", 0.70), ("val", 0.15), ("test", 0.15))


def subject_unit(seed: int, dataset: str, subject: str) -> float:
    """A subject's position in [0, 1): a hash of (seed, dataset, subject), nothing else."""
    digest = hashlib.sha256(f"{seed}\0{dataset}\0{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def natural_split(u: float) -> str:
    """train for u < 0.70, val for u < 0.85, test otherwise."""
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if u < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


def _interval(split: str) -> tuple[float, float]:
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        if name == split:
            return edge, edge + fraction
        edge += fraction
    raise ValueError(split)


def assign_splits(subjects: Iterable[str], dataset: str, seed: int = 0) -> dict[str, str]:
    """Split of each subject: train / val / test, about 70 / 15 / 15.

    Each subject gets ``u = subject_unit(seed, dataset, subject)`` and its *natural* split
    (:func:`natural_split`), which no other subject can change: adding subjects never moves
    a subject that sits in its natural split.

    Guarantee, for 3 or more subjects: no split is empty. While one is (checked in the order
    test, val, train), one subject moves into it from the split holding the most subjects
    (ties: train, val, test), namely the subject of that split whose ``u`` lies nearest to the
    empty split's interval (ties: smaller subject id). The donor keeps at least one subject,
    so at most two subjects move, and only in datasets small enough to leave a split empty;
    adding subjects can return a moved subject to its natural split, never move another one.
    With 1 or 2 subjects every subject keeps its natural split (some splits stay empty; the
    dataset card says which).
    """
    subjects = sorted(set(subjects))
    u = {s: subject_unit(seed, dataset, s) for s in subjects}
    split = {s: natural_split(u[s]) for s in subjects}
    if len(subjects) < 3:
        return split
    names = [n for n, _ in SPLIT_FRACTIONS]
    for target in reversed(names):
        members = {n: [s for s in subjects if split[s] == n] for n in names}
        if members[target]:
            continue
        donor = max(names, key=lambda n: (len(members[n]), -names.index(n)))
        lo, hi = _interval(target)
        moved = min(members[donor], key=lambda s: (max(lo - u[s], u[s] - hi, 0.0), s))
        split[moved] = target
    return split


def declared_splits(spec: Any, subjects: Sequence[str]) -> dict[str, str] | None:
    """The split of each subject as ``spec.split`` declares it (specs/packaged.py): one split
    for all, or ``(subject, split)`` pairs; None when the spec declares none (the hashed
    subject split applies). ValueError naming the dataset when a built subject has no split."""
    split = getattr(spec, "split", None)
    if not split:
        return None
    if isinstance(split, str):
        return {x: split for x in subjects}
    declared = dict(split)
    missing = sorted(set(subjects) - set(declared))
    if missing:
        raise ValueError(f"dataset {spec.name!r}: its split names no split for subjects {missing}")
    return {x: declared[x] for x in subjects}
