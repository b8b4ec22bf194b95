"""What a dataset spec says: which reader, where the files are, and how to read the images.

A public dataset is one :class:`DatasetSpec` (see ``catalog.py``), never a script: the reader
finds the cases, the pipeline windows, resamples and slices them following the spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType


@dataclass(frozen=True)
class FolderLayout:
    """How the ``folder`` / ``folder2d`` reader pairs image and label files under a dataset root.

    ``images`` is a glob (relative to the root, ``**`` allowed) that finds one file per case;
    non-image files and junk (``._x``) are ignored, so are paths matched by ``exclude``.
    Templates (``label``, ``channels``, ``case_id``) are ``str.format`` strings over
    ``{path}`` (the found file, relative), ``{dir}`` (its folder, relative), ``{parent}`` (its
    folder's name), ``{stem}``, ``{ext}``, and the named groups of ``match``, a regex searched
    in the relative path (files it does not match are not cases). A label template may end in
    ``.*`` for "any extension" (the one file that exists).
    ``binary``: any nonzero mask pixel is label 1 (masks saved as 0/255, or in colour).
    """

    images: str
    label: str
    channels: tuple[str, ...] = ("{path}",)
    case_id: str = "{stem}"
    match: str | None = None
    exclude: str | None = None
    binary: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """A public (or user's) dataset, declared.

    name: unique id used in the corpus (``"ACDC"``, ``"MSD-Task02_Heart"``).
    reader: ``"nnunet"``, ``"msd"``, ``"folder"`` (paired files, NIfTI or 2D) or ``"folder2d"``.
    root: where the dataset folder is, relative to the user's data directory (the name the
        download unpacks to); an absolute path for an ad-hoc spec. See :meth:`locate`.
    modality: one name for every channel, one per channel, or None (from dataset.json).
    planes: the axes sliced for 3D volumes (0, 1, 2 = the three orthogonal planes).
    window: intensity window ``(lo, hi)`` in image units, or None (the modality decides).
    spacing_mm: isotropic spacing the pipeline resamples volumes to.
    labels: label value -> name, or None (from dataset.json). For 2D masks the values are the
        pixel values in the mask files (``{255: "vessel"}``) unless the layout is binary.
    subject_regex: regex with a named group ``subject`` searched in the case id (splits are
        by subject); None: each case is its own subject.
    case_regex: only cases whose id fully matches are read (e.g. the labelled part).
    group: subject group of the task hierarchy (sub-cohort or site).
    """

    name: str
    reader: str
    root: str
    modality: str | tuple[str, ...] | None = None
    planes: tuple[int, ...] = (0, 1, 2)
    window: tuple[float, float] | None = None
    spacing_mm: float = 1.0
    labels: Mapping[int, str] | None = None
    subject_regex: str | None = None
    case_regex: str | None = None
    group: str = "all"
    layout: FolderLayout | None = None
    licence: str = ""
    citation: str = ""
    source: str = ""
    version: str = ""
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        if self.labels is not None:
            frozen = MappingProxyType({int(k): str(v) for k, v in dict(self.labels).items()})
            object.__setattr__(self, "labels", frozen)
        if isinstance(self.modality, list):
            object.__setattr__(self, "modality", tuple(self.modality))
        if self.window is not None and not float(self.window[1]) > float(self.window[0]):
            raise ValueError(f"spec {self.name!r}: window must be (low, high), got {self.window}")
        if not set(self.planes) <= {0, 1, 2} or not self.planes:
            raise ValueError(f"spec {self.name!r}: planes must be a non-empty subset of (0, 1, 2)")
        if self.reader in ("folder", "folder2d") and self.layout is None:
            raise ValueError(f"spec {self.name!r}: the {self.reader} reader needs a layout")
        if self.subject_regex is not None and "(?P<subject>" not in self.subject_regex:
            raise ValueError(f"spec {self.name!r}: subject_regex needs a (?P<subject>...) group")

    def __hash__(self) -> int:  # labels is a mapping; the name identifies a spec
        return hash((self.name, self.reader, self.root))

    def locate(self, data_dir: str | Path) -> Path:
        """The dataset folder: ``data_dir/root`` if it exists, else ``data_dir/name``.

        Raises FileNotFoundError naming both places.
        """
        tried = [Path(data_dir) / self.root, Path(data_dir) / self.name]
        for path in tried:
            if path.is_dir():
                return path
        raise FileNotFoundError(
            f"dataset {self.name!r} not found: tried {', '.join(map(str, tried))} ({self.source})"
        )
