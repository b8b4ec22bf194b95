"""Episode augmentation: task-level and in-task transforms over a batch of episodes.

An episode is ``N = 1 + S`` examples of one task, the query first. The two kinds of
augmentation differ only in how many draws are made, and that is decided here, in one place:

* task-level (``EpisodeAugment.task``): one draw per episode, ``n = B``, broadcast to its N
  examples: every example goes through the same function, so the episode becomes a new task;
* in-task (``EpisodeAugment.in_task``): one draw per example, ``n = B * N``.

Order of application: all geometric transforms first, task-level then in-task, composed into
a single resampling per example (see ``geometric.py``); then the other transforms, task-level
then in-task, each scope in its list order. So a label's Sobel edge is taken after every warp,
and the zero padding that a warp brings in is treated as the image's background: intensity
inversion whitens it with a black background, label inversion makes it foreground with the
rest of the background.

Parameters are drawn on the CPU (``sample``) and moved to the images' device in ``apply``;
only the rows where a transform is active are computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import Params, Transform, select, to_device
from .geometric import Affine, Elastic, FieldOfView, Flip, GeometricTransform, warp
from .intensity import (
    BrightnessContrast,
    GaussianBlur,
    GaussianNoise,
    IntensityTransform,
    InvertIntensity,
    Sharpness,
)
from .label import InvertLabel, LabelTransform, SobelEdge


@dataclass(frozen=True)
class AugmentConfig:
    """The transforms of one scope, each with its probability ``p`` and its ranges.

    ``enabled=False`` (or passing ``None`` to :class:`EpisodeAugment`) turns the scope off;
    ``p=0`` turns off one transform (see :meth:`replace`).
    """

    transforms: tuple[Transform, ...] = ()
    enabled: bool = True

    def replace(self, kind: type[Transform], **changes) -> AugmentConfig:
        """A copy where every transform of class ``kind`` has ``changes`` applied, e.g.
        ``TASK_AUGMENTATIONS.replace(SobelEdge, p=0.0)``."""
        if not any(type(t) is kind for t in self.transforms):
            raise KeyError(f"no {kind.__name__} in {[type(t).__name__ for t in self.transforms]}")
        transforms = tuple(
            dataclasses.replace(t, **changes) if type(t) is kind else t for t in self.transforms
        )
        return dataclasses.replace(self, transforms=transforms)


# Reference probabilities and ranges (UniverSeg, see DESIGN.md section 3). Ranges the
# reference does not give: sharpness factor, elastic magnitude, and the in-task affine (the
# task-level ranges are used).
TASK_AUGMENTATIONS = AugmentConfig(
    transforms=(
        Affine(p=0.5, rotation=(0.0, 360.0), scale=(0.8, 1.1), translate=0.2),
        BrightnessContrast(p=0.5, brightness=0.1, contrast=(0.8, 1.2)),
        GaussianBlur(p=0.5, sigma=(0.1, 1.1)),
        GaussianNoise(p=0.5, sigma=(0.0, 0.05)),
        Sharpness(p=0.5, factor=(1.5, 3.0)),
        Elastic(p=0.25, magnitude=(0.01, 0.04), control_points=5),
        Flip(p=0.5),
        InvertIntensity(p=0.5),
        InvertLabel(p=0.5),
        SobelEdge(p=0.5),
    )
)
IN_TASK_AUGMENTATIONS = AugmentConfig(
    transforms=(
        Affine(p=0.5, rotation=(0.0, 360.0), scale=(0.8, 1.1), translate=0.2),
        BrightnessContrast(p=0.25, brightness=0.0, contrast=(0.5, 1.5)),
        GaussianBlur(p=0.25, sigma=(0.1, 1.1)),
        GaussianNoise(p=0.25, sigma=(0.0, 0.05)),
        Sharpness(p=0.25, factor=(1.5, 3.0)),
        Elastic(p=0.8, magnitude=(0.01, 0.04), control_points=5),
    )
)
# The "generalist" preset's in-task set (issue #13: the per-subject geometry of synthetic tasks
# v2, see SyntheticV2Config): the reference in-task set with a wider affine, zoom x0.5-2
# log-uniform (a subject imaged at half or twice the scale of another) on most subjects, and a
# field-of-view crop keeping >= 55% of each side on a quarter of them (cut-off anatomy).
# Task-level transforms stay the reference ones.
GENERALIST_IN_TASK_AUGMENTATIONS = AugmentConfig(
    transforms=(
        Affine(p=0.8, rotation=(0.0, 360.0), scale=(0.5, 2.0), translate=0.2, log_scale=True),
        *IN_TASK_AUGMENTATIONS.transforms[1:],
        FieldOfView(p=0.25, min_keep=0.55),
    )
)

# The "light" preset (issue #13's ablation of augmentation strength): task-level flips and
# intensity inversion only, no in-task augmentation.
LIGHT_TASK_AUGMENTATIONS = AugmentConfig(transforms=(Flip(p=0.5), InvertIntensity(p=0.5)))


@dataclass
class Draw:
    """One transform's draws for a batch: ``n = B`` rows if ``task_level`` else ``B * N``.
    ``active (n,)`` bool says which rows apply it (probability ``p``); CPU tensors."""

    transform: Transform
    task_level: bool
    active: Tensor
    params: Params

    def per_example(self, num_examples: int) -> Draw:
        """The same draws with one row per example (``B * N``): task-level rows repeated."""
        if not self.task_level:
            return self
        params = {k: v.repeat_interleave(num_examples, dim=0) for k, v in self.params.items()}
        return Draw(self.transform, False, self.active.repeat_interleave(num_examples), params)


@dataclass
class EpisodeParams:
    """Every random choice for a batch of ``batch_size`` episodes of ``num_examples`` each."""

    batch_size: int
    num_examples: int
    draws: list[Draw] = field(default_factory=list)

    def applied(self, episode: int, task_level: bool = True) -> list[str]:
        """Names of the transforms active for ``episode`` (task-level; else any example)."""
        names = []
        for d in self.draws:
            if d.task_level != task_level:
                continue
            rows = d.active.view(self.batch_size, -1)[episode]
            if rows.any():
                names.append(type(d.transform).__name__)
        return names


class EpisodeAugment:
    """Task-level and in-task augmentation of episodes, batched in torch (CPU or GPU).

    ``images, labels (B, N, 1, H, W)``, N = 1 + S (query first), float in [0, 1]. All
    randomness comes from the CPU ``generator`` passed to :meth:`sample` / ``__call__``, so an
    augmented episode is a pure function of its inputs and the generator state (up to float
    rounding between devices).
    """

    def __init__(
        self,
        task: AugmentConfig | None = TASK_AUGMENTATIONS,
        in_task: AugmentConfig | None = IN_TASK_AUGMENTATIONS,
    ):
        self.task = task if task is not None and task.enabled else AugmentConfig(enabled=False)
        self.in_task = (
            in_task if in_task is not None and in_task.enabled else AugmentConfig(enabled=False)
        )

    def __repr__(self) -> str:
        def names(c: AugmentConfig) -> str:
            return (
                ", ".join(f"{type(t).__name__}(p={t.p})" for t in c.transforms)
                if c.enabled
                else "off"
            )

        return f"EpisodeAugment(task=[{names(self.task)}], in_task=[{names(self.in_task)}])"

    def _scopes(self) -> list[tuple[bool, AugmentConfig]]:
        return [(True, self.task), (False, self.in_task)]

    def sample(
        self, batch_size: int, num_examples: int, generator: torch.Generator
    ) -> EpisodeParams:
        """Draw every random choice for ``batch_size`` episodes of ``num_examples`` examples.

        Each transform draws its activity mask and its parameters for all rows, active or not,
        so the random stream does not depend on the probabilities."""
        if generator.device.type != "cpu":
            raise ValueError(f"expected a CPU torch.Generator, got one on {generator.device}")
        out = EpisodeParams(batch_size, num_examples)
        for task_level, config in self._scopes():
            if not config.enabled:
                continue
            n = batch_size if task_level else batch_size * num_examples
            for t in config.transforms:
                active = torch.rand(n, generator=generator) < t.p
                out.draws.append(Draw(t, task_level, active, t.sample(n, generator)))
        return out

    def apply(self, images: Tensor, labels: Tensor, params: EpisodeParams) -> tuple[Tensor, Tensor]:
        """Apply drawn ``params`` to ``images, labels (B, N, 1, H, W)``; deterministic."""
        _check_episodes(images, labels)
        shape = images.shape
        if shape[:2] != (params.batch_size, params.num_examples):
            raise ValueError(
                f"params were drawn for (B, N) = ({params.batch_size}, {params.num_examples}), "
                f"images have {tuple(shape[:2])}"
            )
        # (B, N, 1, H, W) -> (B*N, 1, H, W): row b*N + i is example i of episode b. Copied
        # (rows are then overwritten in place) to float32: sampling points and filters need it,
        # whatever the input dtype or an enclosing autocast region.
        x = images.reshape(-1, *shape[2:]).to(torch.float32, copy=True)
        y = labels.reshape(-1, *shape[2:]).to(torch.float32, copy=True)
        draws = [d.per_example(params.num_examples) for d in params.draws]
        with torch.autocast(x.device.type, enabled=False):
            x, y = self._apply_draws(x, y, draws)
        # warp() returns channel views of one tensor: hand back contiguous tensors.
        x = x.clamp_(0.0, 1.0).to(images.dtype).contiguous().view(shape)
        y = y.clamp_(0.0, 1.0).to(labels.dtype).contiguous().view(shape)
        return x, y

    @staticmethod
    def _apply_draws(x: Tensor, y: Tensor, draws: list[Draw]) -> tuple[Tensor, Tensor]:
        """``x, y (n, 1, H, W)`` float32, ``draws`` with one row per example."""
        geometric = [d for d in draws if isinstance(d.transform, GeometricTransform)]
        if geometric:
            x, y = _warp_composed(x, y, geometric)
        for d in draws:
            rows = d.active.nonzero().squeeze(1)
            if rows.numel() == 0 or isinstance(d.transform, GeometricTransform):
                continue
            t, p = d.transform, to_device(select(d.params, rows), x)
            # Gather, transform and put back only the tensor that the transform changes.
            if isinstance(t, IntensityTransform):
                x = _put_rows(x, rows, t.apply_images(_take_rows(x, rows), p))
            elif isinstance(t, LabelTransform):
                y = _put_rows(y, rows, t.apply_labels(_take_rows(y, rows), p))
            else:
                out_x, out_y = t.apply(_take_rows(x, rows), _take_rows(y, rows), p)
                x, y = _put_rows(x, rows, out_x), _put_rows(y, rows, out_y)
        return x, y

    def __call__(
        self, images: Tensor, labels: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Augment ``images, labels (B, N, 1, H, W)``: :meth:`sample` then :meth:`apply`."""
        _check_episodes(images, labels)
        return self.apply(images, labels, self.sample(images.shape[0], images.shape[1], generator))


