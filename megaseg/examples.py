"""Real example data that works offline: the MNI152 brain template shipped inside nilearn.

The nilearn wheel (``pip install nilearn``, part of megaseg's ``dev`` extra) carries the
MNI ICBM152 2009a nonlinear symmetric T1 template (Fonov et al., 2011) with its grey and white
matter probability maps, 1 mm, ``(197, 233, 189)``. It is one subject (an average brain), so
every task built from it is *within-subject*: support and query are different slices of the
same volume. Nothing here downloads anything.

    t1, labels, affine = mni152_volume()        # labels: 0 background, 1 GM, 2 WM
    images, masks = mni152_slices(t1, labels == 2, axis=2, indices=[60, 70, 80])
    root = write_mni152_nnunet("data/")         # the same volume as an nnU-Net raw folder
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MNI152_SHAPE = (197, 233, 189)
MNI152_LABELS = {"background": 0, "grey matter": 1, "white matter": 2}
MNI152_THRESHOLD = 0.5  # tissue probability at or above which a voxel gets the label
MNI152_CASE = "mni152"
MNI152_DATASET = "Dataset900_MNI152"
MNI152_REFERENCE = (
    "MNI ICBM152 2009a nonlinear symmetric template (Fonov et al., 2011), via nilearn"
)
_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def mni152_files() -> dict[str, Path]:
    """``{"t1", "gm", "wm"} -> path`` of the template files inside the installed nilearn.

    Raises:
        FileNotFoundError: nilearn is not installed (``pip install nilearn``), or its wheel
            lacks the files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the MNI152 example data comes with nilearn, which is not installed: "
            "pip install nilearn   (or: pip install -e '.[dev]')"
        )
    folder = Path(spec.origin).parent / "datasets" / "data"
    files = {k: folder / _FILE.format(k) for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"nilearn is installed but lacks the MNI152 template files {missing}; "
            "reinstall it: pip install --force-reinstall nilearn"
        )
    return files


def mni152_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template and its tissue labels: ``(t1, labels, affine)``.

    ``t1 (X, Y, Z)`` float32 (the stored 0-255 intensities, background 0); ``labels (X, Y, Z)``
    uint8: 1 where the grey matter probability is >= 0.5, 2 where white matter is (white wins
    a tie), 0 elsewhere; ``affine (4, 4)`` voxel -> RAS mm. ``(X, Y, Z) = (197, 233, 189)``, 1 mm,
    axis 2 is axial (inferior -> superior), axis 1 coronal, axis 0 sagittal.
    """
    import nibabel as nib

    files = mni152_files()
    t1_img = nib.load(str(files["t1"]))
    t1 = t1_img.get_fdata(dtype=np.float32)
    labels = np.zeros(t1.shape, np.uint8)
    for value, key in ((1, "gm"), (2, "wm")):
        prob = nib.load(str(files[key])).get_fdata(dtype=np.float32)
        if prob.max() > 1.0:  # stored as uint8 0-255
            prob = prob / 255.0
        labels[prob >= MNI152_THRESHOLD] = value
    return t1, labels, np.asarray(t1_img.affine)


def mni152_slices(
    volume: np.ndarray, labels: np.ndarray, axis: int, indices: Sequence[int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """2D slices ``(H, W)`` of ``volume`` and ``labels`` at ``indices`` along ``axis``, in the
    volume's own orientation (the one ``Segmenter.predict_volume`` slices in). To display one
    head up, show ``np.rot90(slice)``."""
    images = [np.take(volume, i, axis=axis) for i in indices]
    masks = [np.take(labels, i, axis=axis) for i in indices]
    return images, masks


def brain_extent(labels: np.ndarray, axis: int, min_fraction: float = 0.25) -> tuple[int, int]:
    """``[lo, hi)``: the slices along ``axis`` whose labelled area is at least ``min_fraction``
    of the largest slice's, i.e. where the brain is large enough to make a useful example."""
    other = tuple(a for a in range(labels.ndim) if a != axis % labels.ndim)
    area = (labels > 0).sum(axis=other)
    keep = np.flatnonzero(area >= min_fraction * area.max())
    return int(keep[0]), int(keep[-1]) + 1


def write_mni152_nnunet(root: str | os.PathLike | None = None) -> Path:
    """The template as a one-subject nnU-Net v2 raw dataset under ``root`` (default
    ``megaseg_work/mni``, see :func:`megaseg.paths.work_dir`):
    ``Dataset900_MNI152/{dataset.json, imagesTr/mni152_0000.nii.gz, labelsTr/mni152.nii.gz}``
    (the T1 file copied byte for byte, the labels of :func:`mni152_volume`). Returns the
    dataset folder, readable by ``megaseg.evaluation.folder_source`` and ``megaseg prep``."""
    import nibabel as nib

    if root is None:
        from megaseg.paths import work_dir

        root = work_dir("mni")
    folder = Path(root) / MNI152_DATASET
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    shutil.copy(mni152_files()["t1"], folder / "imagesTr" / f"{MNI152_CASE}_0000.nii.gz")
    _, labels, affine = mni152_volume()
    nib.save(nib.Nifti1Image(labels, affine), str(folder / "labelsTr" / f"{MNI152_CASE}.nii.gz"))
    meta = {
        "channel_names": {"0": "T1"},
        "labels": MNI152_LABELS,
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "reference": MNI152_REFERENCE,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


__all__ = [
    "MNI152_LABELS",
    "MNI152_SHAPE",
    "brain_extent",
    "mni152_files",
    "mni152_slices",
    "mni152_volume",
    "write_mni152_nnunet",
]
