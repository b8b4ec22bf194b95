"""Synthetic in-context tasks: random smooth "anatomies", generated on the fly in torch.

A *task* is a family of label maps that share one anatomy. For each task seed we draw
task-level parameters (number of labels, smoothness, warp strength, per-label intensities,
texture, bias field, blur, noise) and a base label map: the argmax over L channels of
Perlin-like noise (a few octaves of bicubically upsampled coarse random grids). A *subject*
is that base map under its own smooth random warp (small affine + coarse displacement field),
and its image: per-label intensity (task means + small per-subject jitter) + smooth texture,
times a smooth multiplicative bias field, Gaussian blur, Gaussian noise, min-max to [0, 1].
Each label ``k`` of task ``t`` is one binary segmentation task. All labels are foreground
structures: there is no background class, so the label map takes values ``0 .. L-1``.

No label is trivial by construction: in the base map every label covers at least 1% of the
image inside its central 60% x 60% (labels under that are grown from their own noise maxima,
so a task keeps its drawn label count, uniform in 5-20), which keeps each label clearly present
after the per-subject warps (>= ~0.5% of every subject in practice). Two subjects of one task
overlap with a mean label Dice of ~0.55; subjects of different tasks ~0.05 (chance).

Everything is a pure function of ``(GENERATOR_VERSION, seed_offset + task, index, config)``:
every random draw goes through an explicit :class:`torch.Generator` seeded by a hash, so the
same call gives bit-identical tensors on the CPU whatever was generated before, whichever other
subjects share the batch (and, as checked, with 1 or 2 torch threads). Random numbers
are always drawn on the CPU (on another device results match the CPU up to float rounding).
The coarse grids do not depend on the output size, so one subject at 64 and at 128 pixels is
the same anatomy (only the pixel noise differs).

Seed ranges (global task id = ``seed_offset + task``):

- training: ``seed_offset=0``, tasks ``[0, num_tasks)`` (the reference recipe uses 1,000);
- held-out evaluation: ``seed_offset=HELDOUT_SEED_OFFSET`` (10**6, :mod:`.base`), tasks ``[0, n)``.

The two never overlap as long as training uses fewer than 10**6 tasks; the constructor refuses a
range that would straddle :data:`HELDOUT_SEED_OFFSET`. Change :data:`GENERATOR_VERSION` whenever a
change to this file alters the output for a given seed, so stored corpora stay traceable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from megaseg.data.synthetic.base import (
    TaskRange,
    gaussian_blur,
    hash_seed,
    smooth_field,
    uniform,
)

GENERATOR_VERSION = 1

# Size at which label areas are measured when growing small labels, so that a task's anatomy
# does not depend on the requested output size.
_CANONICAL_SIZE = 128
_MAX_TASK_DRAWS = 50
_GROW_STEP = 0.05  # logit units; the summed noise has a standard deviation of about 0.8
_MAX_GROW_STEPS = 200


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic task distribution. ``(lo, hi)`` ranges are drawn uniformly
    once per task unless said otherwise. Lengths are fractions of the image side and blur is in
    pixels at 128 px (scaled with ``size``), so a task looks the same at every resolution."""

    size: int = 128  # output side in pixels
    num_subjects: int = 100  # subjects per task; indices [0, num_subjects)
    min_labels: int = 5
    max_labels: int = 20
    # Every label of the base map covers at least this fraction of the image inside its centre
    # (``label_margin`` of the side cut at each border, where warps can push labels out of view);
    # smaller labels are grown (see _grow_small_labels), so each task keeps its drawn label count.
    min_label_fraction: float = 0.01
    label_margin: float = 0.2
    # Anatomy: coarse grid cells across the image for the first noise octave (larger = busier).
    scale_range: tuple[int, int] = (2, 6)  # integer, inclusive
    octaves: int = 3  # each octave doubles the grid
    persistence_range: tuple[float, float] = (0.25, 0.55)  # amplitude ratio between octaves
    label_size_spread: tuple[float, float] = (0.0, 0.5)  # std of per-label logit offsets
    # Per-subject warp: affine jitter (per subject) plus a smooth displacement field.
    rotation_deg: float = 8.0  # uniform in [-r, r]
    scale_jitter: float = 0.06  # isotropic scale in [1 - s, 1 + s]
    translation: float = 0.03  # fraction of the image side, each axis in [-t, t]
    warp_grid: int = 5  # control points per side of the displacement field
    warp_strength_range: tuple[float, float] = (0.005, 0.03)  # displacement std, fraction of side
    # Image appearance.
    intensity_jitter_range: tuple[float, float] = (0.0, 0.05)  # std of per-subject label means
    texture_range: tuple[float, float] = (0.0, 0.08)  # amplitude of smooth intensity texture
    texture_grid: int = 16  # control points per side of the texture field
    bias_strength_range: tuple[float, float] = (0.0, 0.5)  # bias = exp(strength * N(0,1) field)
    bias_grid: int = 4
    blur_sigma_range: tuple[float, float] = (0.0, 1.5)  # pixels at 128 px
    noise_std_range: tuple[float, float] = (0.0, 0.08)  # before min-max, means in [0, 1]


