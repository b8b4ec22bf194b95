"""nnU-Net v2 raw datasets: ``DatasetXXX_Name/{dataset.json, imagesTr/, labelsTr/}``.

One file per channel, ``imagesTr/CASE_0000<file_ending>``, ``CASE_0001...``, and the label
``labelsTr/CASE<file_ending>``. ``dataset.json`` gives ``channel_names`` ({"0": "CT"}),
``labels`` (name -> value, {"background": 0, "liver": 1}), ``numTraining`` and
``file_ending`` (".nii.gz", or 2D ".png" / ".tif"). An optional ``dataset`` key lists the
files of each case explicitly; those paths must stay inside the dataset folder.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from .base import Case, DatasetError, LoadedCase
from .io import (
    IMAGE_2D_EXTS,
    build_cases,
    channel_names_for,
    check_declared_values,
    is_junk,
    load_case,
    read_dataset_json,
    resolve_inside,
)

FILE_ENDINGS = (".nii.gz", ".nii", ".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")


def nnunet_labels(data: dict, json_path: Path) -> dict[int, str]:
    """``labels`` {name: value} -> {value: name}. Region labels (lists of values) are skipped
    with a warning naming them: each label map value can only be one binary task here."""
    labels, regions = {}, []
    raw = data.get("labels") or {}
    if not isinstance(raw, dict):
        raise DatasetError(f"{json_path}: labels must map names to values, got {raw!r:.80}")
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | list):
            raise DatasetError(f"{json_path}: label {name!r} has value {value!r}, expected an int")
        if isinstance(value, int) and value < 0:
            raise DatasetError(f"{json_path}: label {name!r} has value {value}, expected >= 0")
        if isinstance(value, list):
            regions.append(name)
        else:
            labels[value] = name
    if regions:
        warnings.warn(
            f"{json_path}: region labels {regions} (lists of values) skipped; "
            f"only single-value labels become tasks",
            stacklevel=3,
        )
    return labels


class NnUNetReader:
    """Reader for nnU-Net v2 raw folders (``get_reader("nnunet")``)."""

    name = "nnunet"

    def cases(self, root: Path, spec: Any) -> list[Case]:
        """Cases of ``root`` (the ``DatasetXXX_Name`` folder); raises DatasetError."""
        root = Path(root)
        data, json_path = read_dataset_json(root)
        ending = data.get("file_ending", ".nii.gz")
        if ending not in FILE_ENDINGS:
            raise DatasetError(f"{json_path}: file_ending {ending!r} not one of {FILE_ENDINGS}")
        try:
            found = [
                str(v) for _, v in sorted(data["channel_names"].items(), key=lambda kv: int(kv[0]))
            ]
        except (KeyError, AttributeError, ValueError) as e:
            raise DatasetError(f"{json_path}: needs channel_names like {{'0': 'CT'}} ({e})") from e
        n_files = len(found)
        if ending in IMAGE_2D_EXTS and [c.lower() for c in found][:3] == ["r", "g", "b"]:
            # nnU-Net stores an RGB image as one file; the readers turn it to gray
            found, n_files = ["RGB"], 1
        channel_names = channel_names_for(spec, found, json_path)
        labels = spec.labels if spec.labels is not None else nnunet_labels(data, json_path)
        if "dataset" in data:
            entries = self._listed(root, data["dataset"], json_path)
        else:
            entries = self._scanned(root, ending, n_files)
        return build_cases(spec, entries, channel_names, labels, json_path, root)

    def load(self, case: Case) -> LoadedCase:
        """Image ``(C, X, Y, Z)`` or ``(C, H, W)`` float32, integer label, affine (None in 2D).

        Raises CaseError for label values dataset.json does not declare."""
        loaded = load_case(case)
        check_declared_values(case, loaded.label)
        return loaded

    @staticmethod
    def _scanned(root: Path, ending: str, n_files: int):
        pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
        images = root / "imagesTr"
        if not images.is_dir():
            raise DatasetError(f"{images}: missing (expected the nnU-Net imagesTr folder)")
        ids = set()
        for path in images.iterdir():
            m = pattern.match(path.name)
            if m and not is_junk(path.name):
                ids.add(m.group("case"))
        for case_id in sorted(ids):
            files = tuple(images / f"{case_id}_{c:04d}{ending}" for c in range(n_files))
            yield case_id, files, root / "labelsTr" / f"{case_id}{ending}"

    @staticmethod
    def _listed(root: Path, listing: Any, json_path: Path):
        if not isinstance(listing, dict):
            raise DatasetError(f"{json_path}: 'dataset' must map case ids to their files")
        for case_id, entry in listing.items():
            try:
                images, label = entry["images"], entry["label"]
            except (TypeError, KeyError) as e:
                raise DatasetError(f"{json_path}: case {case_id!r} needs images and label") from e
            if not isinstance(images, list) or not images:
                raise DatasetError(
                    f"{json_path}: case {case_id!r}: images must be a list of paths, got {images!r:.80}"
                )
            files = tuple(resolve_inside(root, p, json_path) for p in images)
            yield case_id, files, resolve_inside(root, label, json_path)
