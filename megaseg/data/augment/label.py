"""Label transforms: change the label only (new tasks from the same images)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Params, Transform, band_matrix, separable_filter


@dataclass(frozen=True)
class LabelTransform(Transform):
    kind = "label"

    def apply_labels(self, labels: Tensor, params: Params) -> Tensor:
        """Transform ``labels (n, 1, H, W)`` with the ``n`` draws of ``params``."""
        raise NotImplementedError

    def apply(self, images: Tensor, labels: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        return images, self.apply_labels(labels, params)


@dataclass(frozen=True)
class InvertLabel(LabelTransform):
    """Foreground <-> background: ``1 - y`` (soft labels stay soft)."""

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {}

    def apply_labels(self, labels: Tensor, params: Params) -> Tensor:
        return 1.0 - labels


def sobel_magnitude(x: Tensor) -> Tensor:
    """Sobel gradient magnitude of ``x (n, 1, H, W)``, edges replicated (no frame edge)."""
    h, w = x.shape[-2:]
    smooth = x.new_tensor([1.0, 2.0, 1.0])
    diff = x.new_tensor([-1.0, 0.0, 1.0])
    gx = separable_filter(x, band_matrix(h, smooth), band_matrix(w, diff))
    gy = separable_filter(x, band_matrix(h, diff), band_matrix(w, smooth))
    return torch.sqrt(gx * gx + gy * gy)


@dataclass(frozen=True)
class SobelEdge(LabelTransform):
    """The label becomes its boundary: the Sobel gradient magnitude of the soft label, divided
    by its maximum per example so it spans [0, 1] (an anti-aliased label's edge is as strong
    as a hard one's). An empty or constant label gives an empty edge map."""

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {}

    def apply_labels(self, labels: Tensor, params: Params) -> Tensor:
        edge = sobel_magnitude(labels)
        peak = edge.amax(dim=(1, 2, 3), keepdim=True)
        # Below 1e-3 the "edge" is float noise of a constant label: return zeros, not noise.
        edge = torch.where(peak > 1e-3, edge / peak.clamp_min(1e-3), torch.zeros_like(edge))
        return edge.clamp_(0.0, 1.0)
