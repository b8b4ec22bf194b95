"""Dataset specs: the catalog, ad-hoc specs, overlaps, and catalog specs on their real layouts."""

from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pytest
from fixtures_data import (
    write_acdc,
    write_brats,
    write_drive,
    write_folder2d,
    write_isic,
    write_msd,
    write_nnunet,
    write_totalsegmentator,
    write_wbc,
)

from data_prep.readers import READERS, DatasetError, get_reader
from data_prep.specs import (
    CATALOG,
    KNOWN_OVERLAPS,
    DatasetSpec,
    FolderLayout,
    get_spec,
    list_specs,
    overlaps_among,
    spec_from_path,
)

# --------------------------------------------------------------------------- catalog


def test_catalog_has_at_least_twelve_uniquely_named_datasets():
    names = list_specs()
    assert len(names) >= 12 and len({n.lower() for n in names}) == len(names)


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_every_catalog_spec_is_readable_and_documented(spec):
    assert spec.reader in READERS
    assert spec.source and spec.citation and spec.licence
    if spec.labels is not None:
        assert 0 not in spec.labels
        assert 0 not in spec.label_names


def test_get_spec_is_case_insensitive_and_lists_names_when_unknown():
    assert get_spec("acdc") is get_spec("ACDC")
    with pytest.raises(KeyError, match="Task02_Heart"):
        get_spec("no-such-dataset")


def test_spec_is_frozen_with_read_only_labels():
    spec = get_spec("ACDC")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"
    with pytest.raises(TypeError):
        spec.labels[9] = "x"
    assert hash(spec) == hash(get_spec("ACDC"))


def test_spec_pickles_and_keeps_labels_as_sorted_pairs():
    spec = DatasetSpec(name="x", reader="msd", root="x", labels={2: "b", 1: "a"}, planes=[2])
    assert spec.labels == ((1, "a"), (2, "b")) and spec.label_names == {1: "a", 2: "b"}
    assert spec.planes == (2,)  # lists from a YAML spec file become tuples
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and hash(again) == hash(spec)
    assert DatasetSpec(name="x", reader="msd", root="x", labels=[(1, "a")]).label_names == {1: "a"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=(10, 0)), "window"),
        (dict(planes=(3,)), "planes"),
        (dict(reader="folder2d"), "needs a layout"),
        (dict(subject_regex=r"patient\d+"), "subject"),
        (dict(structures=("liver",)), "label template names {structure}"),
        (
            dict(
                reader="folder",
                layout=FolderLayout("*/ct.nii.gz", "{dir}/{structure}.nii.gz"),
                labels={1: "liver"},
            ),
            "give structures, not labels",
        ),
    ],
)
def test_invalid_spec_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DatasetSpec(**{"name": "x", "reader": "msd", "root": "x", **kwargs})


def test_amos_case_regexes_split_ct_from_mr():
    ct, mr = get_spec("AMOS22-CT").case_regex, get_spec("AMOS22-MRI").case_regex
    ids = ["amos_0001", "amos_0410", "amos_0500", "amos_0501", "amos_0540", "amos_0600"]
    assert [i for i in ids if re.fullmatch(ct, i)] == ids[:3]
    assert [i for i in ids if re.fullmatch(mr, i)] == ids[3:]


# --------------------------------------------------------------------------- locate, ad hoc


def test_locate_tries_root_then_name(tmp_path):
    spec = get_spec("Task02_Heart")
    (tmp_path / "Task02_Heart").mkdir()
    assert spec.locate(tmp_path) == tmp_path / "Task02_Heart"
    with pytest.raises(FileNotFoundError, match="KiTS21"):
        get_spec("KiTS21").locate(tmp_path)


@pytest.mark.parametrize(
    "write, reader",
    [(write_nnunet, "nnunet"), (write_msd, "msd"), (write_folder2d, "folder2d")],
)
def test_spec_from_path_detects_the_format(tmp_path, write, reader):
    root = write(tmp_path)
    spec = spec_from_path(root)
    assert spec.reader == reader and spec.name == root.name
    assert spec.locate("/anywhere") == root.resolve()  # an absolute root wins
    assert len(get_reader(spec.reader).cases(root, spec)) == 3


def test_spec_from_path_refuses_an_unknown_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="describe the layout"):
        spec_from_path(tmp_path)


def test_case_regex_keeps_only_matching_cases(tmp_path):
    root = write_msd(tmp_path)
    spec = spec_from_path(root, case_regex=r"tiny_00[02]")
    assert [c.case_id for c in get_reader("msd").cases(root, spec)] == ["tiny_000", "tiny_002"]


# --------------------------------------------------------------------------- overlaps