@dataclass(frozen=True)
class _Anatomy:
    """The noise behind a task's base label map: ``grids[k]`` holds the ``(L, g*2**k + 1,
    g*2**k + 1)`` control points of octave ``k``; label ``l`` is where channel ``l`` is largest."""

    grids: tuple[Tensor, ...]
    amplitudes: tuple[float, ...]
    offsets: Tensor  # (L,) per-label logit offsets: some labels larger than others

    def logits(self, size: int) -> Tensor:
        """Perlin-like noise plus offsets: ``(L, size, size)``."""
        out = self.offsets[:, None, None].expand(-1, size, size).clone()
        for grid, amp in zip(self.grids, self.amplitudes, strict=True):
            out += amp * smooth_field(grid, size)
        return out


@dataclass(frozen=True)
class _TaskParams:
    """Task-level appearance and warp draws (small; the anatomy is cached separately)."""

    seed: int
    num_labels: int
    means: Tensor  # (L,) label intensities in [0, 1]
    warp_strength: float
    intensity_jitter: float
    texture: float
    bias_strength: float
    blur_sigma: float  # pixels at 128 px
    noise_std: float


def _num_labels(seed: int, config: SyntheticConfig) -> int:
    """Drawn on its own so that listing the tasks' label counts does not build any anatomy."""
    gen = torch.Generator().manual_seed(hash_seed(seed, "num_labels"))
    return int(torch.randint(config.min_labels, config.max_labels + 1, (), generator=gen))


@lru_cache(maxsize=16)  # ~0.1 MB each; only needed to build base maps
def task_anatomy(seed: int, config: SyntheticConfig) -> _Anatomy:
    """The Perlin-like anatomy of task ``seed`` (v2's ``anatomy`` kind draws it too)."""
    num = _num_labels(seed, config)
    gen = torch.Generator().manual_seed(hash_seed(seed, "anatomy"))
    for _ in range(_MAX_TASK_DRAWS):
        g0 = int(torch.randint(config.scale_range[0], config.scale_range[1] + 1, (), generator=gen))
        persistence = uniform(gen, *config.persistence_range)
        grids = tuple(
            torch.randn(num, g0 * 2**k + 1, g0 * 2**k + 1, generator=gen)
            for k in range(config.octaves)
        )
        amps = tuple(persistence**k for k in range(config.octaves))
        norm = math.sqrt(sum(a * a for a in amps))
        amps = tuple(a / norm for a in amps)
        offsets = uniform(gen, *config.label_size_spread) * torch.randn(num, generator=gen)
        anatomy = _grow_small_labels(
            _Anatomy(grids, amps, offsets), config.min_label_fraction, config.label_margin
        )
        if anatomy is not None:
            return anatomy
    # Unreachable in practice: growing has not failed once in 1,000 default tasks.
    raise RuntimeError(f"task seed {seed}: no label map whose {num} labels are all large enough")


