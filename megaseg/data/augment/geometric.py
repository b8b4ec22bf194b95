"""Geometric transforms: the same warp for image and label.

Each one is a map of sampling points, ``map_points``: for every output pixel, where to read the
input, in ``grid_sample``'s normalized coordinates (``align_corners=False``, x then y, [-1, 1]
across the image). Points compose, so the episode pipeline chains all geometric transforms of
an example and resamples once (one interpolation blur, one ``grid_sample``) instead of once per
transform. ``apply`` of a single transform is the same warp on its own.

Image and label are both resampled bilinearly with zero padding: the label stays a soft mask in
[0, 1] and nothing outside the field of view becomes structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Params, Transform, uniform


def pixel_centres(size: tuple[int, int], like: Tensor) -> tuple[Tensor, Tensor]:
    """Normalized x of each column ``(1, W)`` and y of each row ``(H, 1)``."""
    h, w = size
    xs = (2 * torch.arange(w, device=like.device, dtype=like.dtype) + 1) / w - 1
    ys = (2 * torch.arange(h, device=like.device, dtype=like.dtype) + 1) / h - 1
    return xs[None, :], ys[:, None]


def identity_points(n: int, size: tuple[int, int], like: Tensor) -> Tensor:
    """Pixel centres in normalized coordinates, ``(n, 2, H, W)`` (x plane, y plane)."""
    xs, ys = pixel_centres(size, like)
    return torch.stack([xs.expand(n, *size), ys.expand(n, *size)], dim=1)


def warp(images: Tensor, labels: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Resample ``images, labels (n, 1, H, W)`` at ``points (n, 2, H, W)``, in one call."""
    both = torch.cat([images, labels], dim=1)
    grid = points.permute(0, 2, 3, 1)  # grid_sample wants (n, H, W, 2)
    out = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :1], out[:, 1:]


@dataclass(frozen=True)
class GeometricTransform(Transform):
    kind = "geometric"

    def map_points(self, points: Tensor | None, params: Params, size: tuple[int, int]) -> Tensor:
        """Output-to-input map of sampling points ``(n, 2, H, W)`` (normalized x, y planes).

        ``points=None`` stands for the pixel centres (:func:`identity_points`), which lets a
        transform skip work; ``size = (H, W)``."""
        raise NotImplementedError

    def apply(self, images: Tensor, labels: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        return warp(images, labels, self.map_points(None, params, images.shape[-2:]))


@dataclass(frozen=True)
class _LinearTransform(GeometricTransform):
    """A transform whose point map is linear: ``in = A @ out + b`` per row."""

    def matrix(self, params: Params, size: tuple[int, int]) -> Tensor:
        """``(n, 2, 3)`` = ``[A | b]`` in normalized coordinates."""
        raise NotImplementedError

    def map_points(self, points: Tensor | None, params: Params, size: tuple[int, int]) -> Tensor:
        m = self.matrix(params, size)[:, :, :, None, None]  # (n, 2, 3, 1, 1)
        if points is None:  # pixel centres as a row and a column, broadcast: never materialized
            x, y = pixel_centres(size, m)
        else:
            x, y = points[:, 0], points[:, 1]
        # A 2x2 matmul per pixel is slow as bmm (inner size 2): two fused ops per plane.
        out = m.new_empty(len(m), 2, *size)
        for i in range(2):
            if points is None:
                out[:, i] = torch.addcmul(m[:, i, 2], y, m[:, i, 1])  # (n, H, 1) broadcast
            else:
                torch.addcmul(m[:, i, 2], y, m[:, i, 1], out=out[:, i])
            out[:, i].addcmul_(x, m[:, i, 0])
        return out


@dataclass(frozen=True)
class Affine(_LinearTransform):
    """Rotation about the centre (degrees), isotropic scale (>1 enlarges) and translation
    (fraction of the image side, each axis in ``[-translate, translate]``).

    ``log_scale``: scale drawn log-uniformly (a zoom of x0.5 as likely as x2, for wide ranges);
    else uniformly. Either way one uniform per row, so the random stream is the same."""

    rotation: tuple[float, float] = (0.0, 360.0)
    scale: tuple[float, float] = (0.8, 1.1)
    translate: float = 0.2
    log_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"Affine: scale must be 0 < lo <= hi, got {self.scale}")

    def sample(self, n: int, generator: torch.Generator) -> Params:
        angle = torch.deg2rad(uniform(n, *self.rotation, generator))  # draw order: angle first
        if self.log_scale:
            lo, hi = math.log(self.scale[0]), math.log(self.scale[1])
            scale = torch.exp(uniform(n, lo, hi, generator))
        else:
            scale = uniform(n, *self.scale, generator)
        return {
            "angle": angle,
            "scale": scale,
            "shift": uniform(2 * n, -self.translate, self.translate, generator).view(n, 2),
        }

    def matrix(self, params: Params, size: tuple[int, int]) -> Tensor:
        # Forward:  out = R(angle) * scale * in + shift  in pixel units from the centre (so a
        # rotation stays rigid on a non-square image); the sampling map is its inverse,
        # in = R(-angle) (out - shift) / scale, conjugated by D = diag(W/2, H/2) to normalized.
        h, w = size
        angle, scale, shift = params["angle"], params["scale"], params["shift"]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        rx, ry = h / w, w / h  # D^-1 R D off-diagonal aspect factors
        a = torch.stack([torch.stack([cos, sin * rx], -1), torch.stack([-sin * ry, cos], -1)], 1)
        b = -(a @ (2 * shift)[:, :, None])  # shift is a fraction of the side: 2x in normalized
        return torch.cat([a, b], dim=2)


