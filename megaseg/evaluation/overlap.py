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


class CardFieldError(ValueError):
    """A card field this module reads has another type than a card megaseg writes; the message
    names the field (the caller adds the card's path)."""


def _field(value, kind: type, name: str):
    if value is not None and not isinstance(value, kind):
        raise CardFieldError(
            f"{name} must be a{'n object' if kind is dict else ' list'}, got {value!r:.80}"
        )
    return value


def _training_data(card: dict) -> dict:
    training = _field(card.get("training"), dict, "training") or {}
    return _field(training.get("data"), dict, "training.data") or {}


def card_training_datasets(card: dict | None) -> list[str] | None:
    """Training dataset names from a card; None when the card does not say (or no card).
    Raises CardFieldError for a malformed ``training.data``."""
    if not card:
        return None
    if isinstance(card.get("training_datasets"), list):
        return [str(n) for n in card["training_datasets"]]
    data = _training_data(card)
    if not data:
        return None
    names: list[str] = []
    for i, corpus in enumerate(_field(data.get("corpora"), list, "training.data.corpora") or []):
        corpus = _field(corpus, dict, f"training.data.corpora[{i}]") or {}
        datasets = corpus.get("datasets", [])
        names += [str(n) for n in _field(datasets, list, f"training.data.corpora[{i}].datasets")]
    if data.get("synthetic"):
        _synthetic_range(card)  # checked here too: a malformed card fails the same way always
        names.append("synthetic")
    return sorted(set(names))


def _synthetic_range(card: dict | None) -> tuple[int, int] | None:
    syn = _training_data(card or {}).get("synthetic") or {}
    r = _field(syn, dict, "training.data.synthetic").get("seed_range")
    if not r:
        return None
    if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)):
        raise CardFieldError(f"training.data.synthetic.seed_range must be [low, high], got {r!r}")
    return r[0], r[1]


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


__all__ = ["CardFieldError", "OverlapError", "card_training_datasets", "find_overlaps"]