def _take_rows(src: Tensor, rows: Tensor) -> Tensor:
    """Rows ``rows`` (CPU indices) of ``src``; ``src`` itself when that is every row."""
    return src if len(rows) == len(src) else src.index_select(0, rows.to(src.device))


def _put_rows(dst: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    """``dst`` with rows ``rows`` set to ``values`` (in place); ``values`` when that is every row."""
    return values if len(rows) == len(dst) else dst.index_copy_(0, rows.to(dst.device), values)


def _warp_composed(x: Tensor, y: Tensor, draws: list[Draw]) -> tuple[Tensor, Tensor]:
    """Compose the active geometric draws of each row (list order = order of application) into
    one sampling grid and resample the rows that move, once. ``x, y (n, 1, H, W)``, may be
    modified in place."""
    moved = torch.stack([d.active for d in draws]).any(dim=0)
    rows = moved.nonzero().squeeze(1)
    if rows.numel() == 0:
        return x, y
    size = x.shape[-2], x.shape[-1]
    points = x.new_empty(len(rows), 2, *size)
    # Rows whose points are still the pixel centres: transforms get None and skip work there.
    fresh = torch.ones(len(rows), dtype=torch.bool)
    # Output pixel -> input: the transform applied last is undone first.
    for d in reversed(draws):
        active = d.active[rows]
        for is_fresh in (True, False):
            sub = (active & (fresh == is_fresh)).nonzero().squeeze(1)
            if sub.numel() == 0:
                continue
            p = to_device(select(d.params, rows[sub]), x)
            before = None if is_fresh else _take_rows(points, sub)
            points = _put_rows(points, sub, d.transform.map_points(before, p, size))
        fresh &= ~active
    warped = warp(_take_rows(x, rows), _take_rows(y, rows), points)
    return _put_rows(x, rows, warped[0]), _put_rows(y, rows, warped[1])


def _check_episodes(images: Tensor, labels: Tensor) -> None:
    if images.dim() != 5 or images.shape[2] != 1:
        raise ValueError(f"images must be (B, N, 1, H, W), got {tuple(images.shape)}")
    if labels.shape != images.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match images {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
