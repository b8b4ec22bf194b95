"""Writers of tiny datasets in the exact on-disk layouts that data_prep reads.

Each ``write_*`` function writes into a folder it is given (a pytest ``tmp_path``) and returns
the path a reader or a spec needs; none downloads anything. Import them from tests with
``from fixtures_data import write_nnunet`` (pytest puts ``tests/`` on ``sys.path``).

Stable API (other test files depend on it):

- ``write_nnunet(tmp, ...) -> Path``: ``DatasetXXX_Name`` nnU-Net v2 raw folder (3D or 2D png).
- ``write_msd(tmp, ...) -> Path``: ``TaskNN_Name`` Decathlon folder, 4-D channels-last images,
  macOS ``._`` junk files.
- ``write_msd_escaping(tmp) -> Path``: a Decathlon folder whose dataset.json points outside it.
- ``break_case(dataset, how, case_id=None) -> Path``: damage one case of a ``write_nnunet``
  dataset in place (``how`` in :data:`BREAKS`); returns the damaged file.
- ``write_folder2d(tmp, ...) -> Path``: 2D RGB png images with 0/255 masks.
- ``write_acdc / write_brats / write_drive / write_isic / write_wbc(tmp) -> Path``: the data
  directory holding a 2-case copy of that public dataset's layout (use ``spec.locate``).
- ``write_totalsegmentator(tmp, ...) -> Path``: TotalSegmentator's ``sNNNN/ct.nii.gz`` +
  ``sNNNN/segmentations/<structure>.nii.gz`` (one binary mask per structure) + ``meta.csv``.
- ``write_mni_nnunet(tmp) -> Path``: the real MNI152 template from the nilearn wheel as a
  one-subject nnU-Net dataset, labels 0 background, 1 grey matter, 2 white matter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

SHAPE_3D = (16, 16, 16)
SPACING = (0.8, 0.8, 2.5)  # mm; anisotropic like a clinical scan
# LPS-stored scan (x and y flipped) with a realistic origin, in RAS mm
AFFINE = np.array(
    [
        [-SPACING[0], 0.0, 0.0, 110.0],
        [0.0, -SPACING[1], 0.0, 130.0],
        [0.0, 0.0, SPACING[2], -60.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
BREAKS = ("corrupt", "shape", "affine", "nan", "missing_label", "float_label")
MNI_SHAPE = (197, 233, 189)
MNI_CASE = "mni152"


# --------------------------------------------------------------------------- primitives


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Save ``data`` (its dtype kept) with ``affine`` as NIfTI-1; parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def write_image(path: Path, data: np.ndarray) -> Path:
    """Save a ``(H, W)`` or ``(H, W, 3)`` uint8 array with PIL (format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(data, dtype=np.uint8)).save(path)
    return path


