"""The transform interface shared by every augmentation, and small helpers (parameter dicts,
separable filters written as matrices).

A transform is a frozen dataclass holding its probability ``p`` and its ranges. It does two
separate things (torchio's split between drawing and applying):

* ``sample(n, generator) -> Params``: ``n`` independent draws, on the CPU, from ``generator``;
* ``apply(images, labels, params) -> (images, labels)``: deterministic, on the tensors' device,
  ``images, labels (n, 1, H, W)`` with row ``i`` transformed by draw ``i``.

Each kind implements one narrower method that the pipeline calls: ``map_points`` (geometric,
composable sampling-point maps), ``apply_images`` (intensity) or ``apply_labels`` (label).

``p`` is not used by the transform itself: the episode pipeline (``episode.py``) draws which rows
are active, and whether one draw serves a whole episode or one example (task-level or in-task).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

# One tensor per parameter, each with a leading axis of n draws (row i = draw i).
Params = dict[str, Tensor]
Kind = Literal["geometric", "intensity", "label", "mask"]


@dataclass(frozen=True)
class Transform:
    """Base class. ``kind`` says what a transform touches: ``geometric`` warps image and label
    alike, ``intensity`` changes only the image, ``label`` changes only the label, ``mask``
    zeroes image and label alike outside a region."""

    p: float = 0.5
    kind: ClassVar[Kind]

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {self.p}")

    def sample(self, n: int, generator: torch.Generator) -> Params:
        """``n`` independent parameter draws, CPU tensors with leading axis ``n``."""
        raise NotImplementedError

    def apply(self, images: Tensor, labels: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """Transform ``images, labels (n, 1, H, W)`` with the ``n`` draws of ``params``."""
        raise NotImplementedError

    def __call__(
        self, images: Tensor, labels: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Sample one draw per row and apply it to every row (``p`` is ignored here)."""
        params = to_device(self.sample(images.shape[0], generator), images)
        return self.apply(images, labels, params)


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """``(n,)`` float32 uniform in ``[low, high)``."""
    return low + (high - low) * torch.rand(n, generator=generator)


def select(params: Params, index: Tensor) -> Params:
    """Rows ``index`` of every parameter."""
    return {k: v[index] for k, v in params.items()}


def to_device(params: Params, like: Tensor) -> Params:
    """Move parameters to ``like``'s device; floating ones also to its dtype."""
    return {
        k: v.to(like.device, like.dtype if v.is_floating_point() else v.dtype)
        for k, v in params.items()
    }


def per_row(values: Tensor) -> Tensor:
    """``(n,)`` -> ``(n, 1, 1, 1)``, to broadcast one value per row over ``(n, 1, H, W)``."""
    return values.view(-1, 1, 1, 1)


def band_matrix(size: int, taps: Tensor) -> Tensor:
    """Matrix of a 1D filter with edge replication, ``(M @ v)[r] = sum_j taps[j] v[r + j - k//2]``
    (indices clamped to ``[0, size)``). ``taps (k,)`` or ``(n, k)``, ``k`` odd ->
    ``(size, size)`` or ``(n, size, size)``."""
    k = taps.shape[-1]
    rows = torch.arange(size, device=taps.device)[:, None]
    cols = (rows + torch.arange(k, device=taps.device) - k // 2).clamp_(0, size - 1)
    index = (rows * size + cols).flatten()  # (size * k,)
    values = taps.reshape(-1, 1, k).expand(-1, size, k).reshape(-1, size * k)
    matrix = torch.zeros(values.shape[0], size * size, dtype=taps.dtype, device=taps.device)
    matrix.scatter_add_(1, index.expand(values.shape[0], -1), values)
    return matrix.view(*taps.shape[:-1], size, size)


def separable_filter(x: Tensor, along_y: Tensor, along_x: Tensor) -> Tensor:
    """Separable 2D filter ``along_y @ x @ along_x.T`` of ``x (n, 1, H, W)``.

    ``along_y (H, H)`` or ``(n, H, H)``, ``along_x (W, W)`` or ``(n, W, W)`` (see
    :func:`band_matrix`). Two matmuls: ~3x faster than a separable depthwise ``conv2d`` and
    ~10x faster than a 1-channel 3x3 ``conv2d`` on the CPU at 128 px, and fast on a GPU.
    """
    along_y = along_y.unsqueeze(-3) if along_y.dim() == 3 else along_y
    along_x = along_x.unsqueeze(-3) if along_x.dim() == 3 else along_x
    return along_y @ x @ along_x.transpose(-1, -2)