@dataclass(frozen=True)
class Flip(_LinearTransform):
    """Mirror left-right or top-bottom (one of the two, with equal chance). Any other flip is
    one of these followed by a rotation, which :class:`Affine` covers."""

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {"vertical": torch.rand(n, generator=generator) < 0.5}

    def matrix(self, params: Params, size: tuple[int, int]) -> Tensor:
        vertical = params["vertical"]
        sx = torch.where(vertical, 1.0, -1.0)
        m = torch.zeros(len(vertical), 2, 3, device=vertical.device)
        m[:, 0, 0], m[:, 1, 1] = sx, -sx
        return m


@lru_cache(maxsize=16)
def _upsample_matrix(points: int, size: int) -> Tensor:
    """``(size, points)``: 1D bicubic interpolation (``align_corners=True``) as a matrix."""
    eye = torch.eye(points, dtype=torch.float64).view(points, 1, points, 1)
    out = F.interpolate(eye, size=(size, 1), mode="bicubic", align_corners=True)
    return out[:, 0, :, 0].T.float().contiguous()


@dataclass(frozen=True)
class Elastic(GeometricTransform):
    """Smooth random displacement: a ``control_points x control_points`` grid of Gaussian
    displacements (std ``magnitude``, a fraction of the image side, drawn per example),
    interpolated bicubically; the outer control points sit on the corner pixels."""

    magnitude: tuple[float, float] = (0.01, 0.04)
    control_points: int = 5

    def sample(self, n: int, generator: torch.Generator) -> Params:
        k = self.control_points
        std = uniform(n, *self.magnitude, generator)
        displacement = torch.randn(n, 2, k, k, generator=generator) * std.view(n, 1, 1, 1)
        return {"displacement": 2 * displacement}  # normalized coordinates span 2 per side

    def map_points(self, points: Tensor | None, params: Params, size: tuple[int, int]) -> Tensor:
        coarse = params["displacement"]  # (n, 2, k, k)
        h, w = size
        if points is None:
            # On the pixel grid the bicubic field is two small matmuls (~20x cheaper than
            # grid_sample, and the same numbers).
            uy = _upsample_matrix(coarse.shape[-1], h).to(coarse)
            ux = uy if w == h else _upsample_matrix(coarse.shape[-1], w).to(coarse)
            field = uy @ coarse @ ux.T
            xs, ys = pixel_centres(size, field)
            field[:, 0] += xs
            field[:, 1] += ys
            return field
        # Elsewhere, read the field where the points land. Rescaled so that the corner pixel
        # centres map to +-1, where align_corners=True puts the outer control points.
        scale = points.new_tensor([w / (w - 1), h / (h - 1)]).view(1, 2, 1, 1)
        grid = (points * scale).permute(0, 2, 3, 1)
        shift = F.grid_sample(
            coarse, grid, mode="bicubic", padding_mode="border", align_corners=True
        )
        return points + shift


@dataclass(frozen=True)
class FieldOfView(Transform):
    """A scanner's field of view: image and label zeroed outside a rectangle that keeps a
    share in ``[min_keep, 1]`` of each side, placed uniformly (a structure outside the field of
    view is not in the scan, so it leaves the label too). Not a warp: applied after them."""

    kind = "mask"
    min_keep: float = 0.55

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError(f"FieldOfView: min_keep must be in (0, 1], got {self.min_keep}")

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {
            "keep": uniform(2 * n, self.min_keep, 1.0, generator).view(n, 2),  # x, y shares
            "start": torch.rand(n, 2, generator=generator),  # x, y: where in the free room
        }

    def apply(self, images: Tensor, labels: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        h, w = images.shape[-2:]
        xs, ys = pixel_centres((h, w), images)  # (1, W), (H, 1) in [-1, 1]
        keep, start = params["keep"] * 2, params["start"]  # widths in normalized units
        lo = -1 + (2 - keep) * start  # (n, 2) left / top edges
        hi = lo + keep
        inside_x = (xs >= lo[:, 0, None, None]) & (xs < hi[:, 0, None, None])  # (n, 1, W)
        inside_y = (ys >= lo[:, 1, None, None]) & (ys < hi[:, 1, None, None])  # (n, H, 1)
        mask = (inside_x & inside_y).unsqueeze(1).to(images.dtype)  # (n, 1, H, W)
        return images * mask, labels * mask
