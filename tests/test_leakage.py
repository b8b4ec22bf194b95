"""data_prep.leakage: near-duplicate slices across datasets and splits, and declared overlaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_data import write_image
from scipy.ndimage import gaussian_filter

from data_prep.leakage import ImageRef, leakage_report, near_duplicates, thumbnails
from megaseg.cli.prep import main


def _smooth_image(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    x = gaussian_filter(rng.normal(size=(size, size)), 3)
    return np.clip((x - x.min()) / (x.max() - x.min()) * 255, 0, 255)


def _write_2d_dataset(folder: Path, images: list[np.ndarray]) -> Path:
    for i, image in enumerate(images):
        write_image(folder / "images" / f"im_{i:03d}.png", image)
        write_image(folder / "masks" / f"im_{i:03d}.png", (image > np.median(image)) * 255)
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two datasets of distinct random images; LiTS holds a noisy re-save of Task03_Liver's image 2."""
    tmp = tmp_path_factory.mktemp("leak")
    rng = np.random.default_rng(0)
    a_images = [_smooth_image(rng) for _ in range(6)]
    b_images = [_smooth_image(rng) for _ in range(5)]
    b_images.append(np.clip(a_images[2] + rng.normal(0, 3, a_images[2].shape), 0, 255))
    a = _write_2d_dataset(tmp / "Task03_Liver", a_images)
    b = _write_2d_dataset(tmp / "LiTS", b_images)
    out = tmp / "corpus"
    assert (
        main(["build", str(a), str(b), "--out", str(out), "--resolutions", "64", "--no-progress"])
        == 0
    )
    return out


def test_planted_near_duplicate_found_across_datasets(planted):
    report = leakage_report(planted)
    assert report["images"] == 12 and report["cross_dataset"] == 1
    (pair,) = [p for p in report["pairs"] if p["kind"] == "cross-dataset"]
    assert {pair["a"]["dataset"], pair["b"]["dataset"]} == {"Task03_Liver", "LiTS"}
    assert {pair["a"]["subject"], pair["b"]["subject"]} == {"im_002", "im_005"}
    assert pair["correlation"] > 0.98


def test_known_overlaps_reported(planted, capsys):
    assert [o["b"] for o in leakage_report(planted)["known_overlaps"]] == ["LiTS"]
    assert main(["verify", str(planted)]) == 0
    out = capsys.readouterr().out
    assert "1 cross-dataset" in out and "known overlap: Task03_Liver ~ LiTS" in out


def test_cross_split_pairs_and_chunking():
    rng = np.random.default_rng(1)
    images = np.stack([_smooth_image(rng, 64) for _ in range(7)]).astype(np.uint8)
    images[5] = images[1]  # same dataset, other split: reported
    images[6] = images[2]  # same dataset, same split: not leakage
    refs = [ImageRef("D", i, f"s{i}", "train") for i in range(7)]
    refs[5] = ImageRef("D", 5, "s5", "test")
    thumbs = thumbnails(images)
    assert thumbs.shape == (7, 1024)
    np.testing.assert_allclose(np.linalg.norm(thumbs.astype(np.float32), axis=1), 1, rtol=1e-3)
    for chunk in (2, 3, 100):  # pairs straddling chunk borders are found once
        pairs = near_duplicates(thumbs, refs, chunk=chunk)
        assert [(p.kind, p.a.row, p.b.row) for p in pairs] == [("cross-split", 1, 5)]


def test_blank_images_are_not_compared():
    images = np.zeros((3, 64, 64), np.uint8)
    refs = [ImageRef(d, i, "s", "train") for i, d in enumerate("ABC")]
    assert near_duplicates(thumbnails(images), refs) == []
