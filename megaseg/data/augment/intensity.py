"""Intensity transforms: change the image only, and keep it in [0, 1] (clipped)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Params, Transform, band_matrix, per_row, separable_filter, uniform


@dataclass(frozen=True)
class IntensityTransform(Transform):
    kind = "intensity"

    def apply_images(self, images: Tensor, params: Params) -> Tensor:
        """Transform ``images (n, 1, H, W)`` with the ``n`` draws of ``params``."""
        raise NotImplementedError

    def apply(self, images: Tensor, labels: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        return self.apply_images(images, params), labels


@dataclass(frozen=True)
class BrightnessContrast(IntensityTransform):
    """``(x - mean) * contrast + mean + brightness``, mean over the image (torchvision's
    convention: contrast pivots on the image's mean grey, so a dark background stays dark).
    ``brightness`` is drawn in ``[-brightness, brightness]``; 0 disables it."""

    brightness: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.2)

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {
            "brightness": uniform(n, -self.brightness, self.brightness, generator),
            "contrast": uniform(n, *self.contrast, generator),
        }

    def apply_images(self, images: Tensor, params: Params) -> Tensor:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        out = (images - mean) * per_row(params["contrast"]) + mean + per_row(params["brightness"])
        return out.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class GaussianBlur(IntensityTransform):
    """Gaussian blur, ``sigma`` in pixels, edges replicated; the kernel spans 3 sigma of the
    largest sigma in the range, so every row of a batch shares one matrix size."""

    sigma: tuple[float, float] = (0.1, 1.1)

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {"sigma": uniform(n, *self.sigma, generator)}

    def apply_images(self, images: Tensor, params: Params) -> Tensor:
        radius = max(1, math.ceil(3 * self.sigma[1]))
        offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
        taps = torch.exp(-0.5 * (offsets / params["sigma"][:, None]) ** 2)  # (n, 2r+1)
        taps = taps / taps.sum(dim=1, keepdim=True)
        h, w = images.shape[-2:]
        along_y = band_matrix(h, taps)
        along_x = along_y if w == h else band_matrix(w, taps)
        return separable_filter(images, along_y, along_x).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class GaussianNoise(IntensityTransform):
    """Additive Gaussian noise with std ``sigma`` (intensity units).

    The pixel noise is generated at ``apply`` time from a per-draw seed that ``sample`` draws,
    so the draw stays a small tensor and the noise is made directly on the images' device (the
    same seed gives different noise on the CPU and on a GPU). Rows that share a draw (a
    task-level draw broadcast over an episode) share the noise field too: a task-level
    transform is one function applied to every example.
    """

    sigma: tuple[float, float] = (0.0, 0.05)

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {
            "sigma": uniform(n, *self.sigma, generator),
            "seed": torch.randint(0, 2**62, (n,), generator=generator),
        }

    def apply_images(self, images: Tensor, params: Params) -> Tensor:
        seeds, which = torch.unique(params["seed"].cpu(), return_inverse=True)
        noise = torch.empty(len(seeds), *images.shape[1:], device=images.device, dtype=images.dtype)
        for row, seed in enumerate(seeds.tolist()):
            gen = torch.Generator(device=images.device).manual_seed(seed)
            noise[row].normal_(generator=gen)
        out = images + per_row(params["sigma"]) * noise[which.to(images.device)]
        return out.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class Sharpness(IntensityTransform):
    """torchvision's ``adjust_sharpness``: ``smooth + factor * (x - smooth)`` with the 3x3
    smoothing kernel ``[[1,1,1],[1,5,1],[1,1,1]] / 13``; ``factor`` 1 is the identity, larger
    sharpens. The reference gives no range; (1.5, 3) is a visible but not harsh sharpening."""

    factor: tuple[float, float] = (1.5, 3.0)

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {"factor": uniform(n, *self.factor, generator)}

    def apply_images(self, images: Tensor, params: Params) -> Tensor:
        # smooth = (box3x3 + 4 x) / 13, so  smooth + f (x - smooth) = a x - c box3x3  with
        # a = 1 + 9 (f - 1) / 13 and c = (f - 1) / 13: one separable filter and one fused op.
        h, w = images.shape[-2:]
        ones = images.new_ones(3)
        box = separable_filter(images, band_matrix(h, ones), band_matrix(w, ones))
        excess = per_row(params["factor"]) - 1
        out = torch.addcmul(images * (1 + 9 * excess / 13), box, excess, value=-1 / 13)
        return out.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class InvertIntensity(IntensityTransform):
    """``1 - x``."""

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {}

    def apply_images(self, images: Tensor, params: Params) -> Tensor:
        return 1.0 - images
