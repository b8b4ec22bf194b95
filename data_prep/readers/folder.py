"""Folders of paired image and label files, 2D (png, jpg, tif, bmp, gif, ppm) or NIfTI.

The spec's :class:`~data_prep.specs.base.FolderLayout` says where the images are and how each
label file is named from its image: ``images/x.png`` + ``masks/x.png``, ``x.jpg`` +
``x_mask.png``, DRIVE's ``21_training.tif`` + ``21_manual1.gif``, ACDC's
``patient001_frame01.nii.gz`` + ``..._gt.nii.gz``, BraTS's four channel files + ``_seg``.
Label values must be 0 or one of the spec's labels (after the binary mapping, if any).

A label template naming ``{structure}`` means one binary mask file per structure
(TotalSegmentator's ``s0000/segmentations/liver.nii.gz``): the spec's ``structures`` are
read (all the files the template matches when it gives none), and the label map holds
structure ``k`` of their sorted names as value ``k`` (1, 2...).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .base import Case, CaseError, DatasetError, LoadedCase
from .io import (
    build_cases,
    channel_names_for,
    is_junk,
    is_readable_file,
    label_values,
    load_case,
    split_ext,
)

_STRUCTURE = "\0structure\0"  # stands for {structure} while a template is split around it


def _structure_masks(
    template: str, fields: dict[str, str], root: Path, structures: tuple[str, ...] | None
) -> tuple[Path, list[tuple[str, Path]]]:
    """The mask folder and ``(structure, mask file)`` of one case; ``structures`` None: every
    file the template matches (junk excluded), named by what ``{structure}`` matched."""
    filled = os.path.normpath(template.format(**fields, structure=_STRUCTURE))
    head, tail = filled.split(_STRUCTURE)  # the spec checks {structure} appears once
    folder = (root / f"{head}x").parent
    if structures is not None:
        return folder, [(s, root / f"{head}{s}{tail}") for s in structures]
    found = []
    for path in root.glob(glob.escape(head) + "*" + glob.escape(tail)):
        rel = path.relative_to(root).as_posix()
        if not is_junk(path.name):
            found.append((rel[len(head) : len(rel) - len(tail)], path))
    return folder, found


def _fill(template: str, fields: dict[str, str], root: Path) -> Path:
    """``template`` filled from ``fields`` -> a path under ``root``; a ``*`` in the template is
    a glob, resolved to the single file it matches (left as is when none or several match)."""
    if "*" not in template:
        return root / os.path.normpath(template.format(**fields))
    pattern = os.path.normpath(template.format(**{k: glob.escape(v) for k, v in fields.items()}))
    hits = [p for p in root.glob(pattern) if not is_junk(p.name)]
    return hits[0] if len(hits) == 1 else root / pattern


class FolderReader:
    """Reader for paired files (``get_reader("folder")``, alias ``"folder2d"``)."""

    name = "folder"

    def cases(self, root: Path, spec: Any) -> list[Case]:
        """Cases under ``root`` following ``spec.layout``; raises DatasetError."""
        root, layout = Path(root), spec.layout
        if layout is None:
            raise DatasetError(f"{root}: spec {spec.name!r} has no folder layout")
        if not root.is_dir():
            raise DatasetError(f"{root}: dataset folder missing")
        per_structure = "{structure}" in layout.label
        structures = getattr(spec, "structures", None)
        labels = dict(spec.labels) if spec.labels is not None else {}
        if not labels and not per_structure:
            if not layout.binary:
                raise DatasetError(f"{root}: spec {spec.name!r} needs labels (or binary layout)")
            labels = {1: "foreground"}
        channel_names = channel_names_for(spec, ["unknown"] * len(layout.channels), root)
        entries = []
        for path in sorted(root.glob(layout.images)):
            rel = path.relative_to(root).as_posix()
            if not is_readable_file(path) or (layout.exclude and re.search(layout.exclude, rel)):
                continue
            m = re.search(layout.match, rel) if layout.match else None
            if layout.match and m is None:
                continue
            stem, ext = split_ext(path.name)
            fields = {
                "path": rel,
                "dir": path.parent.relative_to(root).as_posix(),
                "parent": path.parent.name,
                "stem": stem,
                "ext": ext,
            }
            fields |= {k: v for k, v in (m.groupdict() if m else {}).items() if v is not None}
            try:
                case_id = layout.case_id.format(**fields)
                images = tuple(_fill(t, fields, root) for t in layout.channels)
                if per_structure:  # (mask folder, [(structure, mask file)])
                    label = _structure_masks(layout.label, fields, root, structures)
                else:
                    label = (_fill(layout.label, fields, root),)
            except (KeyError, IndexError) as e:
                raise DatasetError(
                    f"{root}: spec {spec.name!r} template names unknown field {e}"
                ) from e
            entries.append((case_id, images, *label))
        return build_cases(spec, entries, channel_names, labels, root, root, binary=layout.binary)

    def load(self, case: Case) -> LoadedCase:
        """Image ``(C, H, W)`` / ``(C, X, Y, Z)`` float32 (RGB -> gray), label with known values."""
        loaded = load_case(case)
        allowed = np.array([0, *(v for v, _ in case.labels)])
        values = label_values(loaded.label)  # labels are >= 0 here
        unknown = values[~np.isin(values, allowed)]
        if unknown.size:
            raise CaseError(
                f"{case.label_path}: label values {unknown[:8].tolist()} not declared "
                f"(spec labels {dict(case.labels)}; set binary for 0/255 masks)"
            )
        return loaded
