"""A spec for a user's own folder: nnU-Net v2 raw, Decathlon-style, or a 2D image/mask folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from data_prep.readers.base import DatasetError
from data_prep.readers.io import IMAGE_2D_EXTS, read_dataset_json, split_ext

from .base import DatasetSpec, FolderLayout

IMAGE_DIRS = ("images", "image", "imgs", "img")
MASK_DIRS = ("masks", "mask", "labels", "label", "gt", "annotations")
MASK_SUFFIXES = ("_mask", "_segmentation", "_seg", "_label", "_gt")


def spec_from_path(path: str | Path, name: str | None = None, **overrides) -> DatasetSpec:
    """Detect the layout of ``path`` and return a spec for it (``overrides`` replace fields).

    ``dataset.json`` with ``channel_names`` / ``file_ending`` -> nnU-Net v2; with ``modality``
    / ``training`` -> Decathlon. Otherwise a 2D folder: ``images/`` + ``masks/`` (or
    ``labels/``, ``gt/``...) with the same stems, or masks beside the images named
    ``<stem>_mask`` (``_seg``, ``_segmentation``...). 2D masks are read as binary (any nonzero
    pixel is the one label, "foreground") unless ``labels`` and a ``layout`` are overridden.
    Raises DatasetError when no layout is recognised.
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    base = dict(name=name or root.name, root=str(root), notes="ad-hoc spec from spec_from_path")
    if (root / "dataset.json").is_file():
        data, json_path = read_dataset_json(root)
        if "channel_names" in data or "file_ending" in data:
            spec = DatasetSpec(reader="nnunet", **base)
        elif "modality" in data or "training" in data:
            spec = DatasetSpec(reader="msd", **base)
        else:
            raise DatasetError(
                f"{json_path}: neither nnU-Net (channel_names) nor Decathlon (modality)"
            )
    else:
        spec = DatasetSpec(
            reader="folder2d", labels={1: "foreground"}, layout=_layout_2d(root), **base
        )
    return dataclasses.replace(spec, **overrides) if overrides else spec


def _layout_2d(root: Path) -> FolderLayout:
    subdirs = {p.name.lower(): p.name for p in root.iterdir() if p.is_dir()}
    images = next((subdirs[d] for d in IMAGE_DIRS if d in subdirs), None)
    masks = next((subdirs[d] for d in MASK_DIRS if d in subdirs), None)
    if images and masks:
        return FolderLayout(images=f"{images}/*", label=f"{masks}/{{stem}}.*", binary=True)
    stems = {
        split_ext(p.name)[0]
        for p in root.rglob("*")
        if split_ext(p.name)[1].lower() in IMAGE_2D_EXTS
    }
    for suffix in MASK_SUFFIXES:
        if any(s.endswith(suffix) and s[: -len(suffix)] in stems for s in stems):
            return FolderLayout(
                images="**/*",
                exclude=rf"{suffix}\.[^/]+$",
                label=f"{{dir}}/{{stem}}{suffix}.*",
                binary=True,
            )
    raise DatasetError(
        f"{root}: no dataset.json, no images/ + masks/ folders and no <stem>_mask files; "
        "describe the layout with a DatasetSpec and a FolderLayout"
    )
