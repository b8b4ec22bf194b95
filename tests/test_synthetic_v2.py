"""Synthetic tasks v2: purity, per-subject geometry, objects on backgrounds, real label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaseg.data import synthetic
from megaseg.data.synthetic import v2 as synthetic_v2
from megaseg.data.synthetic.v2 import (
    GENERATOR_VERSION,
    SyntheticTasksV2,
    SyntheticV2Config,
    preview_png,
)
from megaseg.data.tasks import SyntheticTaskSource

SMALL = SyntheticV2Config(size=64, num_subjects=12)
OBJECTS = SyntheticV2Config(size=64, num_subjects=12, kind_weights=(1.0, 0.0, 0.0))


def _toy_maps(size: int = 64) -> torch.Tensor:
    """Two hand-made label maps: a square (1) beside a bar (2); a cross (1)."""
    maps = torch.zeros(2, size, size, dtype=torch.uint8)
    maps[0, 10:30, 10:30] = 1
    maps[0, 40:44, 8:56] = 2
    maps[1, 28:36, 8:56] = 1
    maps[1, 8:56, 28:36] = 1
    return maps


@pytest.fixture(scope="module")
def tasks() -> SyntheticTasksV2:
    return SyntheticTasksV2(num_tasks=30, config=SMALL, label_maps=_toy_maps())


def test_versions():
    assert GENERATOR_VERSION == 2 and synthetic.GENERATOR_VERSION == 1
    v1 = synthetic.SyntheticTasks(3, config=synthetic.SyntheticConfig(size=64))
    assert SyntheticTasksV2(3, config=SMALL).task_seed(0) != v1.task_seed(0)


def test_pure_function_of_version_and_seed(tasks):
    for t in range(4):
        a_img, a_lab = tasks.subjects(t, [0, 3, 7])
        synthetic_v2._task.cache_clear()
        fresh = SyntheticTasksV2(num_tasks=30, config=SMALL, label_maps=_toy_maps())
        b_img, b_lab = fresh.subjects(t, [7, 3, 0])  # another order, another object, no cache
        assert torch.equal(a_img, b_img.flip(0)) and torch.equal(a_lab, b_lab.flip(0))
        one_img, one_lab = fresh.subject(t, 3)
        assert torch.equal(one_img, a_img[1]) and torch.equal(one_lab, a_lab[1])
    x, _ = tasks.subjects(0, [0, 1])
    y, _ = SyntheticTasksV2(30, 100, SMALL, _toy_maps()).subjects(0, [0, 1])
    assert not torch.equal(x[0], x[1]) and not torch.equal(x, y)


def test_shapes_ranges_and_labels(tasks):
    for t in range(len(tasks)):
        images, labels = tasks.subjects(t, [0, 1])
        assert images.shape == (2, 1, 64, 64) and images.dtype == torch.float32
        assert labels.shape == (2, 64, 64) and labels.dtype == torch.int64
        assert 0 <= images.min() and images.max() <= 1
        assert 0 <= labels.min() and labels.max() <= tasks.num_labels(t)
        _, masks = tasks.batch(t, tasks.num_labels(t) - 1, [0])
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
    kinds = {tasks.kind(t) for t in range(len(tasks))}
    assert kinds == {"objects", "anatomy", "real"}


def test_objects_lie_on_an_unlabelled_background():
    gen = SyntheticTasksV2(num_tasks=24, config=OBJECTS)
    background, present = [], []
    for t in range(len(gen)):
        assert gen.kind(t) == "objects" and 1 <= gen.num_labels(t) <= OBJECTS.max_structures
        _, labels = gen.subjects(t, range(12))
        background.append((labels == 0).float().mean().item())
        for k in range(1, gen.num_labels(t) + 1):
            present.append((labels == k).flatten(1).any(1).float().mean().item())
    assert min(background) > 0.2  # every task has a real background
    assert np.mean(present) > 0.85  # structures stay in view in most subjects


def test_per_subject_geometry_varies_within_a_task():
    """Zoom, position and size differ between subjects of one task: the structure's area
    and centroid spread across subjects."""
    gen = SyntheticTasksV2(num_tasks=24, config=OBJECTS)
    ratios, moves = [], []
    for t in range(len(gen)):
        _, masks = gen.batch(t, 0, range(12))
        area = masks.flatten(1).sum(1)
        keep = area > 0
        if keep.sum() < 4:
            continue
        ratios.append((area[keep].max() / area[keep].min()).item())
        ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        cy = (masks[keep, 0] * ys).sum((1, 2)) / area[keep]
        cx = (masks[keep, 0] * xs).sum((1, 2)) / area[keep]
        moves.append(torch.sqrt(cy.var() + cx.var()).item())
    assert np.median(ratios) > 1.5  # sizes differ by half or more in a typical task
    assert np.median(moves) > 3.0  # centroids move by pixels, not sub-pixels


def test_label_to_image_uses_the_given_label_maps():
    """Without geometry, a real task's subjects carry the given map exactly; contrasts are
    random per task."""
    still = SyntheticV2Config(
        size=64,
        num_subjects=4,
        kind_weights=(0.0, 0.0, 1.0),
        zoom_range=(1.0, 1.0),
        aspect_jitter=0.0,
        rotation_deg=0.0,
        shift=0.0,
        elastic_range=(0.0, 0.0),
        crop_prob_choices=(0.0,),
    )
    maps = _toy_maps()
    gen = SyntheticTasksV2(num_tasks=12, config=still, label_maps=maps)
    order = set()
    for t in range(len(gen)):
        assert gen.kind(t) == "real"
        images, labels = gen.subjects(t, [0, 1])
        index = gen._params(t).map_index
        assert torch.equal(labels[0], maps[index].long()) and torch.equal(labels[1], labels[0])
        assert gen.num_labels(t) == int(maps[index].max())
        if index == 0:
            mean = [images[:, 0][labels == k].mean().item() for k in (0, 1, 2)]
            order.add(tuple(np.argsort(mean)))
    assert len(order) > 1  # intensity order of the labels is random, not fixed by the map


def test_label_maps_are_resized_and_checked():
    gen = SyntheticTasksV2(2, config=SMALL, label_maps=_toy_maps(32))
    assert gen.label_maps.shape == (2, 64, 64)
    gaps = np.zeros((1, 16, 16), np.int64)
    gaps[0, :4], gaps[0, 8:] = 5, 9
    renumbered = SyntheticTasksV2(2, config=SMALL, label_maps=gaps).label_maps
    assert set(renumbered.unique().tolist()) == {0, 1, 2}  # 5 -> 1, 9 -> 2: no empty tasks
    with pytest.raises(ValueError, match="integer"):
        SyntheticTasksV2(2, config=SMALL, label_maps=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="no nonzero label"):
        SyntheticTasksV2(2, config=SMALL, label_maps=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="straddle"):
        SyntheticTasksV2(10, synthetic.HELDOUT_SEED_OFFSET - 5, SMALL)
    with pytest.raises(IndexError):
        gen.batch(0, gen.num_labels(0), [0])
    with pytest.raises(IndexError):
        gen.subjects(0, [SMALL.num_subjects])


def test_mni152_label_maps():
    pytest.importorskip("nilearn")
    maps = synthetic_v2.mni152_label_maps(64)
    assert maps.dtype == torch.uint8 and maps.shape[1:] == (64, 64) and maps.shape[0] >= 30
    assert set(maps.unique().tolist()) == {0, 1, 2, 3}
    brain = ((maps == 1) | (maps == 2)).flatten(1).float().mean(1)
    assert brain.min() > 0.02  # every slice shows brain


def test_works_as_an_episode_source(tasks):
    source = SyntheticTaskSource(tasks)
    key = source.sample_task(np.random.default_rng(0))
    images, labels = source.load(key, [0, 2])
    assert images.shape == labels.shape == (2, 1, 64, 64)
    assert source.num_examples(key) == SMALL.num_subjects


def test_preview_png(tmp_path, tasks):
    out = preview_png(tmp_path / "v2.png", tasks, tasks=[0, 1], subjects=2)
    assert out.stat().st_size > 1000


# Generator v2 output pinned (one task of each kind, subjects 0, 5, 11): pixel counts per label
# value and 4 fixed random projections of each image. Tolerances allow another CPU's float
# rounding (a boundary pixel or two flipping); a change to the generator moves these far more
# and must come with a new GENERATOR_VERSION (stored corpora and checkpoint cards name it).
_V2_PINNED = {
    0: (
        "objects",
        [[4034, 62], [3879, 217], [3910, 186]],
        [
            [-31.074, -4.675, 44.445, 2.161],
            [-36.394, -10.88, 34.372, 0.159],
            [-28.911, -26.585, 18.967, -1.797],
        ],
    ),
    1: (
        "anatomy",
        [
            [2150, 505, 293, 127, 576, 363, 82],
            [2993, 134, 250, 227, 277, 159, 56],
            [1870, 398, 424, 323, 528, 314, 239],
        ],
        [
            [-16.306, -13.435, 5.606, 4.175],
            [-10.918, 24.518, 13.123, -8.572],
            [6.068, 21.048, 1.717, -32.375],
        ],
    ),
    2: (
        "real",
        [[3378, 718], [2874, 1222], [2794, 1302]],
        [
            [-25.813, -17.084, 33.792, -0.123],
            [-44.207, -36.524, 44.795, -6.311],
            [-20.725, -7.511, 48.566, -8.15],
        ],
    ),
}


@pytest.mark.parametrize("task", list(_V2_PINNED))
def test_generator_v2_output_is_pinned(tasks, task):
    kind, counts, projections = _V2_PINNED[task]
    assert tasks.kind(task) == kind
    images, labels = tasks.subjects(task, [0, 5, 11])
    got = torch.stack([torch.bincount(x.flatten(), minlength=len(counts[0])) for x in labels])
    assert (got - torch.tensor(counts)).abs().max() <= 4
    proj = torch.randn(4, 64 * 64, generator=torch.Generator().manual_seed(1234)).double()
    torch.testing.assert_close(
        images[:, 0].flatten(1).double() @ proj.T,
        torch.tensor(projections, dtype=torch.float64),
        atol=1.0,
        rtol=0,
    )


# ------------------------------------------------------------------------------ label-map sets


def test_label_maps_name_accepts_the_known_sets_only():
    from megaseg.data.synthetic.versions import LABEL_MAPS, label_maps_name

    assert label_maps_name(True) == "mni152"
    assert label_maps_name(False) is None and label_maps_name(None) is None
    assert [label_maps_name(n) for n in LABEL_MAPS] == ["mni152", "mni152+spm12"]
    for bad in ("aal", "MNI152", "", 1):
        with pytest.raises(ValueError, match=r"one of \('mni152', 'mni152\+spm12'\)"):
            label_maps_name(bad)


def _fake_packaged_maps(monkeypatch, size: int = 32) -> tuple[torch.Tensor, list[int]]:
    """Two SPM-like maps (label 3 in a box) in place of the spm-runtime wheel's (no network),
    at any size asked; returns them at ``size`` and the list of sizes asked for."""
    import data_prep.specs.packaged as packaged

    def maps(s: int) -> torch.Tensor:
        asked.append(s)
        extra = torch.zeros(2, s, s, dtype=torch.uint8)
        extra[0, s // 4 : s // 2, s // 4 : s // 2] = 3
        extra[1, s // 8 : s // 2, s // 8 : -s // 8] = 3
        return extra

    asked: list[int] = []
    monkeypatch.setattr(packaged, "packaged_label_maps", maps)
    extra = maps(size)
    asked.clear()
    return extra, asked


def test_make_tasks_with_mni152_and_spm12_maps(monkeypatch):
    pytest.importorskip("nilearn")
    from data_prep import label_maps as sets

    extra, asked = _fake_packaged_maps(monkeypatch)
    config = SyntheticV2Config(size=32, num_subjects=4)
    mni = sets.make_tasks(2, 3, 0, config, real_maps="mni152")
    both = sets.make_tasks(2, 3, 0, config, real_maps="mni152+spm12")
    assert asked == [32]  # the packaged maps at the generator's size, only when asked for
    n = mni.label_maps.shape[0]
    assert n == synthetic_v2.mni152_label_maps(32).shape[0]
    assert both.label_maps.shape == (n + 2, 32, 32)
    assert torch.equal(both.label_maps[:n], mni.label_maps)
    assert torch.equal(both.label_maps[n:], (extra > 0).to(both.label_maps.dtype))  # 3 -> 1
    assert both.fingerprint() != mni.fingerprint()
    assert sets.make_tasks(2, 3, 0, config, real_maps=True).fingerprint() == mni.fingerprint()
    assert sets.make_tasks(2, 3, 0, config, real_maps=False).label_maps is None
    with pytest.raises(ValueError, match="real label maps must be"):
        sets.make_tasks(2, 3, 0, config, real_maps="spm12")
    assert torch.equal(sets.label_maps("mni152+spm12", 32)[n:], extra)


def test_label_maps_folder_saves_and_reads_the_maps(monkeypatch, tmp_path):
    """$MEGASEG_LABEL_MAPS: the first call builds and saves the maps, later calls read them
    (no source needed), and a file of the wrong shape is refused with its path."""
    from data_prep import label_maps as sets

    built = []

    def fake(size):
        built.append(size)
        return torch.arange(3 * size * size).reshape(3, size, size).remainder(5).byte()

    monkeypatch.setattr(synthetic_v2, "mni152_label_maps", fake)
    monkeypatch.delenv(sets.LABEL_MAPS_DIR, raising=False)
    direct = sets.label_maps("mni152", 16)
    assert built == [16] and not list(tmp_path.iterdir())  # unset: nothing saved

    monkeypatch.setenv(sets.LABEL_MAPS_DIR, str(tmp_path))
    first = sets.label_maps("mni152", 16)
    saved = tmp_path / "mni152_16.npy"
    assert saved.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["mni152_16.npy"]
    again = sets.label_maps(True, 16)  # True names "mni152"
    assert built == [16, 16]  # read, not rebuilt
    assert torch.equal(first, direct) and torch.equal(again, direct) and again.dtype == torch.uint8

    np.save(saved, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="mni152_16.npy"):
        sets.label_maps("mni152", 16)
    saved.write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"mni152_16\.npy .*not a readable \.npy file"):
        sets.label_maps("mni152", 16)
    assert saved.read_bytes() == b"not an array"  # the user's file is left as it is


def test_label_maps_folder_refuses_a_huge_header_and_paths_of_the_wrong_kind(monkeypatch, tmp_path):
    """A header declaring 2**40 maps over a 200-byte file, a folder where the .npy should be,
    a file where the folder should be: each a ValueError naming the path, nothing allocated."""
    from data_prep import label_maps as sets

    monkeypatch.setattr(synthetic_v2, "mni152_label_maps", lambda size: pytest.fail("built"))
    monkeypatch.setenv(sets.LABEL_MAPS_DIR, str(tmp_path))
    forged = tmp_path / "mni152_16.npy"
    with forged.open("wb") as f:
        np.lib.format.write_array_header_2_0(
            f, {"descr": "|u1", "fortran_order": False, "shape": (2**40, 16, 16)}
        )
        f.write(bytes(200))
    with pytest.raises(ValueError, match=r"mni152_16\.npy .*not a readable \.npy file"):
        sets.label_maps("mni152", 16)
    forged.unlink()
    forged.mkdir()
    with pytest.raises(ValueError, match=r"mni152_16\.npy .*exists but is not a \.npy file"):
        sets.label_maps("mni152", 16)
    not_a_folder = tmp_path / "maps.txt"
    not_a_folder.write_text("x")
    monkeypatch.setenv(sets.LABEL_MAPS_DIR, str(not_a_folder))
    with pytest.raises(ValueError, match=r"maps\.txt .*exists but is not a folder"):
        sets.label_maps("mni152", 16)


# ------------------------------------------------------------------ one synthetic package (#25)


def test_old_generator_paths_warn_and_serve_the_package():
    from megaseg.data.synthetic import versions

    with pytest.warns(DeprecationWarning, match=r"megaseg\.data\.synthetic\.v2\.SyntheticTasksV2"):
        from megaseg.data.synthetic_v2 import SyntheticTasksV2 as old
    assert old is SyntheticTasksV2
    with pytest.warns(DeprecationWarning, match=r"megaseg\.data\.synthetic\.versions\.make_config"):
        from megaseg.data.generators import make_config
    assert make_config is versions.make_config
    with pytest.warns(DeprecationWarning, match=r"data_prep\.label_maps\.make_tasks"):
        from megaseg.data.generators import make_tasks  # the old convention: maps by name
    tasks = make_tasks(2, 2, 0, SyntheticV2Config(size=32, num_subjects=2), real_maps=False)
    assert isinstance(tasks, SyntheticTasksV2) and tasks.label_maps is None
    with pytest.warns(DeprecationWarning, match=r"megaseg\.data\.synthetic\.base\.hash_seed"):
        assert synthetic._hash_seed(1, "a") == synthetic.base.hash_seed(1, "a")


def test_version_switch_takes_maps_as_a_tensor_and_imports_no_torch():
    import subprocess
    import sys

    from megaseg.data.synthetic import versions

    maps = _toy_maps(32)
    config = SyntheticV2Config(size=32, num_subjects=2)
    gen = versions.make_tasks(2, 2, 0, config, label_maps=maps)
    assert torch.equal(gen.label_maps, maps)
    with pytest.raises(ValueError, match="v1 takes no label maps"):
        versions.make_tasks(1, 2, 0, versions.make_config(1), label_maps=maps)
    code = "import sys, megaseg.data.synthetic.versions; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
