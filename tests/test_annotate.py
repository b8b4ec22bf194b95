"""megaseg.annotate.VolumeSession on a small real volume: the MNI152 template shipped in nilearn,
downsampled 6x (33 x 39 x 32 voxels), with its grey (1) and white (2) matter labels."""

from __future__ import annotations

import numpy as np
import pytest

from megaseg.annotate import VolumeSession

pytest.importorskip("nilearn")

CHECKPOINT = "megaseg_generalist"  # the weights megaseg ships (checkpoints/)


@pytest.fixture(scope="module")
def segmenter():
    from megaseg import Segmenter

    return Segmenter.from_checkpoint(CHECKPOINT, device="cpu")


@pytest.fixture(scope="module")
def mni():
    """``(t1, labels, affine)`` at 6 mm: every 6th voxel of the 1 mm template."""
    from megaseg.examples import mni152_volume

    t1, labels, affine = mni152_volume()
    step = 6
    scaled = affine.copy()
    scaled[:3, :3] *= step
    return t1[::step, ::step, ::step].copy(), labels[::step, ::step, ::step].copy(), scaled


def _session(segmenter, mni, axis=2, **kwargs):
    t1, _, affine = mni
    kwargs.setdefault("progress", False)
    return VolumeSession(segmenter, t1, axis=axis, affine=affine, **kwargs)


def _slice(labels, axis, i):
    return np.take(labels, i, axis=axis)


