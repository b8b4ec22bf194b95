"""Files megaseg writes get the mode the umask allows, as with a plain ``open()``: readable by
collaborators under the common umask 022, private under 077 (mkstemp alone would give 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from megaseg import Segmenter, create_model
from megaseg.paths import atomic_write, current_umask


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    atomic_write(tmp_path / "out.txt", lambda tmp: Path(tmp).write_text("x"))
    assert _mode(tmp_path / "out.txt") == expected


def test_predict_volume_output_is_readable_by_the_group_and_others(tmp_path, umask):
    umask(0o022)
    torch.manual_seed(0)
    seg = Segmenter(create_model("universeg_v1", encoder_widths=(8, 8, 8, 8)), 32, "cpu")
    label = np.zeros((24, 24), np.uint8)
    label[6:18, 6:18] = 1
    seg.set_support([label * 100.0 + 5, label * 90.0 + 3], [label, label])
    seg.predict_volume(np.random.default_rng(0).random((24, 24, 3)), out_path=tmp_path / "s.nii.gz")
    assert _mode(tmp_path / "s.nii.gz") == 0o644
