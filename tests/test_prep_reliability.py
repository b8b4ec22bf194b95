"""``megaseg prep`` on hostile and broken input (issue #10 and #12, data_prep items).

Each test names the issue item it covers. The rule under test throughout: a build deletes or
replaces only paths megaseg marked as its own; a bad case is skipped with its file and reason;
a user error is a message and exit code 2.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures_data import (
    AFFINE,
    SHAPE_3D,
    blob_image,
    blob_label,
    write_folder2d,
    write_msd,
    write_nifti,
    write_nnunet,
)

import data_prep.card
from data_prep.pipeline import DatasetJob, build_corpus
from data_prep.readers import CaseError, DatasetError, get_reader
from data_prep.readers.io import read_file
from data_prep.specs import DatasetSpec, spec_from_path
from data_prep.store_writer import memory_case
from megaseg.cli.prep import main

REPO = Path(__file__).resolve().parents[1]
OPTS = ["--resolutions", "32", "--no-progress"]


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (links not followed)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _skips(out: Path, name: str) -> dict[str, str]:
    return {s["case_id"]: s["reason"] for s in _manifest(out)["datasets"][name]["skipped"]}


# -- 1. a build replaces only what megaseg wrote ---------------------------------------------


def test_1_raw_dataset_at_out_datasets_name_is_refused_and_untouched(tmp_path, capsys):
    # --out is the parent of a raw dataset that sits at OUT/datasets/NAME
    out = tmp_path / "data"
    raw = write_nnunet(out / "datasets", n_cases=2, channels=("CT",))
    (raw / "notes.txt").write_text("mine")
    before = _tree(out)
    assert main(["build", str(raw), "--out", str(out), *OPTS]) == 2
    err = capsys.readouterr().err
    assert str(raw) in err and "megaseg did not write it" in err
    assert _tree(out) == before  # images, labels and the unrelated file, byte for byte
    assert not (out / ".build").exists() and not (out / ".lock").exists()


def test_1_foreign_build_folder_and_manifest_are_refused(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    out = tmp_path / "corpus"
    (out / ".build").mkdir(parents=True)
    (out / ".build" / "precious.txt").write_text("not megaseg's")
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 2
    assert f"{out / '.build'}: exists but megaseg did not make it" in capsys.readouterr().err
    assert (out / ".build" / "precious.txt").read_text() == "not megaseg's"

    shutil.rmtree(out / ".build")
    (out / "manifest.json").write_text('{"my": "own manifest"}')
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 2
    assert f"{out / 'manifest.json'}: not a megaseg manifest" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == '{"my": "own manifest"}'

    (out / "manifest.json").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "datasets").symlink_to(elsewhere)  # the build would write outside --out
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 2
    assert f"{out / 'datasets'}: not a folder megaseg made" in capsys.readouterr().err
    assert not any(elsewhere.iterdir())


def test_1_megaseg_dataset_folder_is_still_replaced_on_rebuild(tmp_path):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    out = tmp_path / "corpus"
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    write_nnunet(tmp_path, n_cases=3, channels=("CT",))  # one more case: the inputs changed
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    assert _manifest(out)["datasets"][root.name]["cases"]["written"] == 3


# -- 2. dataset names are plain folder names --------------------------------------------------


@pytest.mark.parametrize("name", ["../../victim_dir", "..", "a/b", ".build", "", "x\\y", "a\nb"])
def test_2_unsafe_spec_name_is_refused(tmp_path, capsys, name):
    victim = tmp_path / "victim_dir"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    write_nnunet(tmp_path / "corpus" / "data", n_cases=2, channels=("CT",))
    spec = tmp_path / "corpus" / "spec.yaml"
    spec.write_text(json.dumps({"name": name, "reader": "nnunet", "root": "data/Dataset001_Tiny"}))
    out = tmp_path / "corpus" / "out"
    assert main(["build", str(spec), "--out", str(out), *OPTS]) == 2
    assert "is not a plain folder name" in capsys.readouterr().err
    assert (victim / "keep.txt").read_text() == "keep" and sorted(victim.iterdir()) == [
        victim / "keep.txt"
    ]
    assert not out.exists()


def test_2_unsafe_name_equals_path_and_in_memory_spec_are_refused(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    assert main(["build", f"../evil={root}", "--out", str(tmp_path / "c"), *OPTS]) == 2
    assert "'../evil' is not a plain folder name" in capsys.readouterr().err

    class Spec:  # any spec object reaching build_corpus (prep synth, write_dataset)
        name = "../escape"

    case = memory_case("x", "c0", "s0", {1: "a"})
    with pytest.raises(ValueError, match="not a plain folder name"):
        build_corpus([DatasetJob(Spec(), [case], lambda c: None)], tmp_path / "c")
    assert not (tmp_path / "c").exists() and not (tmp_path / "escape").exists()


# -- 3. --strict removes only what its own run wrote -------------------------------------------


def test_3_strict_failure_keeps_the_resume_cache_of_other_datasets(tmp_path, monkeypatch, capsys):
    good = write_nnunet(tmp_path / "good", n_cases=2, channels=("CT",))
    bad = write_nnunet(tmp_path / "bad", name="Dataset002_Bad", n_cases=2, channels=("CT",))
    (bad / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "corpus"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the card")

    monkeypatch.setattr(data_prep.card, "write_card", crash)
    with pytest.raises(KeyboardInterrupt):  # an interrupted build: shards of `good` are cached
        main(["build", str(good), "--out", str(out), *OPTS])
    monkeypatch.undo()
    cache = _tree(out / ".build" / "shards")
    assert len(cache) == 2

    assert main(["build", str(bad), "--out", str(out), "--strict", *OPTS]) == 1
    assert "STOPPED (--strict)" in capsys.readouterr().out
    assert _tree(out / ".build" / "shards") == cache  # untouched, byte for byte
    assert not list((out / ".build" / "shards").glob("Dataset002_Bad*/*"))
    assert main(["build", str(good), "--out", str(out), *OPTS]) == 0
    assert "done by an earlier run: 2" in capsys.readouterr().out


# -- 4. a bad case is skipped whatever its failure ------------------------------------------------


def test_4_huge_label_value_is_skipped_and_named(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=3, channels=("CT",))
    label = blob_label(SHAPE_3D, seed=1).astype(np.int64)
    label[0, 0, 0] = 2**40  # np.bincount of this asked for 8 TB
    bad = root / "labelsTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(label, AFFINE, dtype=np.int64), str(bad))
    assert main(["build", str(root), "--out", str(tmp_path / "c"), *OPTS]) == 0
    reason = _skips(tmp_path / "c", root.name)["case_001"]
    assert reason.startswith(f"{bad}: 1 label value(s) not declared") and "1099511627776" in reason


def test_4_huge_undeclared_label_value_builds_in_bounded_memory(tmp_path):
    # no labels declared: the value is a label like any other; its task is named by it
    image = np.zeros((1, 12, 12), np.float32)
    image[0, 3:9, 3:9] = 1.0
    label = np.zeros((12, 12), np.int64)
    label[3:9, 3:9] = 2**40
    case = memory_case("Big", "c0", "s0", {})
    from data_prep.readers.base import LoadedCase

    job = DatasetJob(
        DatasetSpec(name="Big", reader="folder2d", root=".", layout=_dummy_layout()),
        [case],
        lambda c: LoadedCase(image, label, None, ["MR"]),
        fingerprint=lambda c: "v1",
    )
    summary = build_corpus([job], tmp_path / "c", resolutions=(16,), progress=False)
    assert summary.ok and summary.written == {"Big": 1}
    assert [t["label"] for t in _manifest(tmp_path / "c")["tasks"]] == [str(2**40)]


def _dummy_layout():
    from data_prep.specs import FolderLayout

    return FolderLayout(images="*.png", label="{stem}_mask.png")


def test_4_memory_error_in_one_case_is_a_skip_not_a_crash(tmp_path):
    from data_prep.readers.base import LoadedCase

    def load(case):
        if case.case_id == "c1":
            raise MemoryError("Unable to allocate 8.00 TiB")
        label = np.zeros((12, 12), np.uint8)
        label[2:8, 2:8] = 1
        return LoadedCase(label[None].astype(np.float32), label, None, ["MR"])

    cases = [memory_case("M", f"c{i}", f"s{i}", {1: "a"}) for i in range(3)]
    spec = DatasetSpec(name="M", reader="folder2d", root=".", layout=_dummy_layout())
    summary = build_corpus(
        [DatasetJob(spec, cases, load, fingerprint=lambda c: "v1")],
        tmp_path / "c",
        resolutions=(16,),
        progress=False,
    )
    assert summary.ok and summary.written == {"M": 2}
    assert summary.skipped["M"] == [
        ("c1", "<memory>/M/c1: MemoryError: Unable to allocate 8.00 TiB")
    ]


class _Tiny2D:
    """Picklable ``load``: a small 2D case; the process dies (SIGKILL, as the OS's
    out-of-memory killer does) on case ``dies_on``."""

    def __init__(self, dies_on: str):
        self.dies_on = dies_on

    def __call__(self, case):
        from data_prep.readers.base import LoadedCase

        if case.case_id == self.dies_on:
            os.kill(os.getpid(), signal.SIGKILL)
        label = np.zeros((12, 12), np.uint8)
        label[2:8, 2:8] = 1
        return LoadedCase(label[None].astype(np.float32), label, None, ["MR"])


def test_4_case_that_kills_its_worker_is_skipped_and_the_build_goes_on(tmp_path):
    cases = [memory_case("K", f"c{i}", f"s{i}", {1: "a"}) for i in range(6)]
    spec = DatasetSpec(name="K", reader="folder2d", root=".", layout=_dummy_layout())
    job = DatasetJob(spec, cases, _Tiny2D("c2"), fingerprint=lambda c: "v1")
    summary = build_corpus([job], tmp_path / "c", workers=2, resolutions=(16,), progress=False)
    assert summary.ok and summary.written == {"K": 5}
    assert summary.skipped["K"] == [
        (
            "c2",
            "<memory>/K/c2: the worker process died while processing this case (killed by "
            "the OS, e.g. out of memory, or a crash in a file reader)",
        )
    ]


# -- 5. a NIfTI header is checked against the file before anything is read --------------------


def _header_only(path: Path, shape, dtype=np.uint8) -> Path:
    """A NIfTI-1 file holding only a header declaring ``shape`` (gzip when named .gz)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    data = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_5_tiny_gzip_declaring_a_gigavoxel_is_refused_in_bounded_memory(tmp_path):
    path = _header_only(tmp_path / "bomb.nii.gz", (1024, 1024, 1024))
    assert path.stat().st_size < 100  # 68 bytes: the file
    # the reading process may not map more than 1 GiB (the declared data alone is 1 GiB)
    code = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from data_prep.readers.base import CaseError
        from data_prep.readers.io import read_file
        try:
            read_file({str(path)!r}, is_label=True)
        except CaseError as err:
            print("CaseError:", err)
        """
    )
    env = os.environ | {
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"CaseError: {path}: header declares shape (1024, 1024, 1024)" in done.stdout
    assert "gzip file can hold" in done.stdout


def test_5_truncated_nii_and_voxel_limit_are_named_in_the_skip_reason(tmp_path, monkeypatch):
    with pytest.raises(CaseError, match=r"the file holds 352 bytes; truncated"):
        read_file(_header_only(tmp_path / "short.nii", (32767, 32767, 32767)))
    small = write_nifti(tmp_path / "ok.nii.gz", np.zeros((8, 8, 8), np.float32))
    monkeypatch.setenv("MEGASEG_MAX_VOXELS", "100")
    with pytest.raises(CaseError, match=r"512 voxels, over the limit of 100 \(raise it with"):
        read_file(small)


def test_5_max_voxels_option_skips_big_cases(tmp_path):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    out = tmp_path / "c"
    assert main(["build", str(root), "--out", str(out), "--max-voxels", "4000", *OPTS]) == 1
    assert "MEGASEG_MAX_VOXELS" not in os.environ  # the option does not leak past the build
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0  # 16**3 = 4096 voxels


# -- 7. workers exit when the build is killed ----------------------------------------------------


@pytest.mark.parametrize(
    "command", ["build", pytest.param("synth", marks=pytest.mark.slow)]
)  # the same worker pool: synth only adds time
def test_7_kill_9_of_a_multi_worker_build_leaves_no_process(tmp_path, command):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "c"
    if command == "build":
        root = write_nnunet(tmp_path, n_cases=40, channels=("CT",))
        args = ["build", str(root), "--resolutions", "32"]
    else:
        args = ["synth", "--tasks", "40", "--subjects", "4", "--resolutions", "32"]
    cmd = [sys.executable, "-m", "data_prep", *args, "--out", str(out), "--workers", "2"]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, "--no-progress"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    # kill once workers have finished cases: they are then waiting on the pool's queue
    while (
        len(list(out.glob(".build/shards/*/*.npz"))) < 2
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    children = parent.children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the build ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
    assert len(children) >= 3  # forkserver, 2 workers (and the resource tracker)
    # measured on a busy 2-core machine: workers gone in < 1 s, the resource tracker in ~2 s,
    # the forkserver in ~5 s (its interpreter shutdown, with torch loaded)
    _, alive = psutil.wait_procs(children, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, [" ".join(p.cmdline())[-80:] for p in alive]


# -- 8. shapes and labels the dataset does not declare ---------------------------------------------


def test_8_4d_image_in_a_one_channel_dataset_is_skipped(tmp_path):
    root = write_nnunet(tmp_path, n_cases=3, channels=("MR",))
    label = blob_label(SHAPE_3D, seed=1)
    bad = write_nifti(
        root / "imagesTr" / "case_001_0000.nii.gz",
        np.stack([blob_image(label, seed=s) for s in range(4)], -1),
    )
    assert main(["build", str(root), "--out", str(tmp_path / "c"), *OPTS]) == 0
    reason = _skips(tmp_path / "c", root.name)["case_001"]
    assert reason.startswith(f"{bad}: 4-D image of shape (16, 16, 16, 4)")
    assert "declares one channel per file (MR)" in reason
    assert {t["modality"] for t in _manifest(tmp_path / "c")["tasks"]} == {"MR"}


def test_8_2d_nifti_in_a_volume_dataset_is_skipped(tmp_path):
    root = write_nnunet(tmp_path, n_cases=3, channels=("CT",))
    label = blob_label(SHAPE_3D[:2], seed=1)
    write_nifti(root / "imagesTr" / "case_001_0000.nii.gz", blob_image(label, seed=1))
    bad = write_nifti(root / "labelsTr" / "case_001.nii.gz", label)
    assert main(["build", str(root), "--out", str(tmp_path / "c"), *OPTS]) == 0
    reason = _skips(tmp_path / "c", root.name)["case_001"]
    assert reason.startswith(f"{bad}: label is a 2-D NIfTI of shape (16, 16)")
    assert {t["axis"] for t in _manifest(tmp_path / "c")["tasks"]} == {
        "sagittal", "coronal", "axial",
    }  # fmt: skip


def test_8_label_with_hundreds_of_values_is_refused(tmp_path, monkeypatch):
    values = np.arange(SHAPE_3D[0] * SHAPE_3D[1] * SHAPE_3D[2]).reshape(SHAPE_3D) % 301
    # declared labels: the undeclared values are named
    root = write_nnunet(tmp_path, n_cases=3, channels=("CT",))
    bad = write_nifti(root / "labelsTr" / "case_001.nii.gz", values.astype(np.int16))
    assert main(["build", str(root), "--out", str(tmp_path / "c"), *OPTS]) == 0
    assert _skips(tmp_path / "c", root.name)["case_001"].startswith(
        f"{bad}: 298 label value(s) not declared, e.g. [3, 4, 5"
    )
    # no labels declared: more values than --max-labels is refused, naming the file
    plain = write_nnunet(tmp_path / "plain", n_cases=3, channels=("CT",), labels={"background": 0})
    bad = write_nifti(plain / "labelsTr" / "case_001.nii.gz", values.astype(np.int16))
    out = tmp_path / "c2"
    assert main(["build", str(plain), "--out", str(out), "--max-labels", "20", *OPTS]) == 0
    assert _skips(out, plain.name)["case_001"].startswith(
        f"{bad}: 300 distinct label values and none declared; more than 20"
    )
    assert {t["label"] for t in _manifest(out)["tasks"]} == {"1", "2"}


# -- 10. scanned files may not lead outside the dataset ----------------------------------------------


def test_10_scanned_symlink_leaving_the_dataset_is_refused(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    secret = write_nifti(tmp_path / "elsewhere" / "secret.nii.gz", blob_label(SHAPE_3D, seed=0))
    link = root / "labelsTr" / "case_001.nii.gz"
    link.unlink()
    link.symlink_to(secret)
    spec = spec_from_path(root)
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        get_reader("nnunet").cases(root, spec)
    assert main(["build", str(root), "--out", str(tmp_path / "c"), *OPTS]) == 2
    err = capsys.readouterr().err
    assert f"{link}: resolves to {secret}" in err and not (tmp_path / "c").exists()
    # a link that stays inside the dataset is fine
    link.unlink()
    link.symlink_to(root / "labelsTr" / "case_000.nii.gz")
    assert len(get_reader("nnunet").cases(root, spec)) == 2


def test_10_scanned_symlink_is_refused_by_the_decathlon_and_folder_readers(tmp_path):
    secret = write_nifti(tmp_path / "elsewhere" / "secret.nii.gz", blob_label(SHAPE_3D, seed=0))
    msd = write_msd(tmp_path, n_cases=2, training_list=False)  # no list: imagesTr is scanned
    link = msd / "imagesTr" / "tiny_001.nii.gz"
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(DatasetError, match=f"{link}: resolves to {secret}, outside"):
        get_reader("msd").cases(msd, spec_from_path(msd))
    folder = write_folder2d(tmp_path)
    link = folder / "masks" / "img_001.png"
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(DatasetError, match=f"{link}: resolves to {secret}, outside"):
        get_reader("folder2d").cases(folder, spec_from_path(folder))


# -- 11. errors reach the user as messages with exit 2 ---------------------------------------------


def test_11_info_after_a_kill_between_the_two_renames_explains(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    out = tmp_path / "c"
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    # what a kill between `datasets/NAME -> .old` and `staging -> datasets/NAME` leaves
    (out / "datasets" / root.name).rename(out / "aside")
    capsys.readouterr()
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"dataset {root.name!r} is listed in manifest.json but" in err
    assert "interrupted; rerun the same `megaseg prep build`" in err
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0  # and the rerun recovers
    assert main(["info", str(out)]) == 0


def test_11_concurrent_build_is_refused_naming_lock_and_pid(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    out = tmp_path / "c"
    out.mkdir()
    lock = out / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{{os.getpid()}}\\n".encode())
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["build", str(root), "--out", str(out), *OPTS]) == 2
        err = capsys.readouterr().err
        assert f"lock {lock}, held by PID {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock is stale (the OS released it) and is taken over
    assert lock.read_text().strip() == str(holder.pid)
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    assert lock.read_text().strip() == str(os.getpid())


def test_11_corrupt_manifest_is_a_message_naming_the_file(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    out = tmp_path / "c"
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    capsys.readouterr()
    assert main(["info", str(out)]) == 2
    assert f"{manifest}: unreadable (JSONDecodeError" in capsys.readouterr().err
    assert main(["verify", str(out)]) == 1
    assert f"FAIL {manifest}: unreadable manifest (JSONDecodeError" in capsys.readouterr().out
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 2
    assert f"{manifest}: not a megaseg manifest" in capsys.readouterr().err


# -- 13 and #12: the documented forms, help and info ---------------------------------------------------


def test_13_name_equals_folder_builds_any_folder_under_that_name(tmp_path, capsys):
    nnunet = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    png = write_folder2d(tmp_path, n_cases=3)
    out = tmp_path / "c"
    assert main(["build", f"MyData={nnunet}", f"Skin={png}", "--out", str(out), *OPTS]) == 0
    assert sorted(_manifest(out)["datasets"]) == ["MyData", "Skin"]
    assert _manifest(out)["datasets"]["MyData"]["spec"]["reader"] == "nnunet"
    assert main(["build", f"MyData={tmp_path / 'nope'}", "--out", str(out), *OPTS]) == 2
    assert "nope is not a folder" in capsys.readouterr().err


def test_12_build_help_explains_arguments_and_help_imports_no_torch():
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from megaseg.cli.prep import main
        texts = []
        for argv in (["--help"], ["build", "--help"], ["synth", "--help"]):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
                main(argv)
            texts.append(buf.getvalue())
        print("torch imported:", "torch" in sys.modules)
        print("\\n".join(texts))
        """
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch imported: False" in done.stdout
    for text in ("NAME=FOLDER", "SPEC.yaml", "Task02_Heart", "--max-voxels", "--max-labels",
                 "--strict", "a bad case is fatal", "--seed-offset"):  # fmt: skip
        assert text in done.stdout, text


