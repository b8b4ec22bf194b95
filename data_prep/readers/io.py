"""File listing and reading shared by the readers: names, dataset.json, cases, checked arrays.

``build_cases`` turns a reader's ``(case_id, image_paths, label_path)`` entries into
:class:`~data_prep.readers.base.Case` objects; ``load_case`` reads, checks and stacks the
files of one case into a :class:`~data_prep.readers.base.LoadedCase`. Every problem is raised
as :class:`CaseError` or :class:`DatasetError` naming the file and the reason.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import Case, CaseError, DatasetError, LoadedCase

# --------------------------------------------------------------------------- listing helpers

NIFTI_EXTS = (".nii.gz", ".nii")
IMAGE_2D_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm")


def split_ext(name: str) -> tuple[str, str]:
    """``"a.nii.gz" -> ("a", ".nii.gz")``, ``"b.PNG" -> ("b", ".PNG")``; double suffix only for NIfTI."""
    if name.lower().endswith(".nii.gz"):
        return name[:-7], name[-7:]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def is_readable_file(path: Path) -> bool:
    """A NIfTI or 2D image file that is not junk (see :func:`is_junk`)."""
    ext = split_ext(path.name)[1].lower()
    return path.is_file() and not is_junk(path.name) and ext in NIFTI_EXTS + IMAGE_2D_EXTS


def is_junk(name: str) -> bool:
    """macOS resource forks (``._x.nii.gz``), hidden files and ``_x`` leftovers are never cases."""
    return name.startswith((".", "_"))


def read_dataset_json(root: Path) -> tuple[dict, Path]:
    """``root/dataset.json`` parsed, and its path. Raises DatasetError when missing or invalid."""
    path = Path(root) / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read dataset.json ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data, path


def resolve_inside(root: Path, rel: str, json_path: Path) -> Path:
    """``root/rel`` with ``..`` and symlinks resolved; refused unless it stays inside ``root``."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise DatasetError(f"{json_path}: expected a relative path, got {rel!r:.80}")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise DatasetError(
            f"{json_path}: path {rel!r} resolves to {path}, outside the dataset folder {base}"
        )
    return path


def check_inside(root: Path, path: Path) -> Path:
    """``path`` (found by scanning ``root``) unchanged; DatasetError naming it when it, or a
    link on the way to it, leads outside ``root`` (as :func:`resolve_inside` does for listed
    paths)."""
    base = Path(root).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(base):
        raise DatasetError(
            f"{path}: resolves to {target}, outside the dataset folder {base} (a symbolic "
            "link); copy the file into the dataset or list the dataset from where it lives"
        )
    return path


def channel_names_for(spec: Any, found: list[str], where: Path) -> tuple[str, ...]:
    """The spec's modality (a name for every channel, or one per channel) or the ``found`` names."""
    modality = getattr(spec, "modality", None)
    if modality is None:
        return tuple(found)
    if isinstance(modality, str):
        return (modality,) * max(1, len(found))
    if found and len(modality) != len(found):
        raise DatasetError(
            f"{where}: spec gives {len(modality)} modalities for {len(found)} channels"
        )
    return tuple(modality)


def build_cases(
    spec: Any,
    entries: Iterable[tuple],
    channel_names: tuple[str, ...],
    labels: Mapping[int, str] | Iterable[tuple[int, str]],
    where: Path,
    root: Path,
    binary: bool = False,
) -> list[Case]:
    """``(case_id, image_paths, label_path)`` entries -> cases, sorted by id.

    ``labels``: value -> name, as a mapping or ``(value, name)`` pairs; 0 is left out.
    An entry ``(case_id, image_paths, mask_folder, masks)`` with ``masks`` a sequence of
    ``(structure, mask_path)`` is a case with one mask file per structure: its labels are the
    structures, valued 1, 2... in sorted name order (``labels`` is not used for it).

    Applies the spec's ``case_regex`` (full match on the id; others are left out), its
    ``subject_regex`` (named group ``subject`` searched in the id; default: the id) and group.
    Raises DatasetError for a duplicate id, an id the subject regex does not match, or an
    image or label path (or mask folder) that leads outside the dataset folder ``root``
    (:func:`check_inside`: a scanned symbolic link).
    """
    case_regex = getattr(spec, "case_regex", None)
    subject_regex = getattr(spec, "subject_regex", None)
    fg = tuple(sorted((int(k), str(v)) for k, v in dict(labels).items() if int(k) != 0))
    cases: dict[str, Case] = {}
    for case_id, images, label, *masks in entries:
        for path in (*images, label):
            check_inside(root, path)
        if case_regex and not re.fullmatch(case_regex, case_id):
            continue
        if case_id in cases:
            raise DatasetError(
                f"{where}: case id {case_id!r} found twice ({cases[case_id].label_path}, {label})"
            )
        subject = case_id
        if subject_regex:
            m = re.search(subject_regex, case_id)
            if m is None or m.groupdict().get("subject") is None:
                raise DatasetError(
                    f"{where}: subject_regex '{subject_regex}' does not match case id '{case_id}'"
                )
            subject = m.group("subject")
        structures = sorted(masks[0]) if masks else []
        cases[case_id] = Case(
            dataset=spec.name,
            case_id=case_id,
            subject=subject,
            image_paths=tuple(images),
            label_path=label,
            group=getattr(spec, "group", "all") or "all",
            channel_names=channel_names,
            labels=tuple((v, n) for v, (n, _) in enumerate(structures, 1)) if masks else fg,
            binary=binary,
            mask_paths=tuple(Path(path) for _, path in structures),
        )
    return [cases[k] for k in sorted(cases)]


