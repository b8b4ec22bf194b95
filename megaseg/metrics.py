"""Overlap of two binary masks, as numpy arrays (the evaluation's batched, soft Dice on tensors
is :func:`megaseg.evaluation.protocol.dice`)."""

from __future__ import annotations

import numpy as np


def mask_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks (anything nonzero is foreground); 1.0 when both are empty: nothing to
    find and nothing found is a perfect answer."""
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)
