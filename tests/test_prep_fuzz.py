"""Fuzz ``prep build`` with seeded byte-level corruptions of NIfTI and PNG datasets (issue #10).

Every corrupted case must end as written or as skipped with a reason naming a file of the
dataset; the build must finish and ``prep verify`` pass. Corruptions: truncation, bit flips in
the data, and NIfTI header fields (dim, datatype, bitpix, vox_offset, scaling, voxel size,
sform) or PNG IHDR fields (width, height, bit depth, colour type; CRC recomputed so the
decoder reads them) set to hostile values.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from fixtures_data import AFFINE, SHAPE_3D, blob_image, blob_label, write_image

from megaseg.cli.prep import main

N_NIFTI = 150  # cases per NIfTI dataset (.nii and .nii.gz)
N_PNG = 150
OPTS = ["--resolutions", "16", "--no-progress"]

# NIfTI-1 header fields: (offset, struct format, hostile values)
NIFTI_FIELDS = {
    "dim": (40, "<8h", None),  # drawn below: a count and sizes
    "datatype": (70, "<h", (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2304, 9999, -1)),
    "bitpix": (72, "<h", (0, 1, 7, 8, 64, 255, -8)),
    "pixdim": (76, "<8f", None),
    "vox_offset": (108, "<f", (0.0, 1.0, 351.0, 353.0, 1e9, -1.0, float("nan"))),
    "scl_slope": (112, "<f", (0.0, float("nan"), float("inf"), 1e38, -1.0)),
    "scl_inter": (116, "<f", (float("nan"), float("inf"), -1e38)),
    "sform": (280, "<12f", None),
}


def _nifti_bytes(seed: int) -> tuple[bytes, bytes]:
    """Uncompressed NIfTI-1 bytes of one valid case: (image, label)."""
    label = blob_label(SHAPE_3D, seed=seed)
    image = nib.Nifti1Image(blob_image(label, seed=seed), AFFINE).to_bytes()
    return image, nib.Nifti1Image(label, AFFINE).to_bytes()


def _damage(data: bytes, rng: np.random.Generator, start: int = 0) -> tuple[bytes, str]:
    """Truncate ``data`` or flip a few bits after ``start``."""
    if rng.random() < 0.5:
        n = int(rng.integers(0, len(data)))
        return data[:n], f"truncated to {n}"
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 20))):
        data[int(rng.integers(start, len(data)))] ^= 1 << int(rng.integers(0, 8))
    return bytes(data), "bit flips"


def _corrupt_nifti(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    if rng.random() < 0.4:
        return _damage(data, rng, start=352)  # the data, after the header
    data = bytearray(data)
    name = str(rng.choice(list(NIFTI_FIELDS)))
    offset, fmt, values = NIFTI_FIELDS[name]
    if name == "dim":
        count = int(rng.choice([0, 1, 2, 3, 4, 5, 7, 8, -1]))
        sizes = rng.choice([0, 1, 2, 16, 17, 255, 1024, 32767, -1], size=7)
        value = (count, *(int(s) for s in sizes))
    elif name == "pixdim":
        value = tuple(float(v) for v in rng.choice([0.0, -1.0, 1e-30, 1.0, 30.0, 1e30, np.nan], 8))
    elif name == "sform":
        value = tuple(float(v) for v in rng.choice([0.0, 1.0, -1e30, 1e30, np.nan, 5.0], 12))
    else:
        value = (values[int(rng.integers(len(values)))],)
    struct.pack_into(fmt, data, offset, *value)
    return bytes(data), f"{name} = {value}"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _corrupt_png(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    if rng.random() < 0.5:
        return _damage(data, rng, start=8)
    # IHDR is the first chunk: width, height, bit depth, colour type, ... (CRC recomputed)
    width, height, depth, colour, *rest = struct.unpack(">IIBBBBB", data[16:29])
    field = str(rng.choice(["width", "height", "depth", "colour"]))
    if field in ("width", "height"):
        value = int(rng.choice([0, 1, 2**31 - 1, 100000, 65535]))
        width, height = (value, height) if field == "width" else (width, value)
    elif field == "depth":
        depth = int(rng.choice([0, 1, 3, 16, 255]))
    else:
        colour = int(rng.choice([1, 2, 3, 4, 6, 7, 255]))
    body = struct.pack(">IIBBBBB", width, height, depth, colour, *rest)
    return bytes(data[:8]) + _png_chunk(b"IHDR", body) + bytes(data[33:]), f"IHDR {field}"


def _nnunet(root: Path, ending: str, rng: np.random.Generator) -> dict[str, str]:
    """A CT nnU-Net dataset of N_NIFTI cases, all but 5 with one corrupted file."""
    done = {}
    for i in range(N_NIFTI):
        case = f"case_{i:03d}"
        image, label = _nifti_bytes(i % 7)
        what = "intact"
        if i >= 5:
            if rng.random() < 0.5:
                image, what = _corrupt_nifti(image, rng)
                what = "image " + what
            else:
                label, what = _corrupt_nifti(label, rng)
                what = "label " + what
        for path, data in (
            (root / "imagesTr" / f"{case}_0000{ending}", image),
            (root / "labelsTr" / f"{case}{ending}", label),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress(data, mtime=0) if ending == ".nii.gz" else data)
        done[case] = what
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": N_NIFTI,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    # some .nii.gz files damaged in their compressed bytes too
    if ending == ".nii.gz":
        for i in range(5, N_NIFTI, 10):
            path = root / "imagesTr" / f"case_{i:03d}_0000{ending}"
            data, what = _damage(path.read_bytes(), rng)
            path.write_bytes(data)
            done[f"case_{i:03d}"] += f"; gzip {what}"
    return done


def _png_folder(root: Path, rng: np.random.Generator) -> dict[str, str]:
    """images/ + masks/ PNG folder of N_PNG cases, all but 5 with one corrupted file."""
    done = {}
    for i in range(N_PNG):
        mask = blob_label((20, 24), seed=i % 7, n_labels=1) * 255
        rgb = np.stack([mask // 2 + 20, mask // 3 + 40, np.full(mask.shape, 60)], -1)
        image = write_image(root / "images" / f"img_{i:03d}.png", rgb)
        label = write_image(root / "masks" / f"img_{i:03d}.png", mask)
        what = "intact"
        if i >= 5:
            path = image if rng.random() < 0.5 else label
            data, what = _corrupt_png(path.read_bytes(), rng)
            path.write_bytes(data)
            what = f"{path.parent.name} {what}"
        done[f"img_{i:03d}"] = what
    return done


def test_fuzzed_datasets_build_every_case_written_or_skipped_and_verify(tmp_path, capsys):
    rng = np.random.default_rng(20261130)
    data = tmp_path / "data"
    plans = {
        "Dataset001_Nii": _nnunet(data / "Dataset001_Nii", ".nii", rng),
        "Dataset002_NiiGz": _nnunet(data / "Dataset002_NiiGz", ".nii.gz", rng),
        "Skin2D": _png_folder(data / "Skin2D", rng),
    }
    out = tmp_path / "corpus"
    args = [str(data / name) for name in plans]
    code = main(["build", *args, "--out", str(out), *OPTS])
    text = capsys.readouterr()
    assert code == 0, text.out[-3000:] + text.err[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    for name, plan in plans.items():
        info = manifest["datasets"][name]
        assert info["cases"]["found"] == len(plan)
        assert info["cases"]["written"] + info["cases"]["skipped"] == len(plan)
        skipped = {s["case_id"]: s["reason"] for s in info["skipped"]}
        for case, reason in skipped.items():
            assert plan[case] != "intact", (case, reason)
            # the reason starts with the file it is about, a file of this dataset
            assert reason.startswith(str(data / name)), (case, plan[case], reason)
        assert info["cases"]["skipped"] >= len(plan) // 4  # the fuzzing did break cases
        assert info["cases"]["written"] >= 5
    assert main(["verify", str(out)]) == 0
