"""Folders of paired image and label files, 2D (png, jpg, tif, bmp, gif, ppm) or NIfTI.

The spec's :class:`~data_prep.specs.base.FolderLayout` says where the images are and how each
label file is named from its image: ``images/x.png`` + ``masks/x.png``, ``x.jpg`` +
``x_mask.png``, DRIVE's ``21_training.tif`` + ``21_manual1.gif``, ACDC's
``patient001_frame01.nii.gz`` + ``..._gt.nii.gz``, BraTS's four channel files + ``_seg``.
Label values must be 0 or one of the spec's labels (after the binary mapping, if any).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    Case,
    CaseError,
    DatasetError,
    LoadedCase,
    build_cases,
    channel_names_for,
    is_junk,
    is_readable_file,
    load_case,
    split_ext,
)


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
        labels = dict(spec.labels) if spec.labels is not None else {}
        if not labels:
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
                label = _fill(layout.label, fields, root)
            except (KeyError, IndexError) as e:
                raise DatasetError(
                    f"{root}: spec {spec.name!r} template names unknown field {e}"
                ) from e
            entries.append((case_id, images, label))
        return build_cases(spec, entries, channel_names, labels, root, binary=layout.binary)

    def load(self, case: Case) -> LoadedCase:
        """Image ``(C, H, W)`` / ``(C, X, Y, Z)`` float32 (RGB -> gray), label with known values."""
        loaded = load_case(case)
        allowed = np.array([0, *(v for v, _ in case.labels)])
        values = np.flatnonzero(np.bincount(loaded.label.ravel()))  # labels are >= 0 here
        unknown = values[~np.isin(values, allowed)]
        if unknown.size:
            raise CaseError(
                f"{case.label_path}: label values {unknown[:8].tolist()} not declared "
                f"(spec labels {dict(case.labels)}; set binary for 0/255 masks)"
            )
        return loaded
