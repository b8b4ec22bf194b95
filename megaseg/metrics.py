"""Dice overlap of binary masks: the one definition in megaseg (numpy masks: :func:`mask_dice`;
batches of tensors: :func:`batch_dice`).

``Dice = 2 |P & T| / (|P| + |T|)``, anything nonzero being foreground. The empty-mask rule:
when both masks are empty the ratio is undefined, and Dice is ``empty``, 1.0 by default --
nothing to find and nothing found is a perfect answer (MONAI's ``compute_dice`` with
``ignore_empty=False`` scores it the same). A caller that scores that case otherwise passes
``empty`` (the annotation benchmarks recorded 0.0). The evaluation never meets the case: it
drops queries whose truth is empty before drawing (:mod:`megaseg.evaluation.protocol`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # tensors are handled by their own methods: no torch import here
    from torch import Tensor


def mask_dice(pred: np.ndarray, truth: np.ndarray, *, empty: float = 1.0) -> float:
    """Dice of two masks of one shape (see the module for the rule; ``empty``: the score when
    both are empty)."""
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    total = pred.sum() + truth.sum()
    return float(empty) if total == 0 else float(2 * (pred & truth).sum() / total)


def batch_dice(pred: Tensor, truth: Tensor, *, empty: float = 1.0) -> Tensor:
    """Dice per item: ``pred, truth (B, ...)`` masks (bool or 0/1) -> ``(B,)`` float32; ``empty``
    where both are empty (see the module)."""
    p, t = (pred != 0).flatten(1).float(), (truth != 0).flatten(1).float()
    total = p.sum(1) + t.sum(1)
    return (2.0 * (p * t).sum(1) / total.clamp_min(1.0)).masked_fill(total == 0, float(empty))


__all__ = ["batch_dice", "mask_dice"]