def blob_label(shape: tuple[int, ...], seed: int, n_labels: int = 2) -> np.ndarray:
    """A uint8 label map: a ball of label 1 with a smaller ball of label ``n_labels`` inside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    centre = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, len(shape))
    r = np.linalg.norm(grid - centre, axis=-1)
    label = np.zeros(shape, np.uint8)
    label[r < min(shape) / 3] = 1
    if n_labels > 1:
        label[r < min(shape) / 6] = n_labels
    return label


def blob_image(label: np.ndarray, seed: int, scale: float = 100.0) -> np.ndarray:
    """A float32 image whose intensity follows ``label`` plus noise."""
    rng = np.random.default_rng(seed)
    return (scale * label + rng.normal(0, scale / 10, label.shape)).astype(np.float32)


# --------------------------------------------------------------------------- nnU-Net v2


def write_nnunet(
    tmp: Path,
    name: str = "Dataset001_Tiny",
    n_cases: int = 3,
    channels: tuple[str, ...] = ("T1", "T2"),
    file_ending: str = ".nii.gz",
    labels: dict | None = None,
) -> Path:
    """An nnU-Net v2 raw folder: ``imagesTr/case_XXX_000C<ending>``, ``labelsTr/case_XXX<ending>``.

    3D: ``SHAPE_3D`` volumes with :data:`AFFINE`; ``.png``: ``(20, 24)`` uint8 images.
    Labels {"background": 0, "liver": 1, "tumour": 2} unless given. Case ids ``case_000``...
    """
    root = Path(tmp) / name
    labels = labels or {"background": 0, "liver": 1, "tumour": 2}
    is_2d = file_ending != ".nii.gz"
    for i in range(n_cases):
        case = f"case_{i:03d}"
        label = blob_label((20, 24) if is_2d else SHAPE_3D, seed=i)
        for c in range(len(channels)):
            image = blob_image(label, seed=100 * i + c, scale=50.0 * (c + 1))
            path = root / "imagesTr" / f"{case}_{c:04d}{file_ending}"
            if is_2d:
                write_image(path, np.clip(image, 0, 255))
            else:
                write_nifti(path, image)
        path = root / "labelsTr" / f"{case}{file_ending}"
        write_image(path, label) if is_2d else write_nifti(path, label)
    meta = {
        "channel_names": {str(c): m for c, m in enumerate(channels)},
        "labels": labels,
        "numTraining": n_cases,
        "file_ending": file_ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def break_case(dataset: Path, how: str, case_id: str = "case_001") -> Path:
    """Damage one case of a :func:`write_nnunet` 3D dataset; returns the damaged file.

    corrupt: truncated gzip image; shape: label one voxel shorter; affine: label shifted by
    1 mm; nan: NaN voxel in the image; missing_label: label deleted; float_label: label 0.5.
    """
    image = Path(dataset) / "imagesTr" / f"{case_id}_0000.nii.gz"
    label = Path(dataset) / "labelsTr" / f"{case_id}.nii.gz"
    data = np.asanyarray(nib.load(str(label)).dataobj)
    if how == "corrupt":
        image.write_bytes(image.read_bytes()[:60])
        return image
    if how == "shape":
        return write_nifti(label, data[:-1])
    if how == "affine":
        shifted = AFFINE.copy()
        shifted[0, 3] += 1.0
        return write_nifti(label, data, shifted)
    if how == "nan":
        values = nib.load(str(image)).get_fdata(dtype=np.float32)
        values[3, 4, 5] = np.nan
        return write_nifti(image, values)
    if how == "missing_label":
        label.unlink()
        return label
    if how == "float_label":
        return write_nifti(label, data.astype(np.float32) * 0.5)
    raise ValueError(f"unknown break {how!r}; one of {BREAKS}")


# --------------------------------------------------------------------------- Decathlon


def write_msd(
    tmp: Path,
    name: str = "Task99_Tiny",
    n_cases: int = 3,
    modalities: tuple[str, ...] = ("FLAIR", "T1w"),
    training_list: bool = True,
) -> Path:
    """A Decathlon task folder: 4-D ``(12, 14, 10, C)`` images (channels last), 3D labels,
    labels {"0": "background", "1": "edema", "2": "tumour"}, and macOS junk files
    ``imagesTr/._tiny_000.nii.gz`` / ``labelsTr/._tiny_000.nii.gz`` as in the real download.
    Channel ``c`` of case ``i`` equals ``blob_image(label, 100 * i + c)``."""
    root = Path(tmp) / name
    shape = (12, 14, 10)
    training = []
    for i in range(n_cases):
        case = f"tiny_{i:03d}"
        label = blob_label(shape, seed=i)
        image = np.stack([blob_image(label, 100 * i + c) for c in range(len(modalities))], -1)
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label)
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    for folder in ("imagesTr", "labelsTr"):  # AppleDouble files are not NIfTI at all
        (root / folder / "._tiny_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS junk")
    meta = {
        "name": name,
        "modality": {str(c): m for c, m in enumerate(modalities)},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": n_cases,
        "training": training,
        "test": [],
    }
    if not training_list:
        del meta["training"]
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def write_msd_escaping(tmp: Path) -> Path:
    """A :func:`write_msd` folder whose first training image is ``../outside.nii.gz``, a real
    NIfTI file next to (outside) the task folder."""
    root = write_msd(tmp, name="Task98_Escape", n_cases=2)
    shutil.copy(root / "imagesTr" / "tiny_000.nii.gz", Path(tmp) / "outside.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "../outside.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


# --------------------------------------------------------------------------- 2D folders


def write_folder2d(
    tmp: Path,
    name: str = "Skin2D",
    n_cases: int = 3,
    layout: str = "dirs",
    size: tuple[int, int] = (20, 24),
) -> Path:
    """RGB ``.png`` images and 0/255 grayscale ``.png`` masks, ``(H, W) = size``.

    ``layout="dirs"``: ``images/img_000.png`` + ``masks/img_000.png``;
    ``"suffix"``: ``img_000.png`` + ``img_000_mask.png`` side by side.
    """
    root = Path(tmp) / name
    for i in range(n_cases):
        mask = blob_label(size, seed=i, n_labels=1) * 255
        rgb = np.stack([mask // 2 + 20, mask // 3 + 40, np.full(size, 60)], -1)
        if layout == "dirs":
            write_image(root / "images" / f"img_{i:03d}.png", rgb)
            write_image(root / "masks" / f"img_{i:03d}.png", mask)
        elif layout == "suffix":
            write_image(root / f"img_{i:03d}.png", rgb)
            write_image(root / f"img_{i:03d}_mask.png", mask)
        else:
            raise ValueError(f"layout must be 'dirs' or 'suffix', got {layout!r}")
    return root


# --------------------------------------------------------------------------- public layouts


def write_acdc(tmp: Path) -> Path:
    """``ACDC/database/training/patient00N/patient00N_frameFF[_gt].nii.gz``, 2 patients x 2
    frames (labels 1-3). Returns the data directory (holding ``ACDC``)."""
    for p in (1, 2):
        folder = Path(tmp) / "ACDC" / "database" / "training" / f"patient{p:03d}"
        for frame in (1, 12):
            label = blob_label((12, 12, 6), seed=p * frame, n_labels=3)
            write_nifti(folder / f"patient{p:03d}_frame{frame:02d}.nii.gz", blob_image(label, p))
            write_nifti(folder / f"patient{p:03d}_frame{frame:02d}_gt.nii.gz", label)
        write_nifti(folder / f"patient{p:03d}_4d.nii.gz", np.zeros((12, 12, 6, 3), np.float32))
        (folder / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: NOR\n")
    return Path(tmp)


def write_brats(tmp: Path) -> Path:
    """``BraTS2021_Training_Data/BraTS2021_0000N/BraTS2021_0000N_{flair,t1,t1ce,t2,seg}.nii.gz``,
    2 cases, labels 1, 2 and 4. Returns the data directory."""
    for i in (0, 2):
        case = f"BraTS2021_{i:05d}"
        folder = Path(tmp) / "BraTS2021_Training_Data" / case
        label = blob_label((10, 10, 8), seed=i, n_labels=4)
        label[label == 1] = 2
        for c, seq in enumerate(("flair", "t1", "t1ce", "t2")):
            write_nifti(folder / f"{case}_{seq}.nii.gz", blob_image(label, 10 * i + c))
        write_nifti(folder / f"{case}_seg.nii.gz", label)
    return Path(tmp)


def write_drive(tmp: Path) -> Path:
    """``DRIVE/training/{images/NN_training.tif, 1st_manual/NN_manual1.gif, mask/...}``, 2 images.
    Returns the data directory."""
    for n in (21, 22):
        root = Path(tmp) / "DRIVE" / "training"
        vessels = blob_label((18, 20), seed=n, n_labels=1) * 255
        write_image(
            root / "images" / f"{n}_training.tif",
            np.stack([vessels, vessels // 2, vessels // 4], -1),
        )
        write_image(root / "1st_manual" / f"{n}_manual1.gif", vessels)
        write_image(root / "mask" / f"{n}_training_mask.gif", np.full((18, 20), 255))
    return Path(tmp)


def write_isic(tmp: Path) -> Path:
    """``ISIC2018/ISIC2018_Task1-2_Training_Input/ISIC_000000N.jpg`` and
    ``ISIC2018_Task1_Training_GroundTruth/ISIC_000000N_segmentation.png``, 2 images plus the
    LICENSE.txt the real folder holds. Returns the data directory."""
    root = Path(tmp) / "ISIC2018"
    for n in (0, 1):
        lesion = blob_label((16, 20), seed=n, n_labels=1) * 255
        write_image(
            root / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{n:07d}.jpg",
            np.stack([lesion] * 3, -1),
        )
        write_image(
            root / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{n:07d}_segmentation.png", lesion
        )
    (root / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("CC BY-NC 4.0\n")
    return Path(tmp)


def write_wbc(tmp: Path) -> Path:
    """``segmentation_WBC/Dataset 1/00N.bmp`` images with ``00N.png`` ground truth beside them
    (0 background, 128 cytoplasm, 255 nucleus), 2 images. Returns the data directory."""
    root = Path(tmp) / "segmentation_WBC" / "Dataset 1"
    for n in (1, 2):
        label = blob_label((12, 12), seed=n)
        grey = np.select([label == 2, label == 1], [255, 128], 0)
        write_image(root / f"{n:03d}.bmp", np.stack([grey, grey, 200 - grey // 2], -1))
        write_image(root / f"{n:03d}.png", grey)
    return Path(tmp)


TOTALSEG_ROOT = "Totalsegmentator_dataset_v201"
TOTALSEG_SHAPE = (14, 12, 10)
# a few structures beyond the spec's default organs, as in the real 117-structure folders
TOTALSEG_EXTRA = ("thyroid_gland", "vertebrae_L1")


def totalseg_masks(seed: int) -> dict[str, np.ndarray]:
    """Non-empty masks of one :func:`write_totalsegmentator` case (every other one is empty):
    a liver ball, a spleen and a thyroid block, disjoint, uint8 0/1."""
    liver = blob_label(TOTALSEG_SHAPE, seed=seed, n_labels=1)
    spleen = np.zeros(TOTALSEG_SHAPE, np.uint8)
    spleen[:3, :3, 2:8] = 1
    thyroid = np.zeros(TOTALSEG_SHAPE, np.uint8)
    thyroid[-3:, -3:, -2:] = 1
    return {"liver": liver, "spleen": spleen, "thyroid_gland": thyroid}


def write_totalsegmentator(
    tmp: Path, case_ids: tuple[str, ...] = ("s0000", "s0011"), structures=None
) -> Path:
    """``Totalsegmentator_dataset_v201/{meta.csv, sNNNN/ct.nii.gz, sNNNN/segmentations/
    <structure>.nii.gz}``: int16 CT in HU and one uint8 0/1 mask file per structure in every
    case, most of them empty as in the real data. ``structures`` default: the catalog's
    ``TOTALSEGMENTATOR_ORGANS`` + :data:`TOTALSEG_EXTRA`; non-empty ones: :func:`totalseg_masks`.
    Returns the data directory."""
    from data_prep.specs.catalog import TOTALSEGMENTATOR_ORGANS

    root = Path(tmp) / TOTALSEG_ROOT
    structures = structures or TOTALSEGMENTATOR_ORGANS + TOTALSEG_EXTRA
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    rows = ["image_id;age;gender;institute;study_type;split"]
    for i, case in enumerate(case_ids):
        masks = totalseg_masks(seed=i)
        ct = np.full(TOTALSEG_SHAPE, -1000, np.int16)
        ct[masks["liver"] > 0] = 60
        ct[masks["spleen"] > 0] = 45
        write_nifti(root / case / "ct.nii.gz", ct, affine)
        for name in structures:
            mask = masks.get(name, np.zeros(TOTALSEG_SHAPE, np.uint8))
            write_nifti(root / case / "segmentations" / f"{name}.nii.gz", mask, affine)
        rows.append(f"{case};{50 + i};{'fm'[i % 2]};A;ct abdomen-pelvis;train")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return Path(tmp)


# --------------------------------------------------------------------------- real data: MNI152


def mni_files() -> dict[str, Path]:
    """The MNI152 2009a T1 template and its grey / white matter probability maps shipped in the
    nilearn wheel: ``{"t1", "gm", "wm"} -> path``, each ``(197, 233, 189)`` uint8, 1 mm.
    Raises FileNotFoundError when nilearn or the files are missing."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("nilearn is not installed; it ships the MNI152 template files")
    folder = Path(spec.origin).parent / "datasets" / "data"
    files = {
        k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNI152 files missing from nilearn: {missing}")
    return files


def mni_label() -> tuple[np.ndarray, np.ndarray]:
    """``(label, affine)``: uint8 ``(197, 233, 189)``, 1 where grey matter probability >= 0.5,
    2 where white matter >= 0.5 (white matter wins a tie), 0 elsewhere."""
    files = mni_files()
    gm_img, wm_img = nib.load(str(files["gm"])), nib.load(str(files["wm"]))
    gm, wm = (img.get_fdata(dtype=np.float32) for img in (gm_img, wm_img))
    gm, wm = (p / 255.0 if p.max() > 1.0 else p for p in (gm, wm))  # stored as uint8 0-255
    label = np.zeros(gm.shape, np.uint8)
    label[gm >= 0.5] = 1
    label[wm >= 0.5] = 2
    return label, np.asarray(gm_img.affine)


def write_mni_nnunet(tmp: Path) -> Path:
    """``Dataset900_MNI152/{dataset.json, imagesTr/mni152_0000.nii.gz, labelsTr/mni152.nii.gz}``:
    the real T1 template file (copied byte for byte) and :func:`mni_label`."""
    root = Path(tmp) / "Dataset900_MNI152"
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    shutil.copy(mni_files()["t1"], root / "imagesTr" / f"{MNI_CASE}_0000.nii.gz")
    label, affine = mni_label()
    write_nifti(root / "labelsTr" / f"{MNI_CASE}.nii.gz", label, affine)
    meta = {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "grey matter": 1, "white matter": 2},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "reference": "MNI ICBM152 2009a nonlinear symmetric template (Fonov et al., 2011), via nilearn",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