def _dice(pred, truth, value):
    a, b = pred == value, truth == value
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_labels_stay_where_given(segmenter, mni, axis):
    _, labels, _ = mni
    session = _session(segmenter, mni, axis=axis)
    depth = labels.shape[axis]
    given = {
        depth // 3: _slice(labels, axis, depth // 3),
        depth // 2: _slice(labels, axis, depth // 2),
    }
    # A corrected slice that differs from the truth, and an all-background slice: both kept.
    corrected = _slice(labels, axis, 2 * depth // 3).copy()
    corrected[: corrected.shape[0] // 2] = 0
    given[2 * depth // 3] = corrected
    given[0] = np.zeros_like(corrected)
    for i, lab in given.items():
        session.add(i, lab)
    result = session.segment()
    assert result.labels.shape == labels.shape
    assert result.labelled == tuple(sorted(given))
    for i, lab in given.items():
        np.testing.assert_array_equal(_slice(result.labels, axis, i), lab)
        assert _slice(result.uncertainty, axis, i).max() == 0
        assert result.slice_scores[i] == 0
    unlabelled = [i for i in range(depth) if i not in given]
    assert result.slice_scores[unlabelled].max() > 0


def test_multi_structure_segmentation(segmenter, mni):
    """Both tissues are predicted on unlabelled slices, better than copying the labels of the
    nearest labelled slice (what a user gets without a model)."""
    _, labels, _ = mni
    session = _session(segmenter, mni)
    for i in (10, 16, 22):
        session.add(i, labels[:, :, i])
    result = session.segment()
    assert result.labels.dtype == np.uint8
    mask = np.ones(labels.shape[2], bool)
    mask[[10, 16, 22]] = False
    pred, truth = result.labels[:, :, mask], labels[:, :, mask]
    assert set(np.unique(pred)) == {0, 1, 2}
    nearest = [min((10, 16, 22), key=lambda j: abs(j - i)) for i in range(labels.shape[2])]
    copied = labels[:, :, nearest][:, :, mask]
    for value in (1, 2):
        assert _dice(pred, truth, value) > max(0.4, _dice(copied, truth, value)), value
    assert result.uncertainty.dtype == np.float32
    assert 0 <= result.uncertainty.min() and result.uncertainty.max() <= 1


def test_predictions_change_after_add_and_cache(segmenter, mni):
    """The cache, counted on ``method="model"`` (every unlabelled slice predicted)."""
    _, labels, _ = mni
    session = _session(segmenter, mni, max_support=2, method="model")
    for i in (8, 16, 24):
        session.add(i, labels[:, :, i])
    first = session.segment()
    assert first.predicted == labels.shape[2] - 3
    again = session.segment()  # nothing changed: everything from the cache
    assert again.predicted == 0
    np.testing.assert_array_equal(again.labels, first.labels)

    session.add(12, labels[:, :, 12])
    after = session.segment()
    # Slices whose two nearest labelled slices did not change are not predicted again...
    assert 0 < after.predicted < labels.shape[2] - 4
    np.testing.assert_array_equal(after.labels[:, :, 28:], first.labels[:, :, 28:])
    # ...and slices next to the new one are.
    assert not np.array_equal(after.labels[:, :, 10:15], first.labels[:, :, 10:15])

    # The incremental result equals a fresh session's with the same labelled slices.
    fresh = _session(segmenter, mni, max_support=2, method="model")
    fresh.add_volume(np.where(np.isin(np.arange(32), [8, 12, 16, 24]), labels, 0))
    np.testing.assert_array_equal(fresh.segment().labels, after.labels)

    # A corrected slice invalidates the slices that used it.
    session.add(16, np.zeros_like(labels[:, :, 16]) + (labels[:, :, 16] == 2) * 2)
    corrected = session.segment()
    assert corrected.predicted > 0
    assert not np.array_equal(corrected.labels, after.labels)


def test_ensemble_and_progress(segmenter, mni):
    _, labels, _ = mni
    calls = []
    session = _session(segmenter, mni, max_support=None, ensemble=3, min_ensemble_support=4)
    for i in (6, 12, 18, 24):
        session.add(i, labels[:, :, i])
    result = session.segment(callback=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (result.predicted, result.predicted)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    # Same labelled slices, same answer: the support subsets are drawn deterministically.
    again = _session(segmenter, mni, max_support=None, ensemble=3, min_ensemble_support=4)
    again.add_volume(np.where(np.isin(np.arange(32), [6, 12, 18, 24]), labels, 0))
    np.testing.assert_array_equal(again.segment().uncertainty, result.uncertainty)


def test_suggest_never_returns_labelled_slices(segmenter, mni):
    _, labels, _ = mni
    session = _session(segmenter, mni)
    depth = labels.shape[2]
    first = session.suggest(3)  # nothing labelled yet: evenly spaced
    assert len(first) == 3 and len(set(first)) == 3
    session.add(16, labels[:, :, 16])
    for k in (1, 4):
        picks = session.suggest(k)
        assert len(picks) == k and len(set(picks)) == k
        assert 16 not in picks
        assert all(0 <= p < depth for p in picks)
        # spread out: no suggestion next to the labelled slice
        assert all(abs(p - 16) > 1 for p in picks)
    inside = session.suggest(3, within=(20, 26))
    assert len(inside) == 3 and all(20 <= p < 26 for p in inside)
    with pytest.raises(ValueError, match="within"):
        session.suggest(1, within=(10, 40))
    for i in session.suggest(4):
        session.add(i, _slice(labels, 2, i))
    picks = session.suggest(depth)  # more than there are: every unlabelled slice once
    assert sorted(picks) == [i for i in range(depth) if i not in session.labelled]


def test_suggest_bisects_the_gap_whose_shape_changes_most(segmenter):
    """Filled methods: the middle of the longest gap, and of equal gaps the one across which
    the labelled masks differ most (a disc that shrinks is harder to fill than one that stays)."""
    vol = np.zeros((48, 48, 40), np.float32)
    yy, xx = np.mgrid[:48, :48]
    session = VolumeSession(segmenter, vol, axis=2, progress=False, method="interpolate")
    for z, r in ((10, 8), (20, 8), (30, 3)):
        session.add(z, ((yy - 24) ** 2 + (xx - 24) ** 2 <= r * r).astype(np.int64))
    # gaps 10-20 (same disc) and 20-30 (the disc shrinks), equally long: 20-30 first
    assert session.suggest(2, within=(10, 31)) == [25, 15]
    # told a wider extent, the ends count as gaps where the structure vanishes
    assert session.suggest(1, within=(3, 40)) == [35]
    # told the extent, a longer gap comes first however much a shorter one changes (as
    # even spacing would: ranked by length x change, 22-30, 8 long, shrinking, went first)
    session.remove(20)
    session.add(22, ((yy - 24) ** 2 + (xx - 24) ** 2 <= 64).astype(np.int64))
    assert session.suggest(1, within=(10, 31)) == [16]
    session.remove(22)
    session.add(20, ((yy - 24) ** 2 + (xx - 24) ** 2 <= 64).astype(np.int64))
    # not told: the ends may lie up to one spacing (10) beyond the outermost labelled
    # slices; below 10 the disc is as large as anywhere, so that end comes first, while
    # above 30, where it has nearly vanished, less is left to find than across 20-30
    assert session.suggest(2) == [4, 25]


def test_suggest_not_told_looks_one_spacing_beyond_but_not_past_an_empty_slice(segmenter):
    """Not told the extent: the session follows a structure only about one labelled spacing
    beyond its outermost labelled slices, so where it really ends is unknown by about as much
    (labelled densely, the session's own extent would creep along one slice at a time); a
    slice labelled empty bounds the search."""
    vol = np.zeros((48, 48, 60), np.float32)
    yy, xx = np.mgrid[:48, :48]
    disc = ((yy - 24) ** 2 + (xx - 24) ** 2 <= 64).astype(np.int64)
    session = VolumeSession(segmenter, vol, axis=2, progress=False, method="interpolate")
    for z in (20, 24, 28, 32):
        session.add(z, disc)
    # the same disc throughout: the interior gaps (length 4, Dice 1) score 4; the end
    # gaps reach one spacing (4) beyond the session's extent 20..32 and score 2 * 5
    first, second = session.suggest(2)
    assert {first, second} == {17, 34}
    session.add(34, np.zeros_like(disc))  # absent from 34 on: only 33 is left above
    assert session.suggest(2) == [17, 33]  # 17's shape is not known yet: 15-17 scores 2


def test_suggest_with_only_background_labelled_spreads_distinct_slices(segmenter):
    """Nothing but background labelled: evenly spread slices, never one twice, also when
    nearly every free slice is asked for (rounding evenly spaced points collided there)."""
    vol = np.zeros((16, 16, 28), np.float32)
    session = VolumeSession(segmenter, vol, axis=2, progress=False, method="interpolate")
    for i in (5, 18):
        session.add(i, np.zeros((16, 16), np.int64))
    assert session.suggest(1, within=(10, 16)) == [12]  # the middle of 10-15
    for k in range(1, 8):
        picks = session.suggest(k, within=(10, 16))
        assert len(picks) == len(set(picks)) == min(k, 6)
        assert all(10 <= i < 16 for i in picks)


def test_suggest_weighs_each_structure_not_their_union(segmenter):
    """With several structures, a gap across which a small one moves matters as much as one
    across which a large one changes a little; their union would hide the small one's move."""
    vol = np.zeros((48, 48, 40), np.float32)
    yy, xx = np.mgrid[:48, :48]
    session = VolumeSession(segmenter, vol, axis=2, progress=False, method="interpolate")
    for z, side, small_x in ((0, 30, 5), (10, 30, 42), (20, 28, 42)):
        labels = np.zeros((48, 48), np.int64)
        labels[10 : 10 + side, 10 : 10 + side] = 1  # large: shrinks a little from 10 to 20
        labels[(yy - 5) ** 2 + (xx - small_x) ** 2 <= 9] = 2  # small: moves from 0 to 10
        session.add(z, labels)
    # union Dice: 0.97 across 0-10, 0.93 across 10-20; per structure: 0.5 and 0.97
    assert session.suggest(1, within=(0, 21)) == [5]


def test_save_keeps_affine(segmenter, mni, tmp_path):
    import nibabel as nib

    t1, labels, affine = mni
    src = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(t1, affine), src)
    session = VolumeSession(segmenter, src, axis=1, progress=False)
    session.add(20, labels[:, 20, :])
    out, unc = session.save(tmp_path / "out" / "labels.nii.gz")
    assert unc == tmp_path / "out" / "labels_uncertainty.nii.gz"
    result = session.segment()
    saved, saved_unc = nib.load(out), nib.load(unc)
    np.testing.assert_allclose(saved.affine, affine)
    np.testing.assert_allclose(saved_unc.affine, affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), result.labels)
    np.testing.assert_allclose(saved_unc.get_fdata(), result.uncertainty, atol=1e-6)
    assert saved.get_data_dtype() == np.uint8
    assert sorted(p.name for p in out.parent.iterdir()) == [
        ".megaseg-outputs.json",  # the record of what megaseg wrote (megaseg.outputs)
        "labels.nii.gz",
        "labels_uncertainty.nii.gz",
    ]


def test_array_volume_saves_given_affine(segmenter, mni, tmp_path):
    import nibabel as nib

    _, labels, affine = mni
    session = _session(segmenter, mni)
    session.add(16, labels[:, :, 16])
    out, _ = session.save(tmp_path / "labels.nii")
    np.testing.assert_allclose(nib.load(out).affine, affine)
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        session.save(tmp_path / "labels.png")
    with pytest.raises(ValueError, match=r"unc\.img: .*\.nii or \.nii\.gz"):
        session.save(tmp_path / "labels.nii", tmp_path / "unc.img")
    assert not (tmp_path / "unc.img").exists()


def test_save_replaces_only_its_own_files(segmenter, mni, tmp_path):
    import nibabel as nib

    t1, labels, affine = mni
    src = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(t1, affine), src)
    session = VolumeSession(segmenter, src, progress=False)
    session.add(16, labels[:, :, 16])
    with pytest.raises(ValueError, match="is the input volume"):
        session.save(src, overwrite=True)
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), affine), other)
    with pytest.raises(FileExistsError, match="not written by megaseg"):
        session.save(other)
    np.testing.assert_array_equal(nib.load(other).get_fdata(), 1)  # untouched
    session.save(tmp_path / "labels.nii.gz")
    session.add(20, labels[:, :, 20])
    session.save(tmp_path / "labels.nii.gz")  # its own earlier output: replaced
    saved = nib.load(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(np.asarray(saved.dataobj)[:, :, 20], labels[:, :, 20])
    session.save(other, overwrite=True)
    assert nib.load(other).shape == labels.shape


def test_save_refuses_the_file_of_a_loaded_image(segmenter, mni, tmp_path):
    import nibabel as nib

    t1, labels, affine = mni
    src = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(t1, affine), src)
    session = VolumeSession(segmenter, nib.load(src), progress=False)
    session.add(16, labels[:, :, 16])
    with pytest.raises(ValueError, match="is the input volume"):
        session.save(tmp_path / "labels.nii.gz", src, overwrite=True)
    np.testing.assert_allclose(nib.load(src).get_fdata(), t1)  # the scan is untouched


