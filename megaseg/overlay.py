"""Masks drawn over a grey image: the one overlay of megaseg's figures (the demo's PNG and the
notebook, ``megaseg show-episodes``, the evaluation's case plots). numpy only; the caller
shows the result with matplotlib's ``imshow``."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

RGB = tuple[float, float, float]


def overlay_rgb(
    image,
    masks: Iterable[tuple[object, RGB]] = (),
    alpha: float = 0.5,
    window: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """``image (H, W)`` in grey, shown over ``window`` (values outside it clipped), with each
    ``(mask (H, W), rgb)`` of ``masks`` tinted on top in turn: opacity ``alpha`` where the mask
    is 1, proportionally less where it is soft (bool, 0/1 or [0, 1] masks) -> ``(H, W, 3)``
    float RGB in [0, 1]."""
    lo, hi = float(window[0]), float(window[1])
    grey = (np.clip(np.asarray(image, np.float64), lo, hi) - lo) / max(hi - lo, 1e-12)
    out = np.repeat(grey[..., None], 3, axis=-1)
    for mask, rgb in masks:
        a = alpha * np.clip(np.asarray(mask, np.float64), 0.0, 1.0)[..., None]
        out = (1 - a) * out + a * np.asarray(rgb, np.float64)
    return np.clip(out, 0.0, 1.0)


__all__ = ["overlay_rgb"]
