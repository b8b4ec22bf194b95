"""``megaseg prep build / info / verify``: resumable atomic builds, bad cases, strict mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import SHAPE_3D, break_case, write_nifti, write_nnunet

import data_prep.card
from megaseg.cli import main as megaseg_main
from megaseg.cli.prep import main
from megaseg.data import Corpus

REPO = Path(__file__).resolve().parents[1]
OPTS = ["--resolutions", "32", "64", "--no-progress"]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_build_info_verify(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=3)
    out = tmp_path / "corpus"
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    assert (out / "datasets" / root.name / "card.md").is_file()
    assert (out / "datasets" / root.name / "preview.png").stat().st_size > 1000
    assert not (out / ".build").exists()
    assert megaseg_main(["prep", "info", str(out), "--tasks"]) == 0
    assert megaseg_main(["prep", "verify", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| Dataset001_Tiny | 3 (0) |" in text and "checksums: ok" in text and "leakage:" in text
    # a rerun of a finished build does nothing and changes nothing
    before = _manifest(out)
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    assert _manifest(out) == before and "already complete" in capsys.readouterr().out


def test_verify_fails_on_a_damaged_file(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=3)
    out = tmp_path / "corpus"
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    array = out / "datasets" / root.name / "images_32.npy"
    data = bytearray(array.read_bytes())
    data[-1] ^= 0xFF
    array.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert f"{array}: checksum mismatch" in capsys.readouterr().out


def test_kill_and_resume_equals_clean_build(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=10, channels=("CT",))
    clean, out = tmp_path / "clean", tmp_path / "killed"
    assert main(["build", str(root), "--out", str(clean), *OPTS]) == 0

    cmd = [sys.executable, "-m", "data_prep", "build", str(root), "--out", str(out), *OPTS]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    shards = out / ".build" / "shards"
    while (
        len(list(shards.glob("*/*.npz"))) < 2
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the build ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
    assert not (out / "manifest.json").exists()
    with pytest.raises(Exception, match="no manifest.json"):
        Corpus(out)
    done = len(list(shards.glob("*/*.npz")))
    assert done >= 2

    capsys.readouterr()
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    assert f"done by an earlier run: {done}" in capsys.readouterr().out  # shards were reused
    assert _manifest(out)["files"] == _manifest(clean)["files"]
    assert _manifest(out) == _manifest(clean)
    assert main(["verify", str(out)]) == 0


def test_crash_during_consolidation_resumes(tmp_path, monkeypatch):
    root = write_nnunet(tmp_path, n_cases=3)
    clean, out = tmp_path / "clean", tmp_path / "crashed"
    assert main(["build", str(root), "--out", str(clean), *OPTS]) == 0

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the card")

    monkeypatch.setattr(data_prep.card, "write_card", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["build", str(root), "--out", str(out), *OPTS])
    assert not (out / "manifest.json").exists() and not (out / "datasets").exists()
    monkeypatch.undo()
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    assert _manifest(out) == _manifest(clean)


def _bad_dataset(tmp_path) -> Path:
    root = write_nnunet(tmp_path, n_cases=7, channels=("CT",))
    for case, how in (
        ("case_001", "corrupt"),
        ("case_002", "shape"),
        ("case_003", "nan"),
        ("case_004", "affine"),
    ):
        break_case(root, how, case)
    write_nifti(root / "labelsTr" / "case_005.nii.gz", np.zeros(SHAPE_3D, np.uint8))
    return root


def test_bad_cases_are_skipped_named_and_counted(tmp_path, capsys):
    root = _bad_dataset(tmp_path)
    out = tmp_path / "corpus"
    assert main(["build", str(root), "--out", str(out), *OPTS]) == 0
    text = capsys.readouterr().out
    assert "cases written: 2, skipped: 5" in text
    info = _manifest(out)["datasets"][root.name]
    assert info["cases"] == {"found": 7, "written": 2, "skipped": 5}
    reasons = {s["case_id"]: s["reason"] for s in info["skipped"]}
    assert "case_001_0000.nii.gz: cannot read" in reasons["case_001"]
    assert "does not match" in reasons["case_002"]
    assert "NaN" in reasons["case_003"] and "case_003_0000.nii.gz" in reasons["case_003"]
    assert "geometry differs" in reasons["case_004"]
    assert reasons["case_005"].endswith("case_005.nii.gz: empty label")
    card = (out / "datasets" / root.name / "card.md").read_text()
    assert all(f"`{case}`" in card for case in reasons)
    # the ad-hoc spec names no modality; the card gives the dataset.json's, not "None"
    assert "| modality | None |" not in card
    assert "| modality | CT (from the dataset's files) |" in card, card


def test_strict_makes_a_bad_case_fatal_and_writes_nothing(tmp_path, capsys):
    root = _bad_dataset(tmp_path)
    out = tmp_path / "corpus"
    assert main(["build", str(root), "--out", str(out), "--strict", *OPTS]) == 1
    assert "STOPPED (--strict)" in capsys.readouterr().out
    assert not out.exists()


def test_unknown_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["build", "NoSuchDataset", "--out", str(tmp_path / "c"), *OPTS]) == 2
    assert "unknown dataset 'NoSuchDataset'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_spec_file_lists_become_a_hashable_spec(tmp_path):
    from megaseg.cli.prep import resolve_dataset

    path = tmp_path / "ts.yaml"
    path.write_text(
        "name: TS\nreader: folder\nroot: data\nmodality: CT\nplanes: [2]\nwindow: [-100, 200]\n"
        "structures: [spleen, liver]\nlayout:\n  images: 's*/ct.nii.gz'\n"
        "  label: '{dir}/segmentations/{structure}.nii.gz'\n  channels: ['{path}']\n"
    )
    spec, folder = resolve_dataset(str(path), tmp_path)
    assert spec.structures == ("liver", "spleen") and spec.label_names == {1: "liver", 2: "spleen"}
    assert spec.planes == (2,) and spec.window == (-100, 200)
    assert spec.layout.channels == ("{path}",)
    assert hash(spec) == hash(resolve_dataset(str(path), tmp_path)[0])
    assert folder == tmp_path / "data"


def test_two_workers_build_the_same_corpus(tmp_path):
    # 6 s on an idle 2-core CPU, ~20 s on a busy one: the worker server imports torch and MONAI
    root = write_nnunet(tmp_path, n_cases=4, channels=("CT",))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["build", str(root), "--out", str(one), *OPTS]) == 0
    assert main(["build", str(root), "--out", str(two), "--workers", "2", *OPTS]) == 0
    assert _manifest(one) == _manifest(two)
