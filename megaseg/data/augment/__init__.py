"""Episode augmentation, batched in torch.

Usage (``images, labels (B, 1 + S, 1, H, W)`` in [0, 1], query first)::

    augment = EpisodeAugment()                      # reference task-level + in-task settings
    images, labels = augment(images, labels, generator)

    params = augment.sample(B, 1 + S, generator)    # or: draw, then apply (deterministic)
    images, labels = augment.apply(images, labels, params)

Which transforms are task-level (one draw per episode) and which are in-task (one per
example), with their probabilities and ranges: :data:`TASK_AUGMENTATIONS` and
:data:`IN_TASK_AUGMENTATIONS` in ``episode.py``; the "generalist" training preset swaps in
:data:`GENERALIST_IN_TASK_AUGMENTATIONS` (per-subject zoom x0.5-2 and field-of-view crops).

Files: ``base.py`` (the sample/apply interface), ``geometric.py``, ``intensity.py``,
``label.py`` (the transforms), ``episode.py`` (the two lists and the batched pipeline).
"""

from .base import Params, Transform
from .episode import (
    GENERALIST_IN_TASK_AUGMENTATIONS,
    IN_TASK_AUGMENTATIONS,
    LIGHT_TASK_AUGMENTATIONS,
    TASK_AUGMENTATIONS,
    AugmentConfig,
    Draw,
    EpisodeAugment,
    EpisodeParams,
)
from .geometric import Affine, Elastic, FieldOfView, Flip, GeometricTransform
from .intensity import BrightnessContrast, GaussianBlur, GaussianNoise, InvertIntensity, Sharpness
from .label import InvertLabel, SobelEdge

__all__ = [
    "GENERALIST_IN_TASK_AUGMENTATIONS",
    "LIGHT_TASK_AUGMENTATIONS",
    "IN_TASK_AUGMENTATIONS",
    "TASK_AUGMENTATIONS",
    "Affine",
    "AugmentConfig",
    "BrightnessContrast",
    "Draw",
    "Elastic",
    "FieldOfView",
    "EpisodeAugment",
    "EpisodeParams",
    "Flip",
    "GaussianBlur",
    "GaussianNoise",
    "GeometricTransform",
    "InvertIntensity",
    "InvertLabel",
    "Params",
    "SobelEdge",
    "Sharpness",
    "Transform",
]
