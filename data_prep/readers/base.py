"""What every reader yields: cases (paths and a subject) and, on load, arrays with geometry.

The interface only; the file listing and reading shared by the readers is in ``io.py``.
Readers only find and read files; orientation, resampling, windowing and slicing are the
pipeline's job (``data_prep/pipeline.py``), so every format goes through the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class CaseError(Exception):
    """A case cannot be used. The message names the file and the reason."""


class DatasetError(ValueError):
    """A whole dataset cannot be listed (bad or unsafe dataset.json, bad spec). Names the file."""


@dataclass(frozen=True)
class Case:
    """One image (possibly multi-channel) and its label map, as found on disk.

    ``subject`` decides the split (all cases of one subject land in the same split); ``group``
    is the subject group of the task hierarchy (a sub-cohort or site; "all" when none).
    The label map is one file (``label_path``) or, for datasets that store one binary mask
    file per structure (TotalSegmentator), ``mask_paths``: the mask of ``labels[i]`` is
    ``mask_paths[i]``, and ``label_path`` is the folder holding them.
    """

    dataset: str
    case_id: str
    subject: str
    image_paths: tuple[Path, ...]
    label_path: Path
    group: str = "all"
    # Filled by the readers, read by ``load``: what each channel is, the foreground labels of
    # the loaded label map (value, name), and whether any nonzero mask pixel means label 1.
    channel_names: tuple[str, ...] = ()
    labels: tuple[tuple[int, str], ...] = ()
    binary: bool = False
    mask_paths: tuple[Path, ...] = ()

    @property
    def label_names(self) -> dict[int, str]:
        """Foreground label value -> name (0, the background, is never listed)."""
        return dict(self.labels)


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


class Reader(Protocol):
    """A registered reader (``data_prep.readers.get_reader(name)``)."""

    name: str

    def cases(self, root: Path, spec: Any) -> list[Case]:
        """Every case of the dataset in folder ``root``, sorted by case id. Raises DatasetError."""
        ...

    def load(self, case: Case) -> LoadedCase:
        """The arrays of one case, checked. Raises CaseError naming the file and the reason."""
        ...
