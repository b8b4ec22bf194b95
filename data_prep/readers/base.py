"""What every reader yields: cases (paths and a subject) and, on load, arrays with geometry.

Readers only find and read files; orientation, resampling, windowing and slicing are the
pipeline's job (``data_prep/pipeline.py``), so every format goes through the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class CaseError(Exception):
    """A case cannot be used. The message names the file and the reason."""


@dataclass(frozen=True)
class Case:
    """One image (possibly multi-channel) and its label map, as found on disk.

    ``subject`` decides the split (all cases of one subject land in the same split); ``group``
    is the subject group of the task hierarchy (a sub-cohort or site; "all" when none).
    """

    dataset: str
    case_id: str
    subject: str
    image_paths: tuple[Path, ...]
    label_path: Path
    group: str = "all"


@dataclass
class LoadedCase:
    """Arrays of one case, channel-first.

    image: ``(C, X, Y, Z)`` for a volume or ``(C, H, W)`` for a 2D image, float.
    label: ``(X, Y, Z)`` or ``(H, W)`` integer label map (0 = background).
    affine: ``(4, 4)`` voxel-to-world (RAS, mm) for volumes, None for 2D images.
    channel_names: modality of each channel, e.g. ``["T1", "T2"]`` or ``["CT"]``.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray | None
    channel_names: list[str] = field(default_factory=list)

    @property
    def is_3d(self) -> bool:
        return self.label.ndim == 3
