"""What every synthetic generator version shares: seeds, smooth fields, blur, the task range.

Public on purpose: v1 (:mod:`.v1`), v2 (:mod:`.v2`) and the sanity tasks of
:mod:`megaseg.evaluation.sanity` draw from the same hashed seeds and smooth fields. Changing
anything here changes the output of every version (see each version's ``GENERATOR_VERSION``
and the pinned tests).

Seed ranges (global task id = ``seed_offset + task``): training uses ``seed_offset=0``;
held-out evaluation ``seed_offset=HELDOUT_SEED_OFFSET`` (10**6). :class:`TaskRange` refuses a
range that would straddle it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

HELDOUT_SEED_OFFSET = 10**6


def hash_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, stable across processes and Python versions (unlike hash())."""
    text = ":".join(str(p) for p in ("megaseg-synthetic", *parts))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


@lru_cache(maxsize=256)
def interp_matrix(points: int, size: int) -> Tensor:
    """``(size, points)`` matrix of 1D bicubic, corner-aligned interpolation (PyTorch's kernel):
    ``U @ grid @ U.T`` upsamples a ``(points, points)`` grid, as a few small matmuls."""
    eye = torch.eye(points, dtype=torch.float64).view(points, 1, points, 1)
    out = F.interpolate(eye, size=(size, 1), mode="bicubic", align_corners=True)
    return out[:, 0, :, 0].T.float().contiguous()


def smooth_field(grid: Tensor, size: int) -> Tensor:
    """Coarse control points ``(..., g, g)`` -> smooth field ``(..., size, size)``.

    Corner-aligned bicubic, so the same control points give the same field at every size.
    """
    u = interp_matrix(grid.shape[-1], size).to(grid.device)
    return u @ grid @ u.T


@lru_cache(maxsize=256)
def blur_matrix(size: int, sigma: float) -> Tensor:
    """``(size, size)`` matrix of a 1D Gaussian blur with reflected borders (as ``F.pad``
    "reflect"): ``B @ x @ B.T`` blurs ``x (..., size, size)``. A dense matmul is ~10x faster
    than a 1-channel ``conv2d`` on the CPU at 128 px, and fine on a GPU."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (offsets.double() / sigma) ** 2)
    weights = weights / weights.sum()
    rows = torch.arange(size)[:, None].expand(-1, len(offsets))
    period = 2 * (size - 1)
    cols = (rows + offsets).remainder(period)
    cols = torch.where(cols >= size, period - cols, cols)
    mat = torch.zeros(size, size, dtype=torch.float64)
    mat.index_put_((rows, cols), weights.expand(size, -1), accumulate=True)
    return mat.float()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``x (..., H, H)`` with reflected borders; ``sigma`` in pixels, tiny: none."""
    if sigma < 0.1:
        return x
    b = blur_matrix(x.shape[-1], round(sigma, 4)).to(x.device)
    return b @ x @ b.T


class TaskRange:
    """Task ids, seeds and the example API that every generator version shares.

    A subclass sets ``version`` (hashed into every task seed, so versions never share tasks),
    ``label_offset`` (the label-map value of label 0) and implements ``num_labels(task)``,
    ``_params(task)`` and ``subjects(task, indices, device)``.
    """

    version: int
    label_offset: int = 0

    def _set_range(self, num_tasks: int, seed_offset: int) -> None:
        if num_tasks < 1 or seed_offset < 0:
            raise ValueError(
                f"need num_tasks >= 1 and seed_offset >= 0, got {num_tasks}, {seed_offset}"
            )
        if seed_offset < HELDOUT_SEED_OFFSET < seed_offset + num_tasks:
            raise ValueError(
                f"tasks [{seed_offset}, {seed_offset + num_tasks}) straddle HELDOUT_SEED_OFFSET="
                f"{HELDOUT_SEED_OFFSET}: training and held-out tasks would overlap"
            )
        self.num_tasks = num_tasks
        self.seed_offset = seed_offset

    def __len__(self) -> int:
        return self.num_tasks

    # -- seeds ------------------------------------------------------------------------------

    def task_seed(self, task: int) -> int:
        """Seed of task ``task``: a hash of (version, seed_offset + task)."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range [0, {self.num_tasks})")
        return hash_seed(self.version, self.seed_offset + task)

    def subject_seed(self, task: int, index: int) -> int:
        """Seed of subject ``index`` of task ``task``: a hash of (task seed, index)."""
        self._check_index(index)
        return hash_seed(self.task_seed(task), int(index))

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.config.num_subjects:
            raise IndexError(f"subject {index} out of range [0, {self.config.num_subjects})")

    # -- examples ---------------------------------------------------------------------------

    def subject(self, task: int, index: int, device=None) -> tuple[Tensor, Tensor]:
        """Image ``(1, H, W)`` float32 in [0, 1] and label map ``(H, W)`` int64."""
        images, labels = self.subjects(task, [index], device)
        return images[0], labels[0]

    def example(self, task: int, label: int, index: int, device=None) -> tuple[Tensor, Tensor]:
        """Image ``(1, H, W)`` and binary label ``(1, H, W)`` float32 of "label ``label``"."""
        images, masks = self.batch(task, label, [index], device)
        return images[0], masks[0]

    def batch(
        self, task: int, label: int, indices: Sequence[int], device=None
    ) -> tuple[Tensor, Tensor]:
        """Images ``(n, 1, H, W)`` and binary labels ``(n, 1, H, W)`` float32, one per index
        (map value ``label + label_offset``)."""
        if not 0 <= label < self.num_labels(task):
            raise IndexError(
                f"label {label} out of range [0, {self.num_labels(task)}) for task {task}"
            )
        images, labels = self.subjects(task, indices, device)
        return images, (labels == label + self.label_offset).float()[:, None]