def test_known_overlaps_have_reasons_and_are_found_among_names():
    assert all(o.reason and o.a != o.b for o in KNOWN_OVERLAPS)
    found = overlaps_among(["kits19", "KiTS21", "ACDC"])
    assert [(o.a, o.b) for o in found] == [("KiTS19", "KiTS21")]


# --------------------------------------------------------------------------- real layouts


def _read(name, data_dir):
    spec = get_spec(name)
    reader = get_reader(spec.reader)
    cases = reader.cases(spec.locate(data_dir), spec)
    return cases, [reader.load(c) for c in cases]


def test_acdc_layout_pairs_frames_with_gt_and_groups_by_patient(tmp_path):
    cases, loaded = _read("ACDC", write_acdc(tmp_path))
    assert [c.case_id for c in cases] == [
        "patient001_frame01",
        "patient001_frame12",
        "patient002_frame01",
        "patient002_frame12",
    ]
    assert [c.subject for c in cases] == ["patient001"] * 2 + ["patient002"] * 2
    assert loaded[0].image.shape == (1, 12, 12, 6) and loaded[0].channel_names == ["cine-MRI"]
    assert set(np.unique(loaded[0].label)) <= {0, 1, 3}


def test_brats_layout_stacks_four_sequence_files(tmp_path):
    cases, loaded = _read("BraTS2021", write_brats(tmp_path))
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert [p.name for p in cases[0].image_paths][2] == "BraTS2021_00000_t1ce.nii.gz"
    assert loaded[0].image.shape == (4, 10, 10, 8)
    assert loaded[0].channel_names == ["FLAIR", "T1", "T1ce", "T2"]
    assert set(np.unique(loaded[0].label)) == {0, 2, 4}


def test_drive_layout_reads_tif_and_gif_manual(tmp_path):
    cases, loaded = _read("DRIVE", write_drive(tmp_path))
    assert [c.label_path.name for c in cases] == ["21_manual1.gif", "22_manual1.gif"]
    assert loaded[0].image.shape == (1, 18, 20) and set(np.unique(loaded[0].label)) == {0, 1}


def test_isic_layout_pairs_jpg_with_segmentation_png(tmp_path):
    cases, loaded = _read("ISIC2018", write_isic(tmp_path))
    assert [c.case_id for c in cases] == ["ISIC_0000000", "ISIC_0000001"]  # LICENSE.txt ignored
    assert loaded[1].image.shape == (1, 16, 20) and set(np.unique(loaded[1].label)) == {0, 1}


def test_wbc_layout_keeps_grey_level_labels(tmp_path):
    cases, loaded = _read("WBC-JTSC", write_wbc(tmp_path))
    assert [c.case_id for c in cases] == ["001", "002"]
    assert set(np.unique(loaded[0].label)) == {0, 128, 255}
    assert cases[0].label_names == {128: "cytoplasm", 255: "nucleus"}


def test_folder_layout_template_with_unknown_field_is_refused(tmp_path):
    root = write_folder2d(tmp_path, n_cases=1)
    layout = FolderLayout(images="images/*", label="masks/{nope}.png", binary=True)
    spec = spec_from_path(root, layout=layout)
    with pytest.raises(DatasetError, match="unknown field 'nope'"):
        get_reader("folder2d").cases(root, spec)


def test_totalsegmentator_layout_reads_the_default_organs(tmp_path):
    cases, loaded = _read("TotalSegmentator", write_totalsegmentator(tmp_path))
    assert [c.case_id for c in cases] == ["s0000", "s0011"] and len(cases[0].mask_paths) == 20
    names = get_spec("TotalSegmentator").label_names
    assert cases[0].label_names == names
    value = {n: v for v, n in names.items()}
    assert set(np.unique(loaded[0].label)) == {0, value["liver"], value["spleen"]}
    assert loaded[0].channel_names == ["CT"] and loaded[0].image.min() == -1000


@pytest.mark.parametrize("k", [True, -1, 65, 2.0, "3", None])
def test_slices_per_plane_must_be_an_integer_in_0_64(k):
    message = r"spec 'x': slices_per_plane must be an integer in \[0, 64\]"
    with pytest.raises(ValueError, match=message):
        DatasetSpec(name="x", reader="msd", root="x", slices_per_plane=k)


def test_slices_per_plane_defaults():
    assert DatasetSpec(name="x", reader="msd", root="x", slices_per_plane=64).slices_per_plane == 64
    assert DatasetSpec(name="x", reader="msd", root="x").slices_per_plane == 0
    assert get_spec("PkgNimare").slices_per_plane == 6  # template sources: more than 2 slices
