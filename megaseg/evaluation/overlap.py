"""Is the evaluation really held out? Compare what the checkpoint's card says it saw.

The card (written by ``megaseg.training.export.build_card``) lists the training datasets: a
top-level ``training_datasets`` list, or the ``datasets`` of each corpus under
``training.data.corpora``; and the synthetic seed range under ``training.data.synthetic``.
An evaluation dataset overlaps when it is one of them (names compared case-insensitively),
when it shares subjects with one of them according to data_prep's list of known overlaps
(e.g. Task03_Liver and LiTS), or when held-out synthetic seeds fall in the trained range.
"""

from __future__ import annotations

from collections.abc import Sequence


class OverlapError(ValueError):
    """An evaluation names a dataset the model was trained on (override: allow_overlap)."""


def card_training_datasets(card: dict | None) -> list[str] | None:
    """Training dataset names from a card; None when the card does not say (or no card)."""
    if not card:
        return None
    if isinstance(card.get("training_datasets"), list):
        return [str(n) for n in card["training_datasets"]]
    data = (card.get("training") or {}).get("data") or {}
    if not data:
        return None
    names: list[str] = []
    for corpus in data.get("corpora") or []:
        names += [str(n) for n in corpus.get("datasets", [])]
    if data.get("synthetic"):
        names.append("synthetic")
    return sorted(set(names))


def _synthetic_range(card: dict | None) -> tuple[int, int] | None:
    data = ((card or {}).get("training") or {}).get("data") or {}
    syn = data.get("synthetic") or {}
    r = syn.get("seed_range")
    return (int(r[0]), int(r[1])) if r else None


def find_overlaps(card: dict | None, sources: Sequence[dict]) -> list[str]:
    """Reasons why each evaluated dataset is not held out (empty: all held out).

    ``sources``: the sources' :meth:`describe` dicts.
    """
    trained = card_training_datasets(card)
    if trained is None:
        return []
    have = {n.casefold() for n in trained if n != "synthetic"}
    reasons = []
    for desc in sources:
        name = desc["dataset"]
        if desc.get("kind") == "synthetic":
            trained_range = _synthetic_range(card)
            lo, hi = desc["seed_range"]
            if trained_range and trained_range[0] < hi and lo < trained_range[1]:
                reasons.append(
                    f"{name}: held-out synthetic seeds [{lo}, {hi}) overlap the trained range "
                    f"[{trained_range[0]}, {trained_range[1]})"
                )
            continue
        if name.casefold() in have:
            reasons.append(f"{name}: listed among the checkpoint's training datasets")
            continue
        for other in sorted(have):
            for pair in _known_overlaps([name, other]):
                reasons.append(
                    f"{name}: shares subjects with training dataset {other} ({pair.reason})"
                )
    return reasons


def _known_overlaps(names: list[str]):
    try:
        from data_prep.specs.overlaps import overlaps_among
    except ImportError:  # data_prep is optional for the evaluation
        return []
    return overlaps_among(names)


__all__ = ["OverlapError", "card_training_datasets", "find_overlaps"]
