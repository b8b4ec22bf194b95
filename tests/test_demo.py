"""``megaseg demo`` and the offline example data it runs on (MNI152 from the nilearn wheel)."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
from fixtures_data import MNI_SHAPE, mni_label

from megaseg.checkpoint import save_checkpoint
from megaseg.cli import main as cli_main
from megaseg.models import create_model

pytest.importorskip("nilearn")

DICE_LINE = re.compile(r"^\s+(grey matter|white matter)\s+Dice ([0-9.]+)", re.M)
TINY = {"encoder_widths": [4, 4, 4, 4]}


def _dice(out: str) -> dict[str, float]:
    return {name: float(value) for name, value in DICE_LINE.findall(out)}


def _png(out: str):
    from pathlib import Path

    match = re.search(r"overlay PNG: (\S+\.png)", out)
    assert match, out
    return Path(match.group(1))


def _tiny_checkpoint(path):
    """A random-init tiny network with a card at 64 px: fast, and enough to run the pipeline."""
    card = {"model": {"name": "universeg_v1", "kwargs": TINY}, "resolution": 64}
    return save_checkpoint(path, create_model("universeg_v1", **TINY), card)


@pytest.fixture
def no_shipped_weights(monkeypatch, tmp_path):
    monkeypatch.setattr("megaseg.models.registry._PRETRAINED", {})
    monkeypatch.setenv("MEGASEG_CHECKPOINTS", str(tmp_path / "no_checkpoints"))


def test_demo_trains_the_fallback_prints_dice_and_writes_the_overlay(
    tmp_path, capsys, no_shipped_weights
):
    out_dir = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out_dir), "--train-seconds", "3"]) == 0
    out = capsys.readouterr().out
    assert "no shipped checkpoint: trained a small model on synthetic tasks for" in out
    assert "expect low Dice" in out
    assert "within-subject" in out.lower()
    dice = _dice(out)
    assert set(dice) == {"grey matter", "white matter"}, out
    assert all(0.0 <= d <= 1.0 for d in dice.values())
    png = _png(out)
    assert png.parent == out_dir.resolve() and png.stat().st_size > 10_000
    # the fallback is exported with its card, and the demo runs again from it
    weights = out_dir / "synthetic_fallback.safetensors"
    assert weights.is_file() and weights.with_suffix(".json").is_file()
    assert cli_main(["demo", "--out", str(out_dir), "--checkpoint", str(weights)]) == 0
    again = capsys.readouterr().out
    assert "no shipped checkpoint" not in again and f"checkpoint {weights}" in again
    assert set(_dice(again)) == {"grey matter", "white matter"}


def test_demo_runs_a_given_checkpoint_without_training(tmp_path, capsys):
    weights = _tiny_checkpoint(tmp_path / "tiny.safetensors")
    code = cli_main(
        ["demo", "--out", str(tmp_path / "o"), "--checkpoint", str(weights),
         "--support-size", "4", "--axis", "coronal", "--queries", "2"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"checkpoint {weights}" in out and "trained a small model" not in out
    assert "support: 4 coronal slices" in out
    assert all(0.0 <= d <= 1.0 for d in _dice(out).values()) and len(_dice(out)) == 2
    png = _png(out)
    assert png.name == "mni152_coronal_overlay.png" and png.stat().st_size > 10_000


def test_demo_writes_under_the_work_folder_by_default_and_names_what_it_wrote(
    tmp_path, capsys, monkeypatch
):
    weights = _tiny_checkpoint(tmp_path / "tiny.safetensors")
    monkeypatch.setenv("MEGASEG_WORK", str(tmp_path / "work"))
    assert cli_main(["demo", "--checkpoint", str(weights), "--support-size", "2"]) == 0
    out = capsys.readouterr().out
    wrote = out.split("megaseg demo wrote:\n")[-1]
    png = (tmp_path / "work" / "demo" / "mni152_axial_overlay.png").resolve()
    assert f"overlay PNG: {png}" in wrote and png.is_file()


def test_demo_uses_the_shipped_weights_from_the_registry(tmp_path, capsys, monkeypatch):
    from megaseg.models import UniverSeg, registry

    def demo_tiny(**kwargs):  # a registered model small enough for a unit test
        return UniverSeg(**{**TINY, **kwargs})

    folder = tmp_path / "checkpoints"
    _tiny_checkpoint(folder / "tiny.safetensors")
    monkeypatch.setitem(registry._MODELS, "demo_tiny", demo_tiny)
    monkeypatch.setattr(registry, "_PRETRAINED", {"demo_tiny": {"test": "tiny.safetensors"}})
    monkeypatch.setenv("MEGASEG_CHECKPOINTS", str(folder))
    # found through the registry, so nothing is trained (a zero training budget is fine)
    assert cli_main(["demo", "--out", str(tmp_path / "o"), "--train-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert f"model: shipped tiny ({folder / 'tiny.safetensors'})" in out  # the weights' name
    assert len(_dice(out)) == 2


def test_demo_without_nilearn_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a)
    )
    assert cli_main(["demo", "--out", str(tmp_path)]) == 1
    assert "pip install nilearn" in capsys.readouterr().err


def test_demo_refuses_no_model_and_no_training_budget(tmp_path, capsys, no_shipped_weights):
    assert cli_main(["demo", "--out", str(tmp_path), "--train-seconds", "0"]) == 1
    assert "--checkpoint" in capsys.readouterr().err


def test_support_and_query_slices_are_distinct_and_inside_the_brain():
    from megaseg.demo import pick_slices
    from megaseg.examples import brain_extent

    labels, _ = mni_label()
    for axis in (0, 1, 2):
        lo, hi = brain_extent(labels, axis)
        for size in (1, 2, 8, 32):
            support, query = pick_slices(labels, axis, size)
            assert len(support) == size and len(query) == 3
            assert not set(support) & set(query)
            assert all(lo <= i < hi for i in support + query)
        support, query = pick_slices(labels, axis, 8)
        gap = min(abs(q - s) for q in query for s in support)
        assert gap >= (hi - lo) // 16 - 1  # each query halfway between two support slices
    with pytest.raises(ValueError, match="support-size"):
        pick_slices(labels, 2, 10_000)


def test_mni152_volume_matches_the_test_fixture():
    from megaseg.examples import mni152_slices, mni152_volume

    t1, labels, affine = mni152_volume()
    want, want_affine = mni_label()
    assert t1.shape == labels.shape == MNI_SHAPE and t1.dtype == np.float32
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_allclose(affine, want_affine)
    assert set(np.unique(labels)) == {0, 1, 2}
    images, masks = mni152_slices(t1, labels, 2, [90, 91])
    assert images[0].shape == masks[0].shape == MNI_SHAPE[:2]
    np.testing.assert_array_equal(masks[1], labels[:, :, 91])


def test_mni152_dataset_goes_to_the_work_folder_by_default(tmp_path, monkeypatch):
    from megaseg.examples import write_mni152_nnunet

    monkeypatch.setenv("MEGASEG_WORK", str(tmp_path / "work"))
    folder = write_mni152_nnunet()
    assert folder == tmp_path / "work" / "mni" / "Dataset900_MNI152"
    assert (folder / "labelsTr" / "mni152.nii.gz").is_file()


def test_written_mni152_dataset_is_the_fixture_dataset(tmp_path):
    import json

    import nibabel as nib
    from fixtures_data import write_mni_nnunet

    from megaseg.examples import write_mni152_nnunet

    ours, theirs = write_mni152_nnunet(tmp_path / "a"), write_mni_nnunet(tmp_path / "b")
    assert ours.name == theirs.name
    image = "imagesTr/mni152_0000.nii.gz"
    assert (ours / image).read_bytes() == (theirs / image).read_bytes()
    assert json.loads((ours / "dataset.json").read_text()) == json.loads(
        (theirs / "dataset.json").read_text()
    )
    a, b = (nib.load(str(d / "labelsTr" / "mni152.nii.gz")) for d in (ours, theirs))
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine)
