"""Medical Segmentation Decathlon: ``TaskNN_Name/{dataset.json, imagesTr/, labelsTr/}``.

``dataset.json`` gives ``modality`` ({"0": "FLAIR", "1": "T1w"}), ``labels`` (value -> name,
{"0": "background", "1": "edema"}, the reverse of nnU-Net) and ``training``, a list of
``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}`` whose paths must stay
inside the task folder. A multi-channel image is one 4-D file, channels last. The real
download holds macOS ``._x.nii.gz`` junk files, which are skipped. The same layout and keys
are used by other datasets (AMOS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Case, DatasetError, LoadedCase
from .io import (
    build_cases,
    channel_names_for,
    check_declared_values,
    is_junk,
    load_case,
    read_dataset_json,
    resolve_inside,
    split_ext,
)


def msd_labels(data: dict, json_path: Path) -> dict[int, str]:
    """``labels`` {"1": "liver"} -> {1: "liver"}."""
    raw = data.get("labels") or {}
    if not isinstance(raw, dict):
        raise DatasetError(f"{json_path}: labels must map values to names, got {raw!r:.80}")
    try:
        labels = {int(k): str(v) for k, v in raw.items()}
    except ValueError as e:
        raise DatasetError(f"{json_path}: labels keys must be integers ({e})") from e
    if any(v < 0 for v in labels):
        raise DatasetError(f"{json_path}: label values must be >= 0, got {sorted(labels)}")
    return labels


class MSDReader:
    """Reader for Decathlon-style task folders (``get_reader("msd")``)."""

    name = "msd"

    def cases(self, root: Path, spec: Any) -> list[Case]:
        """Cases of ``root`` (the ``TaskNN_Name`` folder); raises DatasetError."""
        root = Path(root)
        data, json_path = read_dataset_json(root)
        modality = data.get("modality") or {}
        try:
            found = [str(v) for _, v in sorted(modality.items(), key=lambda kv: int(kv[0]))]
        except (AttributeError, ValueError) as e:
            raise DatasetError(f"{json_path}: modality must map '0', '1'... to names") from e
        channel_names = channel_names_for(spec, found, json_path)
        labels = spec.labels if spec.labels is not None else msd_labels(data, json_path)
        training = data.get("training")
        if training is None:
            entries = self._scanned(root)
        else:
            entries = self._listed(root, training, json_path)
        return build_cases(spec, entries, channel_names, labels, json_path, root)

    def load(self, case: Case) -> LoadedCase:
        """Image ``(C, X, Y, Z)`` float32 (4-D files moved to channel-first), label, affine.

        Raises CaseError for label values dataset.json does not declare."""
        loaded = load_case(case)
        check_declared_values(case, loaded.label)
        return loaded

    @staticmethod
    def _listed(root: Path, training: Any, json_path: Path):
        if not isinstance(training, list):
            raise DatasetError(f"{json_path}: 'training' must be a list of image/label pairs")
        for entry in training:
            try:
                image, label = entry["image"], entry["label"]
            except (TypeError, KeyError) as e:
                raise DatasetError(
                    f"{json_path}: training entry {entry!r} needs image and label"
                ) from e
            image_path = resolve_inside(root, image, json_path)
            label_path = resolve_inside(root, label, json_path)
            if is_junk(Path(image).name):
                continue
            yield split_ext(Path(image).name)[0], (image_path,), label_path

    @staticmethod
    def _scanned(root: Path):
        images = root / "imagesTr"
        if not images.is_dir():
            raise DatasetError(f"{images}: missing (expected the Decathlon imagesTr folder)")
        for path in images.glob("*.nii*"):
            if not is_junk(path.name):
                yield split_ext(path.name)[0], (path,), root / "labelsTr" / path.name
