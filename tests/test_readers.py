"""Readers on tiny datasets written in the exact on-disk layouts (tests/fixtures_data.py)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from fixtures_data import (
    AFFINE,
    MNI_CASE,
    MNI_SHAPE,
    SHAPE_3D,
    TOTALSEG_SHAPE,
    blob_image,
    blob_label,
    break_case,
    mni_label,
    totalseg_masks,
    write_folder2d,
    write_msd,
    write_msd_escaping,
    write_nifti,
    write_nnunet,
    write_totalsegmentator,
)

from data_prep.readers import CaseError, DatasetError, get_reader
from data_prep.specs import get_spec, spec_from_path


def _cases(root, **overrides):
    spec = spec_from_path(root, **overrides)
    reader = get_reader(spec.reader)
    return reader, reader.cases(root, spec)


# --------------------------------------------------------------------------- registry


def test_get_reader_knows_the_three_formats():
    assert {get_reader(n).name for n in ("nnunet", "msd", "folder2d")} == {
        "nnunet",
        "msd",
        "folder",
    }
    with pytest.raises(KeyError, match="known"):
        get_reader("dicom")


# --------------------------------------------------------------------------- nnU-Net v2


def test_nnunet_lists_cases_with_one_file_per_channel(tmp_path):
    root = write_nnunet(tmp_path)
    _, cases = _cases(root)
    assert [c.case_id for c in cases] == ["case_000", "case_001", "case_002"]
    assert [p.name for p in cases[0].image_paths] == [
        "case_000_0000.nii.gz",
        "case_000_0001.nii.gz",
    ]
    assert cases[0].label_path == root / "labelsTr" / "case_000.nii.gz"
    assert cases[0].label_names == {1: "liver", 2: "tumour"}
    assert cases[0].dataset == "Dataset001_Tiny" and cases[0].subject == "case_000"


def test_nnunet_load_is_channel_first_float_with_affine(tmp_path):
    reader, cases = _cases(write_nnunet(tmp_path))
    loaded = reader.load(cases[1])
    assert loaded.image.shape == (2, *SHAPE_3D) and loaded.image.dtype == np.float32
    assert np.issubdtype(loaded.label.dtype, np.integer) and loaded.is_3d
    np.testing.assert_allclose(loaded.affine, AFFINE)
    assert loaded.channel_names == ["T1", "T2"]
    label = blob_label(SHAPE_3D, seed=1)
    np.testing.assert_array_equal(loaded.label, label)
    np.testing.assert_allclose(loaded.image[1], blob_image(label, seed=101, scale=100.0), rtol=1e-6)


def test_nnunet_2d_png(tmp_path):
    reader, cases = _cases(write_nnunet(tmp_path, channels=("gray",), file_ending=".png"))
    loaded = reader.load(cases[0])
    assert loaded.image.shape == (1, 20, 24) and loaded.affine is None and not loaded.is_3d
    assert set(np.unique(loaded.label)) == {0, 1, 2}


def test_nnunet_region_labels_are_skipped_with_a_warning(tmp_path):
    labels = {"background": 0, "whole": [1, 2], "liver": 1, "tumour": 2}
    root = write_nnunet(tmp_path, n_cases=1, labels=labels)
    with pytest.warns(UserWarning, match=r"region labels \['whole'\]"):
        _, cases = _cases(root)
    assert cases[0].label_names == {1: "liver", 2: "tumour"}


def test_subject_regex_groups_cases(tmp_path):
    root = write_nnunet(tmp_path)
    _, cases = _cases(root, subject_regex=r"(?P<subject>case)_\d+")
    assert {c.subject for c in cases} == {"case"}


def test_subject_regex_that_does_not_match_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="does not match case id 'case_000'"):
        _cases(write_nnunet(tmp_path), subject_regex=r"(?P<subject>patient\d+)")


def test_spec_modality_and_labels_override_dataset_json(tmp_path):
    reader, cases = _cases(write_nnunet(tmp_path), modality=("MR", "CT"), labels={1: "organ"})
    assert cases[0].channel_names == ("MR", "CT") and cases[0].label_names == {1: "organ"}


# --------------------------------------------------------------------------- Decathlon


def test_msd_skips_macos_junk_files(tmp_path):
    root = write_msd(tmp_path)
    assert (root / "imagesTr" / "._tiny_000.nii.gz").exists()
    _, cases = _cases(root)
    assert [c.case_id for c in cases] == ["tiny_000", "tiny_001", "tiny_002"]


def test_msd_without_training_list_scans_and_skips_junk(tmp_path):
    _, cases = _cases(write_msd(tmp_path, training_list=False))
    assert [c.case_id for c in cases] == ["tiny_000", "tiny_001", "tiny_002"]


def test_msd_labels_map_value_to_name(tmp_path):
    _, cases = _cases(write_msd(tmp_path))
    assert cases[0].label_names == {1: "edema", 2: "tumour"}
    assert cases[0].channel_names == ("FLAIR", "T1w")


def test_msd_4d_channels_last_become_channel_first(tmp_path):
    reader, cases = _cases(write_msd(tmp_path))
    loaded = reader.load(cases[2])
    assert loaded.image.shape == (2, 12, 14, 10)
    label = blob_label((12, 14, 10), seed=2)
    np.testing.assert_allclose(loaded.image[1], blob_image(label, seed=201), rtol=1e-6)
    np.testing.assert_array_equal(loaded.label, label)


def test_dataset_json_path_outside_the_folder_is_refused(tmp_path):
    root = write_msd_escaping(tmp_path)
    with pytest.raises(DatasetError, match=r"dataset\.json: path '\.\./outside\.nii\.gz'.*outside"):
        _cases(root)


def test_dataset_json_path_through_symlink_outside_is_refused(tmp_path):
    root = write_msd(tmp_path, n_cases=1)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "imagesTr" / "link")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "./imagesTr/link/x.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        _cases(root)


# --------------------------------------------------------------------------- broken cases


@pytest.mark.parametrize(
    "how, message",
    [
        ("corrupt", r"case_001_0000\.nii\.gz: cannot read"),
        ("shape", r"case_001\.nii\.gz: label shape \(15, 16, 16\) does not match"),
        ("affine", r"case_001\.nii\.gz: geometry differs .* by 1 mm"),
        ("nan", r"case_001_0000\.nii\.gz: image holds NaN"),
        ("missing_label", r"case_001\.nii\.gz: label file missing"),
        ("float_label", r"case_001\.nii\.gz: label holds non-integer values"),
    ],
)
def test_broken_case_raises_case_error_naming_file_and_reason(tmp_path, how, message):
    root = write_nnunet(tmp_path)
    break_case(root, how)
    reader, cases = _cases(root)
    reader.load(cases[0])  # the other cases still load
    with pytest.raises(CaseError, match=message):
        reader.load(cases[1])


# --------------------------------------------------------------------------- 2D folders


def test_folder2d_images_and_masks_dirs(tmp_path):
    reader, cases = _cases(write_folder2d(tmp_path))
    assert [c.case_id for c in cases] == ["img_000", "img_001", "img_002"]
    loaded = reader.load(cases[0])
    assert loaded.image.shape == (1, 20, 24) and loaded.affine is None
    np.testing.assert_array_equal(loaded.label, blob_label((20, 24), seed=0, n_labels=1))


def test_folder2d_rgb_becomes_gray_luma(tmp_path):
    reader, cases = _cases(write_folder2d(tmp_path, n_cases=1))
    image = reader.load(cases[0]).image[0]
    mask = blob_label((20, 24), seed=0, n_labels=1) * 255
    r, g = mask // 2 + 20, mask // 3 + 40
    np.testing.assert_allclose(image, 0.299 * r + 0.587 * g + 0.114 * 60, atol=1e-3)


def test_folder2d_mask_suffix_layout(tmp_path):
    reader, cases = _cases(write_folder2d(tmp_path, layout="suffix"))
    assert [c.case_id for c in cases] == ["img_000", "img_001", "img_002"]
    assert cases[0].label_path.name == "img_000_mask.png"
    assert set(np.unique(reader.load(cases[0]).label)) == {0, 1}


def test_folder2d_undeclared_mask_value_is_refused(tmp_path):
    root = write_folder2d(tmp_path, n_cases=1)
    layout = dataclasses.replace(spec_from_path(root).layout, binary=False)
    spec = spec_from_path(root, layout=layout)  # declares {1: "foreground"}, masks hold 255
    reader = get_reader("folder2d")
    with pytest.raises(CaseError, match=r"img_000\.png: label values \[255\] not declared"):
        reader.load(reader.cases(root, spec)[0])


# --------------------------------------------------------------------------- real NIfTI: MNI152


@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    pytest.importorskip("nilearn")
    from fixtures_data import write_mni_nnunet

    root = write_mni_nnunet(tmp_path_factory.mktemp("mni"))
    reader, cases = _cases(root)
    return cases, reader.load(cases[0])


def test_mni_case_is_listed_with_names(mni):
    cases, _ = mni
    assert [c.case_id for c in cases] == [MNI_CASE]
    assert cases[0].label_names == {1: "grey matter", 2: "white matter"}


def test_mni_loads_with_template_shape_affine_and_labels(mni):
    _, loaded = mni
    assert loaded.image.shape == (1, *MNI_SHAPE) and loaded.label.shape == MNI_SHAPE
    np.testing.assert_allclose(loaded.affine[:3, :3], np.eye(3))  # 1 mm, RAS
    np.testing.assert_allclose(loaded.affine[:3, 3], [-98, -134, -72])
    assert set(np.unique(loaded.label)) == {0, 1, 2}
    np.testing.assert_array_equal(loaded.label, mni_label()[0])


def test_mni_white_matter_is_brighter_than_grey_on_t1(mni):
    _, loaded = mni
    t1 = loaded.image[0]
    assert (
        t1[loaded.label == 2].mean() > t1[loaded.label == 1].mean() > t1[loaded.label == 0].mean()
    )


# --------------------------------------------------------------------------- one mask per structure


def _totalseg(tmp_path, **overrides):
    spec = dataclasses.replace(get_spec("TotalSegmentator"), **overrides)
    root = spec.locate(write_totalsegmentator(tmp_path))
    return root, get_reader(spec.reader).cases(root, spec)


def test_structure_masks_are_listed_per_case_in_sorted_order(tmp_path):
    root, cases = _totalseg(tmp_path)
    assert [c.case_id for c in cases] == ["s0000", "s0011"]  # meta.csv is not a case
    assert cases[0].label_path == root / "s0000" / "segmentations"
    names = [n for _, n in cases[0].labels]
    assert names == sorted(names) and len(names) == 20 and "thyroid_gland" not in names
    assert [p.stem.removesuffix(".nii") for p in cases[0].mask_paths] == names
    assert [v for v, _ in cases[0].labels] == list(range(1, 21))


def test_structure_masks_become_one_label_map(tmp_path):
    _, cases = _totalseg(tmp_path, structures=("spleen", "liver", "kidney_left"))
    reader = get_reader("folder")
    loaded = reader.load(cases[1])
    assert cases[1].label_names == {1: "kidney_left", 2: "liver", 3: "spleen"}
    masks = totalseg_masks(seed=1)
    expected = 2 * masks["liver"] + 3 * masks["spleen"]  # kidney_left is an empty mask
    np.testing.assert_array_equal(loaded.label, expected)
    assert loaded.image.shape == (1, *TOTALSEG_SHAPE) and loaded.channel_names == ["CT"]
    np.testing.assert_allclose(loaded.affine, np.diag([-1.5, -1.5, 1.5, 1.0]))


def test_structures_none_reads_every_mask_file(tmp_path):
    _, cases = _totalseg(tmp_path, structures=None)
    names = [n for _, n in cases[0].labels]
    assert len(names) == 22 and {"thyroid_gland", "vertebrae_L1"} <= set(names)
    assert names == sorted(names)


def test_overlapping_structure_masks_are_refused(tmp_path):
    root, cases = _totalseg(tmp_path, structures=("liver", "spleen"))
    liver = totalseg_masks(seed=0)["liver"]
    write_nifti(
        root / "s0000" / "segmentations" / "spleen.nii.gz", liver, np.diag([-1.5, -1.5, 1.5, 1])
    )
    with pytest.raises(
        CaseError, match=r"spleen\.nii\.gz: \d+ voxels of 'spleen' also belong to 'liver'"
    ):
        get_reader("folder").load(cases[0])


def test_missing_structure_mask_names_the_file(tmp_path):
    root, cases = _totalseg(tmp_path)
    (root / "s0011" / "segmentations" / "liver.nii.gz").unlink()
    with pytest.raises(CaseError, match=r"s0011/segmentations/liver\.nii\.gz: label file missing"):
        get_reader("folder").load(cases[1])