def test_bad_input_is_refused(segmenter, mni, tmp_path):
    t1, labels, _ = mni
    session = _session(segmenter, mni)
    with pytest.raises(ValueError, match=r"shape \(10, 10\) does not match the slice shape"):
        session.add(3, np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="slice 32 is outside the volume"):
        session.add(32, labels[:, :, 0])
    with pytest.raises(ValueError, match="slice -1 is outside the volume"):
        session.add(-1, labels[:, :, 0])
    with pytest.raises(ValueError, match="integer label values"):
        session.add(3, labels[:, :, 3] * 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        session.add(3, -labels[:, :, 3].astype(np.int16))
    with pytest.raises(ValueError, match="no labelled slice with foreground"):
        session.add(0, np.zeros_like(labels[:, :, 0])).segment()
    with pytest.raises(ValueError, match="label_volume: shape"):
        session.add_volume(labels[:, :, :5])
    for axis in (3, -4, 1.0):
        with pytest.raises(ValueError, match="does not exist"):
            VolumeSession(segmenter, t1, axis=axis)
    with pytest.raises(ValueError, match="expected a 3D volume"):
        VolumeSession(segmenter, t1[:, :, 0])
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        VolumeSession(segmenter, tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="k: must be a positive integer"):
        session.suggest(0)


def test_an_affine_without_voxel_sizes_is_refused(segmenter, mni):
    """A given affine with a zero-length or non-finite voxel axis leaves the slice spacing
    unknown: refused with the reason, not taken as isotropic."""
    t1, _, _ = mni
    for bad in (np.diag([2.0, 2.0, 0.0, 1.0]), np.diag([2.0, np.nan, 2.0, 1.0])):
        with pytest.raises(ValueError, match=r"affine gives voxel sizes .* finite, nonzero"):
            VolumeSession(segmenter, t1, affine=bad, progress=False)


def test_lazy_export():
    import megaseg

    assert megaseg.VolumeSession is VolumeSession


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """notebooks/annotate.ipynb runs on a CPU, offline, writing only under MEGASEG_WORK /
    MEGASEG_NOTEBOOK_OUT (here tmp_path), never into notebooks/."""
    from pathlib import Path

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    before = sorted(notebooks.rglob("*"))
    monkeypatch.setenv("MEGASEG_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MEGASEG_WORK", str(tmp_path / "work"))
    monkeypatch.delenv("MEGASEG_CHECKPOINT", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(notebooks / "annotate.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "clear outputs"
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs
        if "image/png" in o.get("data", {})
    ]  # fmt: skip
    assert len(images) == 3
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == [
        ".megaseg-outputs.json",  # the record of what megaseg wrote (megaseg.outputs)
        "annotate_dice.png",
        "mni152_annotated.nii.gz",
        "mni152_annotated_uncertainty.nii.gz",
    ]
    assert sorted(notebooks.rglob("*")) == before, "the notebook wrote into notebooks/"


# ---------------------------------------------------------------------- guided (issue #20)


@pytest.fixture(scope="module")
def blobs():
    """``(volume, truth)`` (48, 48, 40): a bright blob on slices 8..22 (the structure) and a
    look-alike on slices 30..37 elsewhere in the plane, on noise."""
    rng = np.random.default_rng(0)
    vol = rng.normal(0.2, 0.05, (48, 48, 40)).astype(np.float32)
    xx, yy = np.mgrid[:48, :48]
    truth = np.zeros(vol.shape, np.uint8)
    for z in range(40):
        for lo, hi, cx, value in ((8, 22, 16, 1), (30, 37, 34, 0)):
            if lo <= z <= hi:
                r = 3 + 6 * np.sin(np.pi * (z - lo + 0.5) / (hi - lo + 1))
                disc = (xx - cx) ** 2 + (yy - 24) ** 2 <= r * r
                vol[..., z][disc] = 0.8
                if value:
                    truth[..., z][disc] = value
    return vol, truth


def test_guided_labels_nothing_far_beyond_the_last_labelled_slice(segmenter, blobs):
    vol, truth = blobs
    session = VolumeSession(segmenter, vol, axis=2, progress=False)
    assert session.method == "guided"
    for i in (11, 15, 19):
        session.add(i, truth[..., i])
    result = session.segment()
    assert session.segment().predicted == 0  # cached
    # spacing 4, reach 1: the model may follow the structure to slice 23 at most
    assert not result.labels[..., 24:].any()
    assert not result.labels[..., :7].any()
    assert result.uncertainty[..., 24:].max() == 0  # nothing far away for suggest() to chase
    # between the labelled slices the structure is there
    assert all(result.labels[..., z].any() for z in range(11, 20))
    # only the slices around the structure (and the labelled ones, each from the others)
    # were predicted, not the whole volume
    assert result.predicted < 40 - 3
    assert all(11 - 4 <= i <= 19 + 4 for i in session.suggest(3))


def test_guided_is_deterministic(segmenter, blobs):
    vol, truth = blobs
    results = []
    for _ in range(2):
        session = VolumeSession(segmenter, vol, axis=2, progress=False)
        session.add(15, truth[..., 15])  # one slice: the walks decide where it ends
        results.append(session.segment())
    np.testing.assert_array_equal(results[0].labels, results[1].labels)
    np.testing.assert_array_equal(results[0].uncertainty, results[1].uncertainty)


def test_a_background_slice_says_where_the_structure_is_absent(segmenter, blobs):
    vol, truth = blobs
    session = VolumeSession(segmenter, vol, axis=2, progress=False)
    session.add(15, truth[..., 15])
    session.add(18, np.zeros_like(truth[..., 18]))
    result = session.segment()
    assert not result.labels[..., 18:].any()
    # and between two slices holding it, a background slice splits it
    session.add(11, truth[..., 11]).add(13, np.zeros_like(truth[..., 13]))
    result = session.segment()
    assert not result.labels[..., 13].any()


def test_interpolate_method_needs_no_model_and_methods_are_checked(segmenter, blobs):
    vol, truth = blobs
    session = VolumeSession(segmenter, vol, axis=2, progress=False, method="interpolate")
    session.add(11, truth[..., 11]).add(19, truth[..., 19])
    result = session.segment()
    assert result.predicted == 0
    assert all(result.labels[..., z].any() for z in range(11, 20))
    assert not result.labels[..., :11].any() and not result.labels[..., 20:].any()
    for bad, match in (
        ({"method": "magic"}, "method: 'magic' is not one of guided, model, interpolate"),
        ({"reach": 0}, "reach: must be > 0"),
        ({"prior_weight": 1.5}, r"prior_weight: must be in \[0, 1\]"),
        ({"stride": 0}, "stride: must be an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            VolumeSession(segmenter, vol, **bad)


def test_model_weight_ignores_interpolation_across_disjoint_masks(segmenter, blobs):
    """The model's weight follows which of model and interpolation predicts the labelled
    slices better, each left out in turn; a left-out slice whose neighbours' masks do not
    overlap (a structure moving in the plane, labelled far apart) says nothing about
    interpolation at the real spacing and is not held against it."""
    vol, _ = blobs
    xx, yy = np.mgrid[:48, :48]

    def disc(cx):
        return ((xx - cx) ** 2 + (yy - 24) ** 2 <= 25).astype(np.int64)

    def weight(centres, model_centres):
        session = VolumeSession(segmenter, vol, axis=2, progress=False)
        for z, cx in centres.items():
            session.add(z, disc(cx))
        probs = {z: disc(cx)[None].astype(np.float32) for z, cx in model_centres.items()}
        return session._model_weight(probs, 0, 1)

    # overlapping neighbours (the disc moves 4 px a slice): interpolation is scored; a model
    # that is right gets more than half the weight, one that is off (by 6 px) less
    still = {10: 16, 12: 20, 14: 24}
    assert weight(still, still) > 0.5
    assert weight(still, {z: cx + 6 for z, cx in still.items()}) < 0.5
    # disjoint neighbours (8 px a slice, radius 5): interpolating 12 from 10 and 14 yields
    # nothing; not scored, it leaves no evidence: the middle weight, not the model's 0.9
    moving = {10: 8, 12: 16, 14: 24}
    half_right = {z: cx + 4 for z, cx in moving.items()}  # Dice about 0.5
    assert weight(moving, half_right) == 0.5


def test_thinned_keeps_labelled_slices_and_the_ends_of_each_run():
    from megaseg.annotate import _thinned

    # slice 5 labelled (scored), 12 missing: runs 0..4, 6..11, 13..14
    targets = [i for i in range(15) if i != 12]
    assert _thinned(targets, {5: None, 12: None}, 3) == [0, 3, 4, 5, 6, 9, 11, 13, 14]
    assert _thinned(targets, {5: None, 12: None}, 1) == targets


def test_guided_stride_predicts_fewer_slices_and_mixes_the_rest(segmenter, blobs):
    """stride=1 predicts every slice it fills; the default predicts about a third of them,
    and the slices it predicts get the same probabilities as with stride=1."""
    vol, truth = blobs
    results = {}
    for stride in (1, 3):
        session = VolumeSession(segmenter, vol, axis=2, progress=False, stride=stride)
        for i in (9, 21):
            session.add(i, truth[..., i])
        results[stride] = (session.segment(), session)
    every, thin = results[1][0], results[3][0]
    # runs 0..8 (a walk down to the volume's start), 10..20 (between), 22..39 (a walk up:
    # one spacing, 12, and on to the volume's end, within one more) and the 2 labelled
    # slices: 9 + 11 + 18 + 2, against 4 + 5 + 7 + 2
    assert every.predicted == 40 and thin.predicted == 18
    assert results[3][1].stride == 3
    # slice 10 is predicted at both strides (the first of its run; batched with other slices,
    # so equal to float rounding); 11 is mixed from 10 and 13
    np.testing.assert_allclose(every.uncertainty[..., 10], thin.uncertainty[..., 10], atol=1e-4)
    assert np.abs(every.uncertainty[..., 11] - thin.uncertainty[..., 11]).max() > 1e-3
    # and the structure between the labelled slices is found about as well
    for z in range(10, 21):
        a, b = every.labels[..., z] == 1, thin.labels[..., z] == 1
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8


def test_predict_volume_labels_only_the_slices_asked_for(segmenter, blobs):
    vol, truth = blobs
    segmenter.set_support([vol[..., 15]], [truth[..., 15]], modality="MR")
    labels, probs = segmenter.predict_volume(vol, axis=2, slices=(10, 21), return_probs=True)
    assert labels.shape == vol.shape
    assert not labels[..., :10].any() and not labels[..., 21:].any()
    assert probs[..., :10].max() == 0 and probs[..., 10:21].max() > 0
    for bad in ((5, 5), (-1, 3), (0, 41), (1.5, 3), "ab"):
        with pytest.raises(ValueError, match="slices: .* is not a range"):
            segmenter.predict_volume(vol, axis=2, slices=bad)


def test_guided_stops_where_a_look_alike_goes_on_past_the_labelled_end(segmenter):
    """A section of a tube that goes on unchanged (a vertebral column section, labelled on
    its own): beyond the outermost labelled slice the model sees no end, so the labels'
    taper decides how far the structure goes; the model alone would paint the tube on."""
    vol = np.random.default_rng(1).normal(0.2, 0.05, (48, 48, 40)).astype(np.float32)
    xx, yy = np.mgrid[:48, :48]
    disc = (xx - 24) ** 2 + (yy - 24) ** 2 <= 49
    vol[disc] = 0.8  # the tube, on every slice
    labels = np.zeros(vol.shape, np.uint8)
    labels[disc, 12:23] = 1  # the section the user labels: slices 12..22
    # the model alone between labelled slices (as where it beats interpolation there)
    session = VolumeSession(segmenter, vol, axis=2, progress=False, prior_weight=0.0)
    for i in (14, 17, 20):
        session.add(i, labels[..., i])
    area = disc.sum()
    model = VolumeSession(segmenter, vol, axis=2, progress=False, method="model")
    for i in (14, 17, 20):
        model.add(i, labels[..., i])
    alone = model.segment().labels
    assert all((alone[..., z] == 1).sum() > 0.8 * area for z in (23, 26, 29))  # no end seen
    result = session.segment().labels
    painted = [int((result[..., z] == 1).sum()) for z in range(40)]
    # between the labelled slices: the tube; one spacing (3) beyond: shrinking, then nothing
    assert all(p > 0.8 * area for p in painted[14:21])
    assert painted[23] < 0.7 * area and painted[23] <= painted[22] <= painted[21]
    assert painted[11] < 0.7 * area and painted[11] <= painted[12] <= painted[13]
    assert not any(painted[24:]) and not any(painted[:11])


def test_a_structure_the_volume_cuts_is_followed_to_the_volume_end(segmenter):
    """The same tube labelled near the volume's end (the field of view cuts it, as the skull
    base of a head CT): the volume ends within one more spacing, where the model's "no end
    seen" says nothing, so the session follows it to the end slice; at its other end, far
    from the volume's end, the labels' taper still decides."""
    vol = np.random.default_rng(1).normal(0.2, 0.05, (48, 48, 40)).astype(np.float32)
    xx, yy = np.mgrid[:48, :48]
    disc = (xx - 24) ** 2 + (yy - 24) ** 2 <= 49
    vol[disc] = 0.8
    area = disc.sum()
    session = VolumeSession(segmenter, vol, axis=2, progress=False, prior_weight=0.0)
    for i in (28, 31, 34):  # spacing 3; the volume ends 5 slices past 34
        session.add(i, disc.astype(np.int64))
    painted = [int((session.segment().labels[..., z] == 1).sum()) for z in range(40)]
    assert all(p > 0.8 * area for p in painted[28:40])  # on to the last slice
    assert painted[25] < 0.7 * area and not any(painted[:24])  # the taper below


def test_one_labelled_slice_is_followed_no_further_than_the_structure_is_wide(segmenter):
    """One labelled slice of a tube that goes on through the volume (the model follows it):
    with no spacing known, the session labels no further along the axis than the structure's
    in-plane extent (15 pixels), in slices by the voxel sizes; suggest() looks there too.
    Was: the tube to the volume's ends."""
    vol = np.random.default_rng(1).normal(0.2, 0.05, (48, 48, 60)).astype(np.float32)
    xx, yy = np.mgrid[:48, :48]
    disc = (xx - 24) ** 2 + (yy - 24) ** 2 <= 49
    vol[disc] = 0.8  # the tube, on every slice
    area = disc.sum()
    for affine, reach in ((None, 15), (np.diag([1.0, 1.0, 3.0, 1.0]), 5)):
        session = VolumeSession(segmenter, vol, axis=2, progress=False, affine=affine)
        session.add(30, disc.astype(np.int64))
        result = session.segment().labels
        painted = [int((result[..., z] == 1).sum()) for z in range(60)]
        assert all(p > 0.8 * area for p in painted[30 - reach : 31 + reach])  # followed
        assert not any(painted[: 30 - reach]) and not any(painted[31 + reach :])
        assert all(abs(i - 30) <= reach + 1 for i in session.suggest(2))


def test_ends_asks_the_model_one_more_spacing():
    from megaseg.annotate import _ends

    first = np.zeros((32, 32), bool)
    first[10:20, 10:20] = True
    on = np.where(first, 0.95, 0.02).astype(np.float32)
    off = np.full((32, 32), 0.02, np.float32)
    probs = {6: [off], 7: [on]}
    assert not _ends(first, [on], probs, 7, 0)  # still there one spacing later
    assert _ends(first, [on], probs, 6, 0)  # gone by then
    assert _ends(first, [on, off], probs, 7, 0)  # gone on the way
    assert _ends(first, [on], probs, None, 0)  # nothing to look at: the volume's end


def test_densely_labelled_the_session_paints_no_look_alike_beyond_the_labels(segmenter):
    """Labelled under two slices apart, the structure ends within about a slice of its
    outermost labelled slices: where the model shows no end there (a tube that goes on, as
    the next vertebra of a spine section), nothing is painted beyond them; where the image
    shows the end, the model's mask still is (the structure's last slices)."""
    vol = np.random.default_rng(1).normal(0.2, 0.05, (48, 48, 40)).astype(np.float32)
    xx, yy = np.mgrid[:48, :48]
    disc = (xx - 24) ** 2 + (yy - 24) ** 2 <= 49
    area = disc.sum()
    ending = vol.copy()
    vol[disc] = 0.8  # the tube, on every slice
    ending[disc, 12:23] = 0.8  # a tube on slices 12..22 only
    for image, beyond in ((vol, False), (ending, True)):
        session = VolumeSession(segmenter, image, axis=2, progress=False, prior_weight=0.0)
        for i in (13, 14, 16, 17, 19, 20, 21):  # spacing 8 / 6 slices
            session.add(i, disc.astype(np.int64))
        result = session.segment()
        painted = [int((result.labels[..., z] == 1).sum()) for z in range(40)]
        assert all(p > 0.8 * area for p in painted[13:22])
        assert not any(painted[:12]) and not any(painted[23:])
        if beyond:  # the model sees the tube end: its last slices painted
            assert painted[12] > 0.8 * area and painted[22] > 0.8 * area
        else:  # no end seen: nothing beyond, but the model's doubt is shown there
            assert painted[12] == 0 and painted[22] == 0
            assert result.uncertainty[..., 22].max() > 0.5