def _grow_small_labels(anatomy: _Anatomy, min_fraction: float, margin: float) -> _Anatomy | None:
    """Raise, in small steps, the logit offset of every label that covers less than
    ``min_fraction`` of the image inside its centre (``margin`` of the side cut at each border,
    where per-subject warps can push a label out of view) until all reach it. Small labels grow
    from their own noise maxima, at the expense of their neighbours, so no label is lost.
    Returns None when some label is still too small after ``_MAX_GROW_STEPS`` steps."""
    cut = round(margin * _CANONICAL_SIZE)
    noise = anatomy.logits(_CANONICAL_SIZE)[
        :, cut : _CANONICAL_SIZE - cut, cut : _CANONICAL_SIZE - cut
    ]
    offsets = anatomy.offsets.clone()
    noise -= offsets[:, None, None]
    for _ in range(_MAX_GROW_STEPS):
        labels = (noise + offsets[:, None, None]).argmax(0)
        area = torch.bincount(labels.flatten(), minlength=len(offsets))
        small = area < min_fraction * _CANONICAL_SIZE**2
        if not small.any():
            return _Anatomy(anatomy.grids, anatomy.amplitudes, offsets)
        offsets[small] += _GROW_STEP
    return None


@lru_cache(maxsize=65536)
def _task_params(seed: int, config: SyntheticConfig) -> _TaskParams:
    num = _num_labels(seed, config)
    gen = torch.Generator().manual_seed(hash_seed(seed, "appearance"))
    return _TaskParams(
        seed=seed,
        num_labels=num,
        means=torch.rand(config.max_labels, generator=gen)[:num].clone(),
        warp_strength=uniform(gen, *config.warp_strength_range),
        intensity_jitter=uniform(gen, *config.intensity_jitter_range),
        texture=uniform(gen, *config.texture_range),
        bias_strength=uniform(gen, *config.bias_strength_range),
        blur_sigma=uniform(gen, *config.blur_sigma_range),
        noise_std=uniform(gen, *config.noise_std_range),
    )


@lru_cache(maxsize=1024)  # 16 KB each at 128 px
def _base_map(seed: int, config: SyntheticConfig, size: int) -> Tensor:
    """Base label map of a task: ``(size, size)`` uint8 label ids."""
    return task_anatomy(seed, config).logits(size).argmax(0).to(torch.uint8)


