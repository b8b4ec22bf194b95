"""data_prep.pipeline: per-case processing (orient, resample, window, slice, resize) and splits."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_data import write_mni_nnunet, write_msd, write_nnunet, write_totalsegmentator

from data_prep.pipeline import PLANES, orient_and_resample, process_case
from data_prep.readers import Case, CaseError, LoadedCase, get_reader
from data_prep.specs import DatasetSpec, get_spec, spec_from_path
from data_prep.splits import assign_splits, natural_split, subject_unit
from data_prep.store_writer import memory_case

RES = (32, 64)


def _first_case(root):
    spec = spec_from_path(root)
    reader = get_reader(spec.reader)
    case = reader.cases(root, spec)[0]
    return spec, case, reader.load(case)


def _memory_case(labels=None) -> Case:
    return memory_case("Mem", "c0", "s0", labels or {1: "organ"})


# -- one case ----------------------------------------------------------------------------------


def test_3d_case_gives_one_task_per_channel_axis_label(tmp_path):
    spec, case, loaded = _first_case(write_nnunet(tmp_path, n_cases=1))
    out = process_case(case, loaded, spec, RES)
    keys = {(m, a, lab) for m, a, lab, *_ in out.examples}
    assert keys == {
        (m, a, lab) for m in ("T1", "T2") for a in PLANES for lab in ("liver", "tumour")
    }
    for r in RES:
        assert out.images[r].dtype == np.uint8 and out.images[r].shape[1:] == (r, r)
        assert out.labels[r].dtype == np.uint8 and out.labels[r].shape[1:] == (r, r)
    # every example's label slice holds its structure; "max" slices hold the most of it
    for *_, lrow, _, kind in out.examples:
        assert out.labels[64][lrow].max() > 0
        assert kind in ("mid", "max")
    # one image per (channel, axis, slice): the two labels share the mid-slice images
    assert len(out.images[64]) < len(out.examples)


def test_multichannel_4d_msd_case(tmp_path):
    spec, case, loaded = _first_case(write_msd(tmp_path, n_cases=1))
    out = process_case(case, loaded, spec, RES)
    assert {m for m, *_ in out.examples} == {"FLAIR", "T1w"}


def test_orientation_to_ras_and_spacing():
    # LPS-stored volume (x flipped): a bright voxel at high x must land at low x in RAS
    image = np.zeros((1, 10, 8, 6), np.float32)
    image[0, 9, 1, 1] = 1.0
    label = np.zeros((10, 8, 6), np.int64)
    label[9, 1, 1] = 2
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    img, lab = orient_and_resample(image, label, affine, (1.0, 1.0, 1.0))
    assert img.shape == (1, 10, 8, 6) and np.argwhere(img[0] == 1).tolist() == [[0, 1, 1]]
    assert np.argwhere(lab == 2).tolist() == [[0, 1, 1]]
    # 2 mm voxels -> 1 mm: shape doubles (minus the last half voxel), labels stay integers
    img, lab = orient_and_resample(image, label, np.diag([2.0, 2.0, 2.0, 1.0]), (1.0, 1.0, 1.0))
    assert lab.shape == (19, 15, 11) and set(np.unique(lab)) <= {0, 2}


def _monai_spacing(image, label, affine, spacing):
    """The reference: MONAI Orientation + Spacing in float64 (bilinear / nearest, zeros)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    aff = torch.as_tensor(affine)
    orient = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    img = orient(MetaTensor(torch.from_numpy(image), affine=aff))
    lab = orient(MetaTensor(torch.from_numpy(label.astype(np.float32))[None], affine=aff))
    img = Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros", dtype=torch.float64)(img)
    lab = Spacing(pixdim=spacing, mode="nearest", padding_mode="zeros", dtype=torch.float64)(lab)
    return img.numpy(), np.rint(lab.numpy()[0]).astype(np.int32)


def _oblique_affine(spacing, shear=0.0):
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[-c, -s, shear], [s, -c, 0], [0, 0, 1]]) @ np.diag(spacing)
    affine[:3, 3] = [110.0, 130.0, -60.0]
    return affine


