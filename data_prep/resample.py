"""Orient a volume to RAS and resample it to a target spacing: image linear, label nearest.

The geometry is MONAI's: ``Orientation(axcodes="RAS")``, then the output grid (shape and
affine) that ``Spacing(pixdim=...)`` chooses, computed lazily. ``Spacing`` only rescales the
voxel axes, so unless the affine is sheared, output voxel ``i`` along axis ``a`` samples input
coordinate ``scale[a] * i + offset[a]`` along that same axis, and the 3D interpolation
factorises into one 1D interpolation per axis (trilinear weights are products of 1D weights).
Done that way (:func:`resample_axes`: ``np.take`` and a lerp per axis; the label by indexing)
the result equals ``Spacing``'s ``grid_sample`` (bilinear / nearest, zero padding,
``align_corners=False``) to float32 rounding, with identical labels except where a voxel
samples exactly halfway between two (ties go to even here, either way there), and is faster:
on one core, for a 256^3 CT volume (0.8 x 0.8 x 1.5 mm -> 1 mm, 205 x 205 x 384 out),
image + label took 3.0 s through ``Spacing`` (its float64 default; 1.5 s in float32, where
affine_grid and grid_sample dominate) and take 0.35 s here. A sheared affine (rare: e.g. a
tilted-gantry CT) still goes through ``Spacing``, in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from data_prep.readers.base import CaseError
from data_prep.readers.io import max_voxels

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# Index mappings whose off-diagonal terms stay below this are axis-aligned (separable).
AXIS_ALIGNED_TOLERANCE = 1e-6
# Output voxels that all lie within this many input voxels of the input grid: no resampling
# (a linear weight below 0.1%, under the 1/255 the corpus stores; labels are unchanged).
SAME_GRID_TOLERANCE_VOXELS = 1e-3


def orient_and_resample(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Volume ``(C, X, Y, Z)`` + label ``(X, Y, Z)`` -> RAS at ``spacing`` mm.

    Returns the image ``(C, X', Y', Z')`` float32 (linear interpolation) and the label
    ``(X', Y', Z')`` int32 (nearest); voxels sampled outside the input are 0.
    """
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    aff = torch.as_tensor(np.asarray(affine, np.float64))
    orient = Orientation(axcodes="RAS", labels=RAS_LABELS)
    # C-order copies of the (Fortran-ordered) NIfTI arrays: the per-axis gathers below run
    # faster on them, copy included, than on the strided originals
    image = torch.from_numpy(np.ascontiguousarray(image, np.float32))
    label = torch.from_numpy(np.ascontiguousarray(label, np.int32))[None]
    img, lab = orient(MetaTensor(image, affine=aff)), orient(MetaTensor(label, affine=aff))
    grid = Spacing(pixdim=spacing, lazy=True)(img)  # the output grid only: nothing is resampled
    shape = tuple(int(n) for n in grid.peek_pending_shape())
    if int(np.prod(shape, dtype=object)) > max_voxels():
        # a damaged header (voxel size 1e30 mm) would ask for an impossible volume
        raise CaseError(
            f"resampling {tuple(label.shape[1:])} voxels to {tuple(spacing)} mm gives shape "
            f"{shape}, over the limit of {max_voxels()} voxels (MEGASEG_MAX_VOXELS); check "
            "the voxel size in the header"
        )
    src = np.asarray(img.affine, np.float64)
    xform = np.linalg.solve(src, np.asarray(grid.peek_pending_affine(), np.float64))
    linear = xform[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > AXIS_ALIGNED_TOLERANCE:
        return _resample_monai(img, lab, spacing)
    positions = [linear[a, a] * np.arange(n) + xform[a, 3] for a, n in enumerate(shape)]
    return resample_axes(img.numpy(), lab.numpy()[0], positions)


def resample_axes(
    image: np.ndarray, label: np.ndarray, positions: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``image (C, X, Y, Z)`` and ``label (X, Y, Z)`` on the grid ``positions``.

    ``positions[a]``: the input coordinate (in voxels, float64) of each output voxel along axis
    ``a``. Image: linear along each axis (``(C, *out)`` float32); label: nearest, ties to even
    (``out`` int32). Outside ``[0, n - 1]`` the input is 0 (zero padding). When every output
    voxel lies on the input grid (within :data:`SAME_GRID_TOLERANCE_VOXELS`), the input is
    returned as it is.
    """
    positions = [np.asarray(p, np.float64) for p in positions]
    if all(
        len(p) == n and np.abs(p - np.arange(n)).max() <= SAME_GRID_TOLERANCE_VOXELS
        for p, n in zip(positions, label.shape, strict=True)
    ):
        return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label, np.int32)
    out = image.astype(np.float32, copy=False)
    # shrinking axes first: every later pass then runs over fewer voxels
    for a in sorted(range(3), key=lambda a: len(positions[a]) / label.shape[a]):
        out = _linear_along(out, a + 1, positions[a])
    index = [_padded_index(np.rint(p), n) for p, n in zip(positions, label.shape, strict=True)]
    padded = np.pad(label, 1)  # the zero border that out-of-range indices point to
    return np.ascontiguousarray(out), padded[np.ix_(*index)].astype(np.int32, copy=False)


def _padded_index(index: np.ndarray, n: int) -> np.ndarray:
    """Indices into an axis of length ``n`` padded by one zero on each side; outside -> a zero."""
    return np.clip(index, -1, n).astype(np.intp) + 1


def _linear_along(x: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``x`` along ``axis`` at coordinates ``pos`` (zero padding)."""
    n = x.shape[axis]
    below = np.floor(pos)
    weight = (pos - below).astype(np.float32)
    weight = weight.reshape([-1 if d == axis else 1 for d in range(x.ndim)])
    if pos.min() >= 0 and pos.max() <= n - 1:  # inside: no padding copy needed
        lo = below.astype(np.intp)
        hi = np.minimum(lo + 1, n - 1)
    else:
        x = np.pad(x, [(1, 1) if d == axis else (0, 0) for d in range(x.ndim)])
        lo, hi = _padded_index(below, n), _padded_index(below + 1, n)
    a, b = np.take(x, lo, axis), np.take(x, hi, axis)
    b -= a
    b *= weight
    a += b
    return a


def _resample_monai(img, lab, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Oriented MetaTensors -> ``Spacing`` resampled arrays, for affines that are not separable."""
    from monai.transforms import Spacing

    dtype = torch.float32
    image = Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros", dtype=dtype)(img)
    label = Spacing(pixdim=spacing, mode="nearest", padding_mode="zeros", dtype=dtype)(
        lab.to(dtype)
    )
    return image.numpy(), np.rint(label.numpy()[0]).astype(np.int32)
