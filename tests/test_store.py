"""megaseg.data.store: the read API over a corpus built by data_prep, and held-out protocols."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import write_folder2d
from PIL import Image

from data_prep.pipeline import AXIS_2D, build_corpus, job_from_spec, write_dataset
from data_prep.readers import LoadedCase
from data_prep.specs import DatasetSpec, spec_from_path
from data_prep.store_writer import memory_case
from megaseg.data import Corpus, CorpusError, TaskKey, load_protocol
from megaseg.preprocess import prepare_image

REPO = Path(__file__).resolve().parents[1]
RES = (32, 64)


class ArrayLoader:
    """In-memory source of 2D cases: random images, a disc (label 1) and a square (label 2)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, case) -> LoadedCase:
        rng = np.random.default_rng([self.seed, int(case.case_id[1:])])
        h, w = 40, 30
        yy, xx = np.mgrid[:h, :w]
        label = np.zeros((h, w), np.int64)
        label[(yy - rng.integers(12, 28)) ** 2 + (xx - 15) ** 2 < 36] = 1
        label[2:6, 2:6] = 2
        return LoadedCase(
            rng.normal(size=(1, h, w)).astype(np.float32) + label, label, None, ["MR"]
        )


def write_memory_dataset(out: Path, name: str, n: int, seed: int = 0, **options):
    cases = [memory_case(name, f"c{i}", f"subject{i}", {1: "disc", 2: "square"}) for i in range(n)]
    spec = DatasetSpec(name=name, reader="memory", root="", licence="CC0", source="tests")
    return write_dataset(out, spec, cases, ArrayLoader(seed), lambda c: f"v1-{seed}-{c.case_id}",
                         resolutions=RES, progress=False, **options)  # fmt: skip


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "corpus"
    write_memory_dataset(out, "Alpha", 8)
    write_memory_dataset(out, "Beta", 6, seed=1)
    return out


def test_tasks_counts_and_splits(corpus_root):
    corpus = Corpus(corpus_root)
    assert corpus.datasets == ["Alpha", "Beta"]
    keys = corpus.tasks("train")
    assert keys == sorted(keys)
    assert TaskKey("Alpha", "all", "MR", AXIS_2D, "disc") in keys
    for key in keys:
        n = {s: corpus.num_examples(key, s) for s in ("train", "val", "test")}
        assert sum(n.values()) == (8 if key.dataset == "Alpha" else 6)
        subjects = {s: set(corpus.subjects(key, s)) for s in n}
        assert not (subjects["train"] & subjects["val"]) and not (
            subjects["train"] & subjects["test"]
        )
        assert all(len(corpus.subjects(key, s)) == n[s] for s in n)
    splits = corpus.manifest["datasets"]["Alpha"]["splits"]
    assert all(len(splits[s]) >= 1 for s in ("train", "val", "test"))


def test_load_and_load_many(corpus_root):
    corpus = Corpus(corpus_root)
    key = corpus.tasks("train")[0]
    n = corpus.num_examples(key, "train")
    image, label = corpus.load(key, 0, 64, "train")
    assert image.shape == label.shape == (1, 64, 64)
    assert image.dtype == label.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1 and 0 <= label.min() and label.max() <= 1
    idx = [n - 1, 0, n - 1]
    images, labels = corpus.load_many(key, idx, 32, "train")
    assert images.shape == labels.shape == (3, 1, 32, 32)
    for row, i in enumerate(idx):
        im, lb = corpus.load(key, i, 32, "train")
        np.testing.assert_array_equal(images[row], im)
        np.testing.assert_array_equal(labels[row], lb)
    with pytest.raises(IndexError):
        corpus.load(key, n, 64, "train")
    with pytest.raises(ValueError, match="resolution 128"):
        corpus.load(key, 0, 128, "train")


def test_resolutions_of_a_dataset(corpus_root):
    corpus = Corpus(corpus_root)
    assert corpus.resolutions("Alpha") == RES
    with pytest.raises(KeyError, match="Alpha, Beta"):
        corpus.resolutions("Gamma")


def test_excluded_dataset_never_served_for_training(corpus_root, tmp_path):
    protocol = tmp_path / "heldout.yaml"
    protocol.write_text("name: heldout-beta\nheld_out: [beta]\n")
    corpus = Corpus(corpus_root, exclude=load_protocol(protocol))
    for split in ("train", "val"):
        assert corpus.tasks(split) and all(k.dataset == "Alpha" for k in corpus.tasks(split))
    beta = TaskKey("Beta", "all", "MR", AXIS_2D, "disc")
    for call in (
        lambda s: corpus.load(beta, 0, 64, s),
        lambda s: corpus.load_many(beta, [0], 64, s),
        lambda s: corpus.num_examples(beta, s),
        lambda s: corpus.subjects(beta, s),
    ):
        for split in ("train", "val"):
            with pytest.raises(ValueError, match=r"'Beta'.*'heldout-beta'"):
                call(split)
    # held-out datasets are for evaluation: their test split stays available
    assert beta in corpus.tasks("test")
    assert corpus.load(beta, 0, 64, "test")[0].shape == (1, 64, 64)
    # plain names and shell patterns, any case
    assert all(k.dataset == "Beta" for k in Corpus(corpus_root, exclude=["ALP*"]).tasks("train"))
    assert not Corpus(corpus_root).tasks("train", exclude=["alpha", "beta"])


def test_default_protocol_file():
    protocol = load_protocol(REPO / "configs" / "protocols" / "default.yaml")
    assert protocol.name == "default" and {"ACDC", "STARE", "WBC-*"} <= protocol


