"""What a dataset spec says: which reader, where the files are, and how to read the images.

A public dataset is one :class:`DatasetSpec` (see ``catalog.py``), never a script: the reader
finds the cases, the pipeline windows, resamples and slices them following the spec.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


def check_dataset_name(name: object) -> str:
    """``name`` if it is usable as one folder name under ``datasets/``, else ValueError.

    A plain single path component: no separator, not ``.``/``..``, no leading dot (kept for
    megaseg's own ``.build``/``.lock``), no control character, at most 255 bytes.
    """
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or len(name.encode()) > 255
    ):
        raise ValueError(
            f"dataset name {name!r} is not a plain folder name (no '/', '\\', leading '.', "
            "'..' or control characters)"
        )
    return name


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
    A ``label`` template that names ``{structure}`` (once) stands for one binary mask file per
    structure, e.g. ``"{dir}/segmentations/{structure}.nii.gz"`` (see ``DatasetSpec.structures``).
    """

    images: str
    label: str
    channels: tuple[str, ...] = ("{path}",)
    case_id: str = "{stem}"
    match: str | None = None
    exclude: str | None = None
    binary: bool = False

    def __post_init__(self):
        if isinstance(self.channels, list):  # a list from YAML; a spec must stay hashable
            object.__setattr__(self, "channels", tuple(self.channels))
        # a spec may come from a user's YAML file: wrong types are a ValueError naming the field
        for name in ("images", "label", "case_id"):
            _expect(self, name, str)
        for name in ("match", "exclude"):
            _expect(self, name, str, none=True)
            _regex(self, name)
        if not isinstance(self.channels, tuple) or not all(
            isinstance(c, str) for c in self.channels
        ):
            raise ValueError(f"layout: channels must be a list of templates, got {self.channels!r}")
        _expect(self, "binary", bool)


@dataclass(frozen=True)
class DatasetSpec:
    """A public (or user's) dataset, declared.

    name: unique id used in the corpus (``"ACDC"``, ``"MSD-Task02_Heart"``); it becomes the
        folder ``datasets/NAME``, so it must be a plain folder name (no ``/``, ``\\``,
        leading ``.`` or control characters; ValueError otherwise).
    reader: ``"nnunet"``, ``"msd"``, ``"folder"`` (paired files, NIfTI or 2D) or ``"folder2d"``.
    root: where the dataset folder is, relative to the user's data directory (the name the
        download unpacks to); an absolute path for an ad-hoc spec. See :meth:`locate`.
    modality: one name for every channel, one per channel, or None (from dataset.json).
    planes: the axes sliced for 3D volumes (0, 1, 2 = the three orthogonal planes).
    window: intensity window ``(lo, hi)`` in image units, or None (the modality decides).
    spacing_mm: isotropic spacing the pipeline resamples volumes to.
    labels: label value -> name, or None (from dataset.json). For 2D masks the values are the
        pixel values in the mask files (``{255: "vessel"}``) unless the layout is binary.
        Given as a mapping or as ``(value, name)`` pairs; stored as ``(value, name)`` pairs
        sorted by value (a tuple, so a spec pickles and hashes); :attr:`label_names` is the
        mapping.
    structures: for one mask file per structure (the layout's label template names
        ``{structure}``; ``labels`` stays None): the structures to read, kept sorted; label
        value ``k`` is the k-th (from 1). None: every mask file found, per case.
    subject_regex: regex with a named group ``subject`` searched in the case id (splits are
        by subject); None: each case is its own subject.
    case_regex: only cases whose id fully matches are read (e.g. the labelled part).
    group: subject group of the task hierarchy (sub-cohort or site).
    slices_per_plane: per plane and label of a volume, this many more slices spread over the
        label's extent besides the mid and largest-area ones (``process_case(extra_slices=)``):
        more examples per task for a dataset of few subjects (a template), whose tasks would
        otherwise hold one or two slices. 0: the MegaMedical two.
    """

    name: str
    reader: str
    root: str
    modality: str | tuple[str, ...] | None = None
    planes: tuple[int, ...] = (0, 1, 2)
    window: tuple[float, float] | None = None
    spacing_mm: float = 1.0
    labels: tuple[tuple[int, str], ...] | None = None
    structures: tuple[str, ...] | None = None
    subject_regex: str | None = None
    case_regex: str | None = None
    group: str = "all"
    layout: FolderLayout | None = None
    licence: str = ""
    citation: str = ""
    source: str = ""
    version: str = ""
    notes: str = field(default="", compare=False)
    slices_per_plane: int = 0

    def __post_init__(self):
        check_dataset_name(self.name)  # it becomes a folder name: refused unless plain
        where = f"spec {self.name!r}"
        for name in ("reader", "group", "licence", "citation", "source", "version", "notes"):
            _expect(self, name, str, where=where)
        _expect(self, "root", (str, Path), where=where)
        for name in ("subject_regex", "case_regex"):
            _expect(self, name, str, none=True, where=where)
            _regex(self, name, where=where)
        k = self.slices_per_plane
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 64:
            raise ValueError(f"{where}: slices_per_plane must be an integer in [0, 64], got {k!r}")
        if self.layout is not None and not isinstance(self.layout, FolderLayout):
            raise ValueError(f"{where}: layout must be a mapping of FolderLayout fields")
        spacing = self.spacing_mm
        if (
            isinstance(spacing, bool)
            or not isinstance(spacing, int | float)
            or not 0 < spacing < 1e3
        ):
            raise ValueError(
                f"{where}: spacing_mm must be a number in (0, 1000) mm, got {spacing!r}"
            )
        modality = self.modality
        if not (
            modality is None
            or isinstance(modality, str)
            or (isinstance(modality, list | tuple) and all(isinstance(m, str) for m in modality))
        ):
            raise ValueError(
                f"{where}: modality must be a name or a list of names, got {modality!r}"
            )
        window = self.window
        if window is not None and (
            not isinstance(window, list | tuple)
            or len(window) != 2
            or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in window)
        ):
            raise ValueError(f"{where}: window must be [low, high] numbers, got {window!r}")
        if not isinstance(self.planes, list | tuple) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in self.planes
        ):
            raise ValueError(f"{where}: planes must be a list of axes 0, 1, 2, got {self.planes!r}")
        per_structure = self.layout is not None and "{structure}" in self.layout.label
        if self.structures is not None:
            if not per_structure:
                raise ValueError(
                    f"spec {self.name!r}: structures need a layout whose label template names "
                    "{structure}"
                )
            if isinstance(self.structures, str) or not self.structures:
                raise ValueError(f"spec {self.name!r}: structures must be a non-empty list")
            structures = tuple(sorted({str(s) for s in self.structures}))
            object.__setattr__(self, "structures", structures)
        if per_structure:
            if self.layout.label.count("{structure}") != 1:
                raise ValueError(
                    f"spec {self.name!r}: name {{structure}} once in the label template"
                )
            if self.labels is not None:
                raise ValueError(
                    f"spec {self.name!r}: with one mask file per structure, give structures, "
                    "not labels"
                )
        if self.labels is not None:
            try:
                object.__setattr__(self, "labels", _label_pairs(self.labels))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"spec {self.name!r}: labels must map integer values to names ({err})"
                ) from None
        # lists (from a YAML or JSON spec file) -> tuples: a spec is immutable and hashable
        for name in ("modality", "planes", "window"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.window is not None and not float(self.window[1]) > float(self.window[0]):
            raise ValueError(f"spec {self.name!r}: window must be (low, high), got {self.window}")
        if not set(self.planes) <= {0, 1, 2} or not self.planes:
            raise ValueError(f"spec {self.name!r}: planes must be a non-empty subset of (0, 1, 2)")
        if self.reader in ("folder", "folder2d") and self.layout is None:
            raise ValueError(f"spec {self.name!r}: the {self.reader} reader needs a layout")
        if self.subject_regex is not None and "(?P<subject>" not in self.subject_regex:
            raise ValueError(f"spec {self.name!r}: subject_regex needs a (?P<subject>...) group")

    @property
    def label_names(self) -> dict[int, str] | None:
        """Label value -> name (a new dict; from the structures, if any), or None when the
        labels are only known from the files (dataset.json, the mask files found)."""
        if self.structures is not None:
            return dict(enumerate(self.structures, 1))
        return None if self.labels is None else dict(self.labels)

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


def _expect(obj, name: str, kind, none: bool = False, where: str = "layout") -> None:
    """ValueError naming the field when ``obj.name`` is not a ``kind`` (or None if allowed)."""
    value = getattr(obj, name)
    if not (isinstance(value, kind) or (none and value is None)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}: {name} must be {names}, got {value!r}")


def _regex(obj, name: str, where: str = "layout") -> None:
    """ValueError naming the field when ``obj.name`` is not a valid regular expression."""
    import re

    value = getattr(obj, name)
    if value is not None:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(
                f"{where}: {name} {value!r} is not a regular expression ({err})"
            ) from None


def _label_pairs(labels: Mapping | Iterable) -> tuple[tuple[int, str], ...]:
    """``{1: "liver"}`` or ``[(1, "liver")]`` -> ``((1, "liver"),)``, sorted by value."""
    items = labels.items() if isinstance(labels, Mapping) else labels
    pairs = tuple(sorted({int(v): str(n) for v, n in items}.items()))
    if pairs and pairs[0][0] < 0:
        raise ValueError(f"label values must be >= 0, got {pairs[0][0]}")
    return pairs
