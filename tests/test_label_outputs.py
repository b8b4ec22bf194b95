"""Label maps megaseg writes (VolumeSession.save, Segmenter.predict_volume): label values that
need 64 bits, files a user wrote or changed are never replaced without ``overwrite=True``,
and the labels / uncertainty pair is replaced whole or not at all."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from megaseg import Segmenter, create_model
from megaseg.annotate import VolumeSession

pytest.importorskip("nilearn")

BIG = (2**31, 2**40)  # values an int32 wraps: 2**31 -> -2**31, 2**40 -> 0


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter.from_checkpoint("universeg_v1_small", device="cpu")


@pytest.fixture(scope="module")
def mni():
    """``(t1, labels, affine)``: 16 axial slices of MNI152 at 6 mm (33 x 39 x 16), grey 1 /
    white 2 matter."""
    from megaseg.examples import mni152_volume

    t1, labels, affine = mni152_volume()
    return t1[::6, ::6, 54:150:6].copy(), labels[::6, ::6, 54:150:6].copy(), affine


@pytest.fixture(scope="module")
def session(segmenter, mni):
    """Segmented once (the costly part); the tests save it, and may label one more slice."""
    t1, labels, affine = mni
    s = VolumeSession(segmenter, t1, axis=2, affine=affine, progress=False)
    s.add(4, labels[:, :, 4]).add(12, labels[:, :, 12]).segment()
    return s


def test_label_values_of_2_31_and_above_are_kept_in_the_result_and_the_file(
    segmenter, mni, tmp_path
):
    t1, labels, affine = mni
    big = np.select([labels == 1, labels == 2], BIG, 0).astype(np.uint64)
    session = VolumeSession(segmenter, t1, axis=2, affine=affine, progress=False)
    session.add(4, big[:, :, 4]).add(12, big[:, :, 12])
    result = session.segment()
    assert result.labels.dtype == np.int64
    np.testing.assert_array_equal(result.labels[:, :, 4], big[:, :, 4])
    predicted = result.labels[:, :, 8]  # between the labelled slices: both structures
    assert set(np.unique(predicted)) == {0, *BIG}
    out, _ = session.save(tmp_path / "labels.nii.gz")
    saved = nib.load(out)
    assert saved.get_data_dtype() == np.int64
    np.testing.assert_array_equal(np.asarray(saved.dataobj), result.labels)


def test_a_label_value_beyond_int64_is_refused_with_the_reason(session, mni):
    labels = mni[1][:, :, 6].astype(np.uint64) * np.uint64(2**63)
    with pytest.raises(ValueError, match=r"slice 6 .*above the largest supported, 2\*\*63 - 1"):
        session.add(6, labels)


def test_save_keeps_a_correction_the_user_saved_with_nibabel(session, tmp_path):
    out, unc = session.save(tmp_path / "labels.nii.gz")
    img = nib.load(out)  # the user's fix, saved the nibabel way: same header, same descrip
    fixed = np.asarray(img.dataobj).copy()
    fixed[:, :, 8] = 0
    nib.save(nib.Nifti1Image(fixed, img.affine, header=img.header), out)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"labels\.nii\.gz: exists and was not written by"):
        session.save(out)
    assert out.read_bytes() == before
    session.save(out, overwrite=True)  # said explicitly: replaced
    assert np.asarray(nib.load(out).dataobj)[:, :, 8].any()
    session.save(out)  # its own unchanged output: replaced without a word


def test_save_refuses_one_path_for_labels_and_uncertainty(session, tmp_path):
    out = tmp_path / "labels.nii.gz"
    with pytest.raises(ValueError, match="is also the labels' path"):
        session.save(out, uncertainty_path=tmp_path / "." / "labels.nii.gz")
    assert not out.exists()


def test_a_failed_write_leaves_the_previous_pair(session, mni, tmp_path, monkeypatch):
    out, unc = session.save(tmp_path / "labels.nii.gz")
    before = out.read_bytes(), unc.read_bytes()
    session.add(10, mni[1][:, :, 10])  # new labels to write
    real_save, calls = nib.save, []

    def save_then_fail_the_second(img, filename):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(img, filename)

    monkeypatch.setattr(nib, "save", save_then_fail_the_second)
    with pytest.raises(OSError, match="disk full"):
        session.save(out)
    assert (out.read_bytes(), unc.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".megaseg-out")) == [
        "labels.nii.gz",
        "labels_uncertainty.nii.gz",
    ]


@pytest.fixture
def tiny():
    """A random 8-feature network with a one-disk support set at 32 px."""
    torch.manual_seed(0)
    seg = Segmenter(create_model("universeg_v1", encoder_widths=[8, 8, 8, 8]), 32, "cpu")
    yy, xx = np.mgrid[:24, :24]
    disk = ((yy - 12) ** 2 + (xx - 12) ** 2 < 36).astype(np.uint8)
    return seg.set_support([disk * 100.0], [disk])


def test_predict_volume_replaces_only_its_own_output(tiny, tmp_path):
    volume = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
    out = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.full((2, 2, 2), 7, np.uint8), np.eye(4)), out)  # the user's
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"seg\.nii\.gz: exists and was not written by"):
        tiny.predict_volume(volume, out_path=out)
    assert out.read_bytes() == before
    tiny.predict_volume(volume, out_path=out, overwrite=True)
    assert nib.load(out).shape == volume.shape
    tiny.predict_volume(volume, out_path=out)  # now its own output: replaced


def test_predict_volume_keeps_support_labels_of_2_31_and_above(segmenter, tmp_path):
    yy, xx = np.mgrid[:48, :48]
    left = (yy - 24) ** 2 + (xx - 14) ** 2 < 64
    right = (yy - 24) ** 2 + (xx - 34) ** 2 < 64
    image = (left | right) * 100.0
    segmenter.set_support([image, image], [left * BIG[0] + right * BIG[1]] * 2)
    volume = np.stack([image] * 3, axis=-1).astype(np.float32)
    labels = segmenter.predict_volume(volume, out_path=tmp_path / "seg.nii.gz")
    assert labels.dtype == np.int64 and set(np.unique(labels)) == {0, *BIG}
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj), labels)


KILLED_SAVE = """
import os, signal, sys
import nibabel as nib, numpy as np, torch
from megaseg import Segmenter, create_model

def killed_save(img, filename):  # the process dies halfway through writing the file
    with open(filename, "wb") as f:
        f.write(b"half a NIfTI")
    os.kill(os.getpid(), signal.SIGKILL)

seg = Segmenter(create_model("universeg_v1", encoder_widths=[8, 8, 8, 8]), 32, "cpu")
disk = np.zeros((24, 24), np.uint8)
disk[8:16, 8:16] = 1
seg.set_support([disk * 100.0], [disk])
nib.save = killed_save
seg.predict_volume(np.zeros((24, 24, 3), np.float32), out_path=sys.argv[1])
"""


def test_a_killed_nifti_write_leaves_a_temporary_the_next_write_removes(tiny, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "seg.nii.gz")],
                         env=env, capture_output=True, timeout=300)  # fmt: skip
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".seg.nii.gz") and left[0].endswith(".nii.gz")
    tiny.predict_volume(np.zeros((24, 24, 3), np.float32), out_path=tmp_path / "other.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".megaseg-outputs.json", "other.nii.gz"]