def test_incomplete_corpus_and_other_format_refused(corpus_root, tmp_path):
    with pytest.raises(CorpusError, match="no manifest.json"):
        Corpus(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.loads((corpus_root / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"format_version": 999}))
    with pytest.raises(CorpusError, match="format version 999"):
        Corpus(copy)


def test_pickled_corpus_is_small_and_reopens_arrays(corpus_root):
    corpus = Corpus(corpus_root)
    key = corpus.tasks("train")[0]
    expected = corpus.load_many(key, [0], 64, "train")  # opens the memory maps
    clone = pickle.loads(pickle.dumps(corpus))  # what a DataLoader worker receives
    assert len(pickle.dumps(corpus)) < 20_000
    np.testing.assert_array_equal(clone.load_many(key, [0], 64, "train")[0], expected[0])


def test_stored_2d_image_matches_prepare_image(tmp_path):
    root = write_folder2d(tmp_path, n_cases=3, size=(20, 24))
    build_corpus(
        [job_from_spec(spec_from_path(root), root)],
        tmp_path / "c",
        resolutions=(64,),
        progress=False,
    )
    corpus = Corpus(tmp_path / "c")
    for split in ("train", "val", "test"):
        for key in corpus.tasks(split):
            for i, subject in enumerate(corpus.subjects(key, split)):
                raw = np.asarray(Image.open(root / "images" / f"{subject}.png"))  # RGB (20, 24, 3)
                expected, _ = prepare_image(raw, 64)
                stored, _ = corpus.load(key, i, 64, split)
                np.testing.assert_allclose(stored, expected.numpy(), atol=0.5 / 255 + 1e-6)


def test_slice_kinds_keep_their_codes():
    from megaseg.data.store import SLICE_KINDS

    # codes 0-2 are what older corpora store; "extra" (a spec's slices_per_plane) came 4th
    assert SLICE_KINDS == ("mid", "max", "2d", "extra")


def _examples(root: Path, name: str) -> np.ndarray:
    return np.load(root / "datasets" / name / "examples.npy")


def test_slices_per_plane_adds_extra_examples_and_rebuilds(tmp_path):
    import dataclasses

    from fixtures_data import write_nnunet

    from data_prep.store_writer import spec_record

    data = write_nnunet(tmp_path / "raw", n_cases=3)
    spec = spec_from_path(data)
    name, out = spec.name, tmp_path / "corpus"
    record = spec_record(spec)
    assert "slices_per_plane" not in record  # 0: the record, so the build key, as before
    more = dataclasses.replace(spec, slices_per_plane=2)
    assert spec_record(more) == {**record, "slices_per_plane": 2}

    def build(s):
        summary = build_corpus([job_from_spec(s, data)], out, resolutions=(16,), progress=False)
        assert summary.ok, summary.text()
        corpus = Corpus(out)
        counts = {k: sum(corpus.num_examples(k, p) for p in ("train", "val", "test"))
                  for p in ("train", "val", "test") for k in corpus.tasks(p)}  # fmt: skip
        return summary, counts

    _, plain = build(spec)
    assert set(_examples(out, name)[:, 7].tolist()) == {0, 1}  # mid and max
    summary, extra = build(more)
    assert summary.reused_datasets == []  # another K: rebuilt, not the stale dataset
    assert extra.keys() == plain.keys()
    assert all(extra[k] >= plain[k] for k in plain) and sum(extra.values()) > sum(plain.values())
    assert 3 in set(_examples(out, name)[:, 7].tolist())  # "extra" rows
    index = json.loads((out / "datasets" / name / "index.json").read_text())
    assert index["slice_kinds"][3] == "extra"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["datasets"][name]["spec"]["slices_per_plane"] == 2
    assert build(more)[0].reused_datasets == [name]  # the same K again: reused


def test_write_dataset_takes_any_spec_object(tmp_path):
    """write_dataset's spec is any object with a name and provenance fields: the pipeline
    reads a missing slices_per_plane as 0 (it raised AttributeError for every case)."""
    import types

    spec = types.SimpleNamespace(name="Plain", licence="CC0", source="tests")
    cases = [memory_case("Plain", f"c{i}", f"s{i}", {1: "disc"}) for i in range(3)]
    summary = write_dataset(tmp_path / "c", spec, cases, ArrayLoader(0), lambda c: c.case_id,
                            resolutions=(32,), progress=False)  # fmt: skip
    assert summary.ok and summary.written == {"Plain": 3}, summary.text()


@pytest.mark.parametrize("cases", [8, 3], ids=["same-size", "smaller"])
def test_a_dataset_rebuilt_under_an_open_corpus_is_a_named_error(tmp_path, cases):
    """A fit's DataLoader worker (a pickled Corpus, arrays not yet mapped) reads after
    `prep build` rebuilt the dataset: same size, it would serve other images than its index
    says; smaller, an IndexError. Maps opened before the rebuild keep their files."""
    out = tmp_path / "corpus"
    write_memory_dataset(out, "Alpha", 8)
    opened = Corpus(out)
    key = opened.tasks("train")[0]
    before = opened.load_many(key, [0, 1], 32, "train")  # mapped before the rebuild
    worker = pickle.loads(pickle.dumps(opened))
    write_memory_dataset(out, "Alpha", cases, seed=5)
    with pytest.raises(CorpusError, match=r"Alpha/index\.json: replaced or changed since this "
                                          r"corpus was opened"):  # fmt: skip
        worker.load_many(key, [0, 1], 32, "train")
    after = opened.load_many(key, [0, 1], 32, "train")
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert Corpus(out).num_examples(key, "train") <= 8  # reopened: the new build, no error