# --------------------------------------------------------------------------- loading

AFFINE_TOLERANCE_MM = 1e-3
# A file may declare at most this many voxels (per channel-less volume: X*Y*Z*C); the
# environment variable (set by ``prep build --max-voxels``) overrides it. 2**29 voxels is a
# 2 GiB float32 volume, above whole-body CT at 512 x 512 x 1500.
DEFAULT_MAX_VOXELS = 1 << 29
# Distinct values a label map may hold when no labels are declared (each becomes a task).
DEFAULT_MAX_LABELS = 100
# Deflate cannot compress by more than 1032:1, so a .nii.gz of n bytes holds < 1032 n bytes.
MAX_GZIP_RATIO = 1032
# The variables max_voxels() and max_labels() read; a build hands them on to its workers.
LIMIT_VARIABLES = ("MEGASEG_MAX_VOXELS", "MEGASEG_MAX_LABELS")


def set_limits(values: Mapping[str, str | None]) -> None:
    """Set limit variables in ``os.environ`` (in a worker, or to restore them); None unsets
    one (its default then applies)."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _limit(variable: str, default: int) -> int:
    text = os.environ.get(variable, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise ValueError(f"{variable}={text!r}: expected a whole number") from None


def max_voxels() -> int:
    """Largest voxel count a file may declare: ``$MEGASEG_MAX_VOXELS`` or 2**29."""
    return _limit("MEGASEG_MAX_VOXELS", DEFAULT_MAX_VOXELS)


def max_labels() -> int:
    """Most distinct undeclared label values a case may hold: ``$MEGASEG_MAX_LABELS`` or 100."""
    return _limit("MEGASEG_MAX_LABELS", DEFAULT_MAX_LABELS)


def label_values(label: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a non-negative integer label map, in bounded memory.

    ``np.bincount`` (fast) when the largest value is small; ``np.unique`` otherwise, since a
    bincount of one stray voxel valued 2**40 would ask for terabytes.
    """
    label = np.asarray(label)
    if label.dtype == bool:
        label = label.view(np.uint8)
    if not label.size:
        return np.zeros(0, np.int64)
    if int(label.max()) < 1 << 16 and int(label.min()) >= 0:
        return np.flatnonzero(np.bincount(label.ravel()))
    return np.unique(label)


def check_declared_values(case: Case, label: np.ndarray) -> None:
    """Raise CaseError naming the label file when it holds values the dataset does not declare
    (when it declares any): an undeclared structure would silently be dropped."""
    if not case.labels:
        return
    allowed = np.array([0, *(v for v, _ in case.labels)])
    values = label_values(label)
    unknown = values[~np.isin(values, allowed)]
    if unknown.size:
        raise CaseError(
            f"{case.label_path}: {unknown.size} label value(s) not declared, e.g. "
            f"{unknown[:8].tolist()} (declared {dict(case.labels)}; a spec's or dataset.json's "
            "labels must list every value; set binary for 0/255 masks)"
        )


def check_declared_size(path: Path, header) -> None:
    """Refuse a NIfTI whose header declares more data than the file can hold or than the
    voxel limit, before any array is allocated (a 68-byte file can declare 1024**3 voxels)."""
    shape = tuple(int(n) for n in header.get_data_shape())
    voxels = int(np.prod(shape, dtype=object)) if shape else 0
    nbytes = voxels * header.get_data_dtype().itemsize
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        if nbytes > MAX_GZIP_RATIO * size:
            raise CaseError(
                f"{path}: header declares shape {shape} ({nbytes} bytes), more than a "
                f"{size}-byte gzip file can hold (at most {MAX_GZIP_RATIO}:1); damaged header"
            )
    elif nbytes > size - int(header.get_data_offset()):
        raise CaseError(
            f"{path}: header declares shape {shape} ({nbytes} bytes of data), the file holds "
            f"{size} bytes; truncated file or damaged header"
        )
    if voxels > max_voxels():
        raise CaseError(
            f"{path}: header declares shape {shape} = {voxels} voxels, over the limit of "
            f"{max_voxels()} (raise it with --max-voxels or MEGASEG_MAX_VOXELS)"
        )