class SyntheticTasks(TaskRange):
    """``num_tasks`` synthetic tasks with ``config.num_subjects`` subjects each.

    Task ``t`` has ``num_labels(t)`` labels (5-20 by default); ``example(t, k, i)`` is the
    binary task "label k" on subject i. Use ``seed_offset=HELDOUT_SEED_OFFSET`` for evaluation
    tasks that training (``seed_offset=0``) never sees. Random numbers are drawn on the CPU;
    ``device`` only says where the work is done and where the tensors are returned.
    """

    version = GENERATOR_VERSION

    def __init__(
        self,
        num_tasks: int = 1000,
        seed_offset: int = 0,
        config: SyntheticConfig = SyntheticConfig(),  # noqa: B008 (frozen, immutable)
    ):
        self._set_range(num_tasks, seed_offset)
        if not 1 <= config.min_labels <= config.max_labels <= 255:  # base maps are uint8
            raise ValueError(f"need 1 <= min_labels <= max_labels <= 255, got {config}")
        self.config = config

    def __repr__(self) -> str:
        return (
            f"SyntheticTasks(num_tasks={self.num_tasks}, seed_offset={self.seed_offset}, "
            f"size={self.config.size}, num_subjects={self.config.num_subjects})"
        )

    def _params(self, task: int) -> _TaskParams:
        return _task_params(self.task_seed(task), self.config)

    def num_labels(self, task: int) -> int:
        """Number of labels of ``task``; labels are ``0 .. num_labels - 1``."""
        return self._params(task).num_labels

    def subjects(self, task: int, indices: Sequence[int], device=None) -> tuple[Tensor, Tensor]:
        """Images ``(n, 1, H, W)`` float32 in [0, 1] and label maps ``(n, H, W)`` int64.

        Vectorized over subjects; each subject's draws come from its own generator, so a
        subject's tensors do not depend on which other indices are in the batch.
        """
        p = self._params(task)
        cfg = self.config
        size, n, num = cfg.size, len(indices), p.num_labels
        if n == 0:
            raise ValueError("indices is empty")
        device = torch.device("cpu") if device is None else torch.device(device)

        # Per-subject draws, always on the CPU and in a fixed order: 4 uniforms (affine), then
        # one normal vector (warp, intensity jitter, texture, bias field), then pixel noise.
        wg, tg, bg = cfg.warp_grid, cfg.texture_grid, cfg.bias_grid
        splits = (2 * wg * wg, num, tg * tg, bg * bg)
        uniform = torch.empty(n, 4)
        normal = torch.empty(n, sum(splits))
        noise = torch.empty(n, 1, size, size)
        task_seed = p.seed
        for row, index in enumerate(indices):
            self._check_index(index)
            gen = torch.Generator().manual_seed(hash_seed(task_seed, int(index)))
            torch.rand(4, generator=gen, out=uniform[row])
            torch.randn(
                splits[0] + splits[1] + splits[2] + splits[3], generator=gen, out=normal[row]
            )
            torch.randn(size, size, generator=gen, out=noise[row, 0])
        warp, jitter, texture, bias = normal.to(device).split(splits, dim=1)
        uniform = 2 * uniform.to(device) - 1

        # Sampling grid (normalized coordinates, align_corners=False): small affine plus a
        # smooth displacement field; then warp the task's base map (nearest: ids stay ids).
        angle = math.radians(cfg.rotation_deg) * uniform[:, 0, None, None]
        scale = 1 + cfg.scale_jitter * uniform[:, 1, None, None]
        cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
        shift = 2 * cfg.translation * uniform[:, 2:, None, None]  # normalized coords span 2
        coords = (2 * torch.arange(size, device=device) + 1) / size - 1
        x, y = coords[None, None, :], coords[None, :, None]
        grid = 2 * p.warp_strength * smooth_field(warp.view(n, 2, wg, wg), size)
        grid[:, 0] += cos * x - sin * y + shift[:, 0]
        grid[:, 1] += sin * x + cos * y + shift[:, 1]
        base = _base_map(p.seed, cfg, size).to(device, torch.float32).expand(n, 1, -1, -1)
        labels = F.grid_sample(
            base,
            grid.permute(0, 2, 3, 1),
            mode="nearest",
            padding_mode="reflection",
            align_corners=False,
        )
        labels = labels[:, 0].long()

        # Image: label means + texture, times bias field, blur, noise, min-max.
        means = p.means.to(device) + p.intensity_jitter * jitter
        image = torch.gather(means, 1, labels.flatten(1)).view(n, 1, size, size)
        image += p.texture * smooth_field(texture.view(n, 1, tg, tg), size)
        image *= torch.exp(p.bias_strength * smooth_field(bias.view(n, 1, bg, bg), size))
        image = gaussian_blur(image, p.blur_sigma * size / 128)
        image += p.noise_std * noise.to(device)
        lo = image.amin(dim=(2, 3), keepdim=True)
        hi = image.amax(dim=(2, 3), keepdim=True)
        image = ((image - lo) / (hi - lo).clamp_min(1e-6)).clamp_(0.0, 1.0)
        return image, labels


def preview_png(
    path: str | Path,
    tasks: int = 4,
    subjects: int = 4,
    synthetic: SyntheticTasks | None = None,
) -> Path:
    """Write a grid: one row per task, ``subjects`` (image, label map) pairs per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    synthetic = synthetic or SyntheticTasks(num_tasks=tasks)
    fig = Figure(figsize=(2 * subjects * 1.4, tasks * 1.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(tasks, 2 * subjects, squeeze=False)
    for t in range(tasks):
        images, labels = synthetic.subjects(t, list(range(subjects)))
        for s in range(subjects):
            axes[t, 2 * s].imshow(images[s, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[t, 2 * s + 1].imshow(
                labels[s].numpy(),
                cmap="tab20",
                interpolation="nearest",
                vmin=0,
                vmax=max(19, synthetic.num_labels(t) - 1),
            )
        axes[t, 0].set_ylabel(f"task {t}\nL={synthetic.num_labels(t)}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    path = Path(path)
    fig.savefig(path)
    return path