@pytest.mark.parametrize("shear", [0.0, 0.4], ids=["oblique", "sheared"])
def test_resampling_equals_monai_spacing(shear):
    # spacings chosen so that no output voxel falls exactly halfway between two input voxels
    # (there nearest may round either way); a sheared affine goes through MONAI itself
    rng = np.random.default_rng(0)
    image = rng.normal(0, 100, (2, 13, 11, 7)).astype(np.float32)
    label = rng.integers(0, 4, (13, 11, 7)).astype(np.int32)
    affine = _oblique_affine((0.83, 1.31, 2.3), shear)
    img, lab = orient_and_resample(image, label, affine, (1.0, 1.0, 1.0))
    ref_img, ref_lab = _monai_spacing(image, label, affine, (1.0, 1.0, 1.0))
    assert img.shape == ref_img.shape and img.dtype == np.float32 and lab.dtype == np.int32
    np.testing.assert_allclose(img, ref_img, atol=1e-2)  # float32 rounding, values ~300
    np.testing.assert_array_equal(lab, ref_lab)


def test_volume_already_at_the_spacing_is_only_reoriented():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 6, 5, 4)).astype(np.float32)
    label = rng.integers(0, 3, (6, 5, 4)).astype(np.int32)
    img, lab = orient_and_resample(image, label, np.diag([-1.0, 1.0, 1.0, 1.0]), (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(img, image[:, ::-1])
    np.testing.assert_array_equal(lab, label[::-1])


def test_ct_window_is_fixed_hu():
    # CT: -500..1000 HU -> 0..1, whatever the other voxels are
    image = np.full((1, 8, 8), -1000.0, np.float32)
    image[0, :4] = 250.0
    label = np.zeros((8, 8), np.int64)
    label[:4] = 1
    spec = DatasetSpec(name="Mem", reader="msd", root="", modality="CT")
    out = process_case(_memory_case(), LoadedCase(image, label, None, ["CT"]), spec, (8,))
    assert out.images[8][0, 0, 0] == 128 and out.images[8][0, 7, 0] == 0  # (250+500)/1500*255


@pytest.mark.parametrize(
    "image,label,reason",
    [
        (np.full((1, 6, 6), np.nan, np.float32), np.ones((6, 6), np.int64), "NaN"),
        (np.ones((1, 6, 6), np.float32), np.ones((6, 5), np.int64), "does not match"),
        (np.ones((1, 6, 6), np.float32), np.zeros((6, 6), np.int64), "empty label"),
        (
            np.ones((1, 6, 6), np.float32),
            np.full((6, 6), 7),
            "empty label",
        ),  # only undeclared values
    ],
)
def test_bad_arrays_raise_case_error_naming_the_file(image, label, reason):
    spec = DatasetSpec(name="Mem", reader="msd", root="")
    with pytest.raises(CaseError, match=reason) as err:
        process_case(_memory_case(), LoadedCase(image, label, None, ["MR"]), spec, (8,))
    assert "<memory>/Mem/c0" in str(err.value)


def test_label_absent_from_a_case_gives_no_example_not_an_error():
    label = np.zeros((8, 8), np.int64)
    label[2:5, 2:5] = 1
    case = _memory_case({1: "organ", 2: "tumour"})
    spec = DatasetSpec(name="Mem", reader="msd", root="")
    out = process_case(case, LoadedCase(np.random.rand(1, 8, 8), label, None, ["MR"]), spec, (8,))
    assert [e[2] for e in out.examples] == ["organ"]


def test_structure_masks_give_one_task_per_structure_present(tmp_path):
    spec = get_spec("TotalSegmentator")
    reader = get_reader(spec.reader)
    case = reader.cases(spec.locate(write_totalsegmentator(tmp_path)), spec)[0]
    out = process_case(case, reader.load(case), spec, (16,))
    assert {(a, lab) for _, a, lab, *_ in out.examples} == {
        (a, lab) for a in PLANES for lab in ("liver", "spleen")
    }


def test_real_mni152_template(tmp_path):
    try:
        root = write_mni_nnunet(tmp_path)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    spec, case, loaded = _first_case(root)
    out = process_case(case, loaded, spec, (64,))
    keys = {(a, lab) for _, a, lab, *_ in out.examples}
    assert keys == {(a, lab) for a in PLANES for lab in ("grey matter", "white matter")}
    # slices of a brain: the head fills a good part of the square; each structure is present
    images = out.images[64].astype(np.float32) / 255
    assert all(0.05 < (im > 0.1).mean() < 0.9 for im in images)
    areas = {
        (a, lab, kind): out.labels[64][lrow].mean() / 255
        for _, a, lab, _, lrow, _, kind in out.examples
    }
    assert all(0.01 < v < 0.5 for v in areas.values())


# -- splits ------------------------------------------------------------------------------------


def test_split_is_a_pure_function_of_seed_dataset_subject():
    u = subject_unit(3, "DS", "subject_7")
    assert u == subject_unit(3, "DS", "subject_7") and 0 <= u < 1
    assert u != subject_unit(4, "DS", "subject_7") and u != subject_unit(3, "DS2", "subject_7")


def test_fractions_near_70_15_15():
    split = assign_splits([f"s{i}" for i in range(3000)], "DS", seed=0)
    counts = {s: list(split.values()).count(s) / 3000 for s in ("train", "val", "test")}
    assert abs(counts["train"] - 0.70) < 0.03 and abs(counts["val"] - 0.15) < 0.03


def test_adding_subjects_never_moves_existing_ones():
    for seed in range(5):
        before = assign_splits([f"s{i}" for i in range(40)], "DS", seed)
        after = assign_splits([f"s{i}" for i in range(60)], "DS", seed)
        moved = {s for s in before if before[s] != after[s]}
        # only a subject the small-dataset guarantee had moved may go back to its natural split
        assert all(after[s] == natural_split(subject_unit(seed, "DS", s)) for s in moved)
        assert not moved or all(
            before[s] != natural_split(subject_unit(seed, "DS", s)) for s in moved
        )
    before = assign_splits([f"s{i}" for i in range(200)], "DS", 0)
    after = assign_splits([f"s{i}" for i in range(300)], "DS", 0)
    assert all(before[s] == after[s] for s in before)


def test_three_or_more_subjects_fill_every_split():
    for n in range(3, 12):
        for seed in range(20):
            split = assign_splits([f"p{i}" for i in range(n)], f"D{n}", seed)
            assert set(split.values()) == {"train", "val", "test"}, (n, seed, split)
            moved = [s for s in split if split[s] != natural_split(subject_unit(seed, f"D{n}", s))]
            assert len(moved) <= 2


def test_one_or_two_subjects_keep_their_natural_split():
    for subjects in (["a"], ["a", "b"]):
        split = assign_splits(subjects, "DS", 0)
        assert split == {s: natural_split(subject_unit(0, "DS", s)) for s in subjects}


def test_extra_slices_spread_over_the_label_extent(tmp_path):
    from data_prep.pipeline import extra_slice_indices

    areas = np.array([0, 1, 5, 10, 20, 20, 10, 5, 1, 0])
    assert extra_slice_indices(areas, 0) == [] and extra_slice_indices(np.zeros(4), 3) == []
    assert extra_slice_indices(areas, 2) == [2, 7]  # ends of the >= 25%-of-max run (5 of 20)
    assert extra_slice_indices(areas, 10) == [2, 3, 4, 5, 6, 7]  # all of it, no repeats

    spec, case, loaded = _first_case(write_nnunet(tmp_path, n_cases=1))
    plain = process_case(case, loaded, spec, (16,))
    more = process_case(case, loaded, spec, (16,), extra_slices=3)
    key = lambda ex: (ex[0], ex[1], ex[2], ex[5], ex[6])  # noqa: E731 (rows renumber)
    assert {key(ex) for ex in plain.examples} < {key(ex) for ex in more.examples}
    extra = [ex for ex in more.examples if ex[-1] == "extra"]
    assert extra and all(more.labels[16][lrow].max() > 0 for *_, lrow, _, _ in extra)
    per_task = {}
    for m, a, lab, _, _, index, _ in more.examples:
        per_task.setdefault((m, a, lab), []).append(index)
    assert all(len(v) == len(set(v)) for v in per_task.values())  # no slice twice in a task