def test_12_info_lists_labels_explains_task_count_and_missing_provenance(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=3, channels=("T1", "T2"))
    out = tmp_path / "c"
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    n = len(_manifest(out)["tasks"])
    assert f"- {root.name}: {n} tasks of 1 group x 2 modalities x 3 axes x 2 labels = 12" in text
    assert "labels: liver, tumour" in text
    assert "| not given | not given |" in text and "licence not given" in text
    assert "`licence: CC BY 4.0`" in text and "?" not in text.split("Provenance")[1]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layout": {"images": 5, "label": "{stem}"}}, "layout: images must be str, got 5"),
        ({"layout": {"images": "*", "label": "{stem}", "match": "["}}, "match '[' is not a"),
        ({"window": [1]}, "window must be [low, high] numbers, got [1]"),
        ({"modality": 5}, "modality must be a name or a list of names, got 5"),
        ({"root": [1]}, "root must be str or Path, got [1]"),
        ({"spacing_mm": 0}, "spacing_mm must be a number in (0, 1000) mm, got 0"),
        ({"subject_regex": "(?P<subject>["}, "subject_regex '(?P<subject>[' is not a regular"),
        ({"labels": {"a": "b"}}, "labels must map integer values to names"),
        ({"planes": "xyz"}, "planes must be a list of axes 0, 1, 2, got 'xyz'"),
    ],
)
def test_11_malformed_spec_file_is_a_message_naming_file_and_field(
    tmp_path, capsys, fields, message
):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"name": "A", "reader": "nnunet", "root": "data"} | fields))
    assert main(["build", str(spec), "--out", str(tmp_path / "c"), *OPTS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prep build: {spec}: ") and message in err


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"labels": [1, 2]}, "labels must map names to values, got [1, 2]"),
        ({"labels": {"background": 0, "x": -1}}, "label 'x' has value -1, expected >= 0"),
        ({"dataset": {"c": {"images": "abc", "label": "x"}}}, "images must be a list of paths"),
        ({"dataset": {"c": {"images": [5], "label": "x"}}}, "expected a relative path, got 5"),
    ],
)
def test_11_malformed_dataset_json_is_a_message_naming_it(tmp_path, capsys, fields, message):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    meta = root / "dataset.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | fields))
    assert main(["build", str(root), "--out", str(tmp_path / "c"), *OPTS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prep build: {meta}: ") and message in err


@pytest.mark.parametrize(
    "option", [["--resolutions", "0"], ["--resolutions", "5000"], ["--workers", "0"]]
)
def test_11_out_of_range_options_are_refused(tmp_path, capsys, option):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    args = ["build", str(root), "--out", str(tmp_path / "c"), "--no-progress", *option]
    assert main(args) == 2
    assert "need --workers >= 1 and --resolutions in [8, 1024]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