def read_file(
    path: Path, is_label: bool = False, binary: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """One file -> ``(array, affine)``; the affine is None for 2D formats.

    NIfTI: the stored array ``(X, Y, Z)`` or ``(X, Y, Z, C)`` (scaling applied) and its 4x4
    affine. 2D: ``(H, W)``; an RGB(A) image becomes grayscale, an RGB mask must be gray-valued
    unless ``binary``. Raises CaseError naming the file when it is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: {'label' if is_label else 'image'} file missing")
    ext = split_ext(path.name)[1].lower()
    try:
        if ext in NIFTI_EXTS:
            return _read_nifti(path, is_label)
        if ext in IMAGE_2D_EXTS:
            return _read_2d(path, is_label, binary), None
    except CaseError:
        raise
    except Exception as e:  # nibabel, gzip, zlib and PIL raise many types for a damaged file
        raise CaseError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    raise CaseError(f"{path}: unsupported file type {ext!r}")


def _read_nifti(path: Path, is_label: bool) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    check_declared_size(path, img.header)
    data = np.asanyarray(img.dataobj) if is_label else img.get_fdata(dtype=np.float32)
    return data, np.asarray(img.affine, dtype=np.float64)


def _read_2d(path: Path, is_label: bool, binary: bool) -> np.ndarray:
    from PIL import Image

    from megaseg.preprocess import to_grayscale

    with Image.open(path) as img:
        if img.width * img.height > max_voxels():
            raise CaseError(
                f"{path}: image of {img.width} x {img.height} pixels, over the limit of "
                f"{max_voxels()} (raise it with --max-voxels or MEGASEG_MAX_VOXELS)"
            )
        if getattr(img, "n_frames", 1) > 1:
            raise CaseError(f"{path}: multi-frame image ({img.n_frames} frames) is not a 2D image")
        if img.mode == "P":
            # a grey palette stores intensities (DRIVE's GIFs); in a mask, a coloured one stores
            # class indices, which are kept as they are
            pal = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
            grey = bool(pal.size) and bool((pal == pal[:, :1]).all())
            if grey or not is_label:
                img = img.convert("L" if grey else "RGB")
        elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        x = np.asarray(img)
    if x.ndim == 3 and x.shape[-1] in (2, 4):  # drop alpha
        x = x[..., :-1]
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if not is_label:
        return to_grayscale(x).astype(np.float32)
    if x.ndim == 3:
        if binary:
            return (x != 0).any(axis=-1).astype(np.uint8)
        if not ((x == x[..., :1]).all()):
            raise CaseError(
                f"{path}: colour mask; declare the dataset binary or convert colours to values"
            )
        x = x[..., 0]
    return x


def label_to_int(label: np.ndarray, path: Path, binary: bool) -> np.ndarray:
    """Check a label map is non-negative whole numbers; ``binary`` maps nonzero to 1."""
    if label.ndim == 4 and label.shape[-1] == 1:
        label = label[..., 0]
    if not np.issubdtype(label.dtype, np.integer) and not np.issubdtype(label.dtype, np.bool_):
        if not np.isfinite(label).all():
            raise CaseError(f"{path}: label holds NaN or inf values")
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            bad = label[rounded != label][:3]
            raise CaseError(f"{path}: label holds non-integer values, e.g. {bad.tolist()}")
        label = rounded.astype(np.int32)
    if binary:
        return (label != 0).astype(np.uint8)
    if label.size and label.min() < 0:
        raise CaseError(f"{path}: label holds negative values (min {label.min()})")
    return label


def read_structure_masks(case: Case) -> tuple[np.ndarray, np.ndarray | None]:
    """A case's mask files, one per structure -> ``(label map, affine)``.

    Structure ``case.labels[i]`` is painted with its value where its mask
    (``case.mask_paths[i]``) is nonzero. Raises CaseError naming the file for a missing or
    unreadable mask, a shape or geometry that differs from the first mask, or voxels claimed
    by two structures (the label map could keep only one of them).
    """
    if not case.mask_paths:
        raise CaseError(f"{case.label_path}: no structure mask files")
    label, affine, first = None, None, case.mask_paths[0]
    owner: dict[int, str] = {}
    for (value, name), path in zip(case.labels, case.mask_paths, strict=True):
        mask, mask_affine = read_file(path, is_label=True, binary=True)
        mask = label_to_int(mask, path, binary=True)
        if label is None:
            label = np.zeros(mask.shape, np.min_scalar_type(len(case.labels)))
            affine = mask_affine
        elif mask.shape != label.shape:
            raise CaseError(f"{path}: mask shape {mask.shape} differs from {first} {label.shape}")
        elif affine is not None and mask_affine is not None:
            diff = float(np.abs(mask_affine - affine).max())
            if diff > AFFINE_TOLERANCE_MM:
                raise CaseError(f"{path}: geometry differs from {first} by {diff:.3g} mm")
        index = np.flatnonzero(mask)  # structures are small: work on their voxels only
        taken = label.ravel()[index]
        if taken.any():
            other = owner[int(taken[taken != 0][0])]
            raise CaseError(
                f"{path}: {int(np.count_nonzero(taken))} voxels of {name!r} also belong to "
                f"{other!r}; structure masks must not overlap"
            )
        label.ravel()[index] = value
        owner[value] = name
    return label, affine


def load_case(case: Case) -> LoadedCase:
    """Read, check and stack one case: image ``(C, *S)`` float32, label ``S`` integer, affine.

    A 4-D NIfTI file holds channels last (``(X, Y, Z, C)``, the NIfTI and Decathlon
    convention) and contributes C channels. Raises CaseError (file and reason) for a missing
    or unreadable file, NaN/inf intensities, a non-integer label, a shape mismatch or an
    affine mismatch above :data:`AFFINE_TOLERANCE_MM` between any file and the label.
    The label map of a case with one mask file per structure is :func:`read_structure_masks`.
    """
    if case.mask_paths or case.label_path.is_dir():
        label, label_affine = read_structure_masks(case)
    else:
        label, label_affine = read_file(case.label_path, is_label=True, binary=case.binary)
        label = label_to_int(label, case.label_path, case.binary)
    if label_affine is not None and label.ndim != 3:
        # a (X, Y) NIfTI would silently become a "2d" task of a volume dataset
        raise CaseError(
            f"{case.label_path}: label is a {label.ndim}-D NIfTI of shape {label.shape}; NIfTI "
            "files are read as volumes (X, Y, Z): save a 2D slice as (X, Y, 1) or as PNG"
        )
    channels = []
    for path in case.image_paths:
        data, affine = read_file(path)
        if data.ndim == label.ndim:
            data = data[None]
        elif data.ndim == label.ndim + 1:
            if len(case.channel_names) == len(case.image_paths):
                # one declared channel per file: a 4-D file here would silently add channels
                # (and tasks) the dataset does not declare
                raise CaseError(
                    f"{path}: {data.ndim}-D image of shape {data.shape}, but the dataset "
                    f"declares one channel per file ({', '.join(case.channel_names)})"
                )
            data = np.moveaxis(data, -1, 0)
        if data.shape[1:] != label.shape or data.ndim != label.ndim + 1:
            raise CaseError(
                f"{case.label_path}: label shape {label.shape} does not match image {path} "
                f"(channel-first shape {data.shape})"
            )
        if not np.isfinite(data).all():
            raise CaseError(f"{path}: image holds NaN or inf intensities")
        if (affine is None) != (label_affine is None):
            raise CaseError(
                f"{case.label_path}: one of image {path} and label is 2D, the other NIfTI"
            )
        if affine is not None:
            diff = float(np.abs(affine - label_affine).max())
            if diff > AFFINE_TOLERANCE_MM:
                raise CaseError(
                    f"{case.label_path}: geometry differs from image {path} by {diff:.3g} mm "
                    f"(tolerance {AFFINE_TOLERANCE_MM} mm)"
                )
        channels.append(data.astype(np.float32, copy=False))
    if not channels:
        raise CaseError(f"{case.label_path}: case {case.case_id!r} has no image file")
    image = channels[0] if len(channels) == 1 else np.concatenate(channels, axis=0)
    return LoadedCase(image, label, label_affine, _names(case, image.shape[0]))


def _names(case: Case, n: int) -> list[str]:
    """One name per channel: the case's names, one name repeated, or ``channel{i}``."""
    names = list(case.channel_names)
    if not names:
        return [f"channel{i}" for i in range(n)]
    if len(names) != n:
        raise CaseError(
            f"{case.image_paths[0]}: image has {n} channels, the dataset declares {len(names)} "
            f"({', '.join(names)})"
        )
    return names
