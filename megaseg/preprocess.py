"""The one preprocessing path shared by data_prep, the inference API and the evaluation.

A model must see at inference exactly what it saw in training, so every image that reaches the
network goes through :func:`prepare_image` (labels through :func:`prepare_label`) and every
prediction goes back to the input's size through :func:`restore`.

Steps: grayscale -> intensity window to [0, 1] (CT: fixed HU window; MR: percentiles of the
nonzero voxels; otherwise min-max; computed per volume for 3D input) -> pad to a square
(centred, never stretched) -> Gaussian blur then bilinear resize when shrinking, plain bilinear
when enlarging. Labels are resized the same way and become soft masks in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CT_WINDOW = (-500.0, 1000.0)  # Hounsfield units
# Below this, intensities are taken for CT Hounsfield units (air is -1000 HU; MR, photographs
# and microscopy have no such negative values) when no modality or window is given.
HU_LIKE_MIN = -500.0
MR_PERCENTILES = (0.5, 99.5)  # of the nonzero voxels
_MR_NAMES = ("mr", "mri", "t1", "t2", "flair", "adc", "dwi", "pd", "swi", "bold", "cine", "lge")

ModalityKind = Literal["ct", "mr", "other"]


def modality_kind(modality: str | None) -> ModalityKind:
    """Map a free-form modality name ("CT", "MRI", "T2w", "FLAIR", "Dermoscopy"...) to a window kind."""
    if modality is None:
        return "other"
    name = modality.strip().lower()
    if name in ("ct", "cta", "cect", "nect") or name.startswith("ct"):
        return "ct"
    if any(name.startswith(m) for m in _MR_NAMES) or "mri" in name:
        return "mr"
    return "other"


def guess_modality(
    data,
    modality: str | None,
    window: tuple[float, float] | None,
    what: str,
    stacklevel: int = 3,
) -> str | None:
    """``modality``, or "CT" when neither it nor ``window`` is given and ``data`` holds values
    below :data:`HU_LIKE_MIN` (Hounsfield units: min-max windowing would squeeze the soft
    tissue into a few grey levels). The guess is announced by a warning naming ``what`` and
    how to choose otherwise (``stacklevel``: the caller's frame it is attributed to)."""
    if modality is not None or window is not None:
        return modality
    x = _as_numpy(data) if not isinstance(data, list) else None
    lo = float(x.min()) if x is not None else min(float(_as_numpy(d).min()) for d in data)
    if not lo < HU_LIKE_MIN:
        return None
    hi = float(x.max()) if x is not None else max(float(_as_numpy(d).max()) for d in data)
    import warnings

    warnings.warn(
        f"{what}: intensities {lo:.0f} to {hi:.0f} look like CT Hounsfield units, windowed as "
        f"CT ({CT_WINDOW[0]:.0f} to {CT_WINDOW[1]:.0f} HU); pass modality='CT' to say so, or "
        "modality='other' (min-max) or window=(low, high) to choose",
        stacklevel=stacklevel,
    )
    return "CT"


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def normalize_intensity(
    image,
    modality: str | None = None,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Window an image or a whole volume to float32 in [0, 1].

    ``window=(lo, hi)`` clips to that range (units of the input); otherwise the modality
    decides: CT uses :data:`CT_WINDOW`, MR the :data:`MR_PERCENTILES` of nonzero voxels, any
    other modality its own min and max. A constant image maps to zeros.

    Raises:
        ValueError: the image holds NaN or inf values.
    """
    x = _as_numpy(image).astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("image contains NaN or inf values")
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise ValueError(f"window must be (low, high) with high > low, got {window}")
    else:
        kind = modality_kind(modality)
        if kind == "ct":
            lo, hi = CT_WINDOW
        elif kind == "mr":
            nonzero = x[x != 0]
            if nonzero.size == 0:
                return np.zeros(x.shape, np.float32)
            lo, hi = np.percentile(nonzero, MR_PERCENTILES)
        else:
            lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def card_fields(
    resolution: int, modality: str | None = None, window: tuple[float, float] | None = None
) -> dict:
    """The checkpoint card's ``preprocessing`` object: this path's settings as fields that
    :class:`megaseg.inference.Segmenter` reads back (written by ``megaseg.training.export``).

    ``resolution``: the square size the network sees. ``modality`` / ``window``: the defaults
    of ``set_support`` (None: given per call, else CT when the values look like Hounsfield
    units, else min-max); set them for a model of one modality. ``normalization``: how each
    modality is windowed to ``range``; the Segmenter windows CT images with ``ct_window``.
    """
    return {
        "function": "megaseg.preprocess.prepare_image",
        "resolution": int(resolution),
        "channels": 1,
        "modality": modality,
        "window": None if window is None else [float(window[0]), float(window[1])],
        "normalization": {
            "range": [0.0, 1.0],
            "ct_window": list(CT_WINDOW),
            "mr_percentiles": list(MR_PERCENTILES),
            "other": "min-max",
        },
    }


def to_grayscale(image) -> np.ndarray:
    """``(H, W)`` stays; ``(H, W, 3|4)`` or ``(3|4, H, W)`` RGB(A) -> ``(H, W)`` luma (BT.601)."""
    x = _as_numpy(image)
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        if x.shape[-1] in (3, 4):
            rgb = x[..., :3]
        elif x.shape[0] in (3, 4):
            rgb = np.moveaxis(x[:3], 0, -1)
        elif x.shape[-1] == 1:
            return x[..., 0]
        elif x.shape[0] == 1:
            return x[0]
        else:
            raise ValueError(f"cannot read {x.shape} as a 2D image or an RGB(A) image")
        return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    raise ValueError(f"expected a 2D image (H,W) or RGB (H,W,3), got shape {x.shape}")


@dataclass(frozen=True)
class PadInfo:
    """Where an ``(height, width)`` image sits inside its ``size x size`` padded square."""

    height: int
    width: int
    top: int
    left: int

    @property
    def size(self) -> int:
        return max(self.height, self.width)


def pad_to_square(x: Tensor, value: float = 0.0) -> tuple[Tensor, PadInfo]:
    """Centre ``x (..., H, W)`` in a ``(..., L, L)`` square, ``L = max(H, W)``, filled with ``value``."""
    h, w = x.shape[-2:]
    size = max(h, w)
    top, left = (size - h) // 2, (size - w) // 2
    info = PadInfo(int(h), int(w), int(top), int(left))
    if h == w:
        return x, info
    padded = F.pad(x, (left, size - w - left, top, size - h - top), value=value)
    return padded, info


def unpad(x: Tensor, info: PadInfo) -> Tensor:
    """Inverse of :func:`pad_to_square`: ``(..., L, L) -> (..., H, W)``."""
    return x[..., info.top : info.top + info.height, info.left : info.left + info.width]


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Resize ``x (..., H, W)`` to ``size``: Gaussian blur then bilinear when shrinking.

    The blur's sigma per axis is ``(factor - 1) / 2`` (the usual anti-aliasing choice), so a
    label resized down becomes a soft, anti-aliased mask.
    """
    out = (size, size) if isinstance(size, int) else tuple(size)
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    if (h, w) == out:
        return x
    y = x.reshape(-1, 1, h, w)
    if not y.is_floating_point():
        y = y.float()
    fy, fx = h / out[0], w / out[1]
    y = _gaussian_blur_axis(y, (fy - 1) / 2, dim=-2)
    y = _gaussian_blur_axis(y, (fx - 1) / 2, dim=-1)
    y = F.interpolate(y, size=out, mode="bilinear", align_corners=False)
    return y.reshape(*lead, *out)


def _gaussian_blur_axis(x: Tensor, sigma: float, dim: int) -> Tensor:
    """Gaussian blur of ``x (N, 1, H, W)`` along one axis with edge replication; sigma<=0: none."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    if dim == -1:
        y = F.pad(x, (radius, radius, 0, 0), mode="replicate")
        return F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(y, k.view(1, 1, -1, 1))


def prepare_image(
    image,
    size: int = 128,
    modality: str | None = None,
    window: tuple[float, float] | None = None,
    normalize: bool = True,
) -> tuple[Tensor, PadInfo]:
    """A raw 2D image (any size, dtype, range; RGB allowed) -> ``(1, size, size)`` float32 in [0, 1].

    ``normalize=False`` skips windowing, for slices of a volume already windowed as a whole.
    Returns the tensor and the :class:`PadInfo` that :func:`restore` needs.
    """
    x = to_grayscale(image)
    if x.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {x.shape}")
    x = normalize_intensity(x, modality, window) if normalize else x.astype(np.float32)
    t, info = pad_to_square(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return resize(t[None], size).clamp_(0.0, 1.0), info


def prepare_label(label, size: int = 128) -> Tensor:
    """A 2D binary (or soft) mask -> ``(1, size, size)`` soft mask in [0, 1], padded like the image."""
    x = _as_numpy(label)
    if x.ndim != 2:
        raise ValueError(f"expected a 2D label, got shape {x.shape}")
    t, _ = pad_to_square(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return resize(t[None], size).clamp_(0.0, 1.0)


def restore(x: Tensor, info: PadInfo) -> Tensor:
    """A ``(..., s, s)`` prediction at network resolution -> ``(..., H, W)`` at the input's size."""
    return unpad(resize(x, info.size), info)
