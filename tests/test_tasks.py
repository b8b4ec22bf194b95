"""Task index, hierarchical sampling and episodes (megaseg.data.tasks)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from megaseg.data.store import Corpus, TaskKey
from megaseg.data.synthetic import SyntheticConfig, SyntheticTasks
from megaseg.data.tasks import (
    TRAIN_STREAM,
    VAL_STREAM,
    CorpusTaskSource,
    EpisodeSampler,
    EpisodeSet,
    EpisodeStream,
    SyntheticTaskSource,
    TaskTree,
    draw_cross_subject,
    draw_indices,
)

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


class FakeSource:
    """Tasks whose pixels say where they come from: image value = task number, label value =
    split code, so a test can check that an episode never mixes tasks or splits."""

    def __init__(
        self, counts: dict[TaskKey, int], split: str = "train", name: str = "fake", size: int = 8
    ):
        self.counts, self.split, self.name, self.size = counts, split, name, size
        self.tree = TaskTree(list(counts))
        self.number = {k: i for i, k in enumerate(sorted(counts))}
        self.loaded: list[tuple[TaskKey, list[int]]] = []

    def sample_task(self, rng):
        return self.tree.sample(rng)

    def num_examples(self, key):
        return self.counts[key]

    def load(self, key, indices):
        self.loaded.append((key, list(indices)))
        n = len(indices)
        images = torch.full((n, 1, self.size, self.size), float(self.number[key]))
        labels = torch.full((n, 1, self.size, self.size), float(SPLIT_CODE[self.split]))
        labels[:, 0, 0, 0] = torch.tensor(indices, dtype=torch.float32)  # the example index
        return images, labels


def keys_of(dataset, groups=1, labels=1, modality="CT", axis="0"):
    return [TaskKey(dataset, f"g{g}", modality, axis, f"l{lab}")
            for g in range(groups) for lab in range(labels)]  # fmt: skip


@pytest.fixture
def source():
    # An imbalanced corpus: "big" has 3 groups x 10 labels, "small" one task; "tiny" tasks
    # have 3 examples, fewer than the support size.
    counts = {k: 50 for k in keys_of("big", groups=3, labels=10)}
    counts.update({k: 20 for k in keys_of("small")})
    counts.update({k: 3 for k in keys_of("tiny", labels=2)})
    return FakeSource(counts)


def test_task_tree_is_uniform_at_each_level(source):
    tree = source.tree
    assert tree.probability(keys_of("small")[0]) == pytest.approx(1 / 3)
    assert tree.probability(keys_of("big", groups=3, labels=10)[0]) == pytest.approx(1 / 3 / 3 / 10)
    assert tree.probability(TaskKey("nope", "g0", "CT", "0", "l0")) == 0.0
    assert sum(tree.probability(k) for k in tree.keys) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    datasets = collections.Counter(tree.sample(rng).dataset for _ in range(3000))
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in datasets.values()), datasets


def test_draw_indices_excludes_query_and_replaces_only_when_small():
    rng = np.random.default_rng(0)
    for _ in range(200):
        q, s = draw_indices(rng, 10, 5)
        assert q not in s and len(set(s.tolist())) == 5 and s.max() < 10
        q, s = draw_indices(rng, 3, 8)  # 2 candidates for 8 slots: with replacement
        assert q not in s and len(s) == 8 and set(s.tolist()) <= set(range(3)) - {q}
    with pytest.raises(ValueError, match=">= 2 examples"):
        draw_indices(rng, 1, 4)


def test_episode_never_mixes_tasks_or_splits(source):
    val = FakeSource(dict(source.counts), split="val", name="fake_val")
    sampler = EpisodeSampler([source, val], [0.5, 0.5], batch_size=16, support_size=6,
                             foreign_support=True)  # fmt: skip
    for step in range(10):
        b = sampler.batch(0, TRAIN_STREAM, 0, step)
        images = torch.cat([b["query"][:, None], b["support_images"]], 1)  # (B, S+1, 1, H, W)
        labels = torch.cat([b["query_label"][:, None], b["support_labels"]], 1)
        task_code = images[..., 1, 1]  # (B, S+1, 1)
        split_code = labels[..., 1, 1]
        assert (task_code == task_code[:, :1]).all(), "an episode mixes tasks"
        assert (split_code == split_code[:, :1]).all(), "an episode mixes splits"
        # the query is never in its own support (example index in pixel (0, 0))
        q, s = labels[:, 0, 0, 0, 0], labels[:, 1:, 0, 0, 0]
        small = torch.tensor(["tiny" not in t for t in b["task"]])
        assert not (s == q[:, None]).any(dim=1)[small].any()
        # the foreign support is another task
        assert (b["other_support_images"][..., 1, 1] != task_code[:, :1]).all()


def test_support_size_is_fixed_per_batch_and_in_range(source):
    sampler = EpisodeSampler([source], batch_size=3, support_size=(2, 5))
    sizes = {sampler.batch(0, TRAIN_STREAM, 0, i)["support_images"].shape[1] for i in range(40)}
    assert sizes == {2, 3, 4, 5}
    fixed = EpisodeSampler([source], batch_size=3, support_size=4)
    assert fixed.batch(0, TRAIN_STREAM, 0, 0)["support_labels"].shape == (3, 4, 1, 8, 8)


def test_mixed_sources_follow_the_ratio(source):
    other = FakeSource({k: 10 for k in keys_of("other")}, name="other")
    sampler = EpisodeSampler([source, other], [0.8, 0.2], batch_size=50, support_size=1)
    names = [t for i in range(10) for t in sampler.batch(1, TRAIN_STREAM, 0, i)["task"]]
    share = sum(t.startswith("other/") for t in names) / len(names)
    assert abs(share - 0.2) < 0.06


def _same(a: dict, b: dict) -> bool:
    return a["task"] == b["task"] and all(
        torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor)
    )


def test_seeded_episodes_repeat_exactly(source):
    sampler = EpisodeSampler([source], batch_size=4, support_size=(1, 8))
    a = [sampler.batch(7, TRAIN_STREAM, 0, i) for i in range(5)]
    b = [sampler.batch(7, TRAIN_STREAM, 0, i) for i in reversed(range(5))][::-1]
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert not _same(a[0], sampler.batch(7, TRAIN_STREAM, 1, 0))  # another rank
    assert not _same(a[0], sampler.batch(8, TRAIN_STREAM, 0, 0))  # another seed
    assert not _same(a[0], sampler.batch(7, VAL_STREAM, 0, 0))  # another stream


def test_stream_resumes_at_a_step_and_ignores_worker_count():
    synthetic = SyntheticTaskSource(
        SyntheticTasks(20, config=SyntheticConfig(size=16, num_subjects=10))
    )
    sampler = EpisodeSampler([synthetic], batch_size=2, support_size=3)

    def take(start, workers, n):
        loader = DataLoader(EpisodeStream(sampler, seed=3, rank=0, start_step=start),
                            batch_size=None, num_workers=workers)  # fmt: skip
        it = iter(loader)
        return [next(it) for _ in range(n)]

    full = take(0, 0, 6)
    assert all(_same(x, y) for x, y in zip(full[2:], take(2, 0, 4), strict=True))
    assert all(_same(x, y) for x, y in zip(full, take(0, 2, 6), strict=True))
    assert [int(b["index"][3]) for b in full] == list(range(6))


def test_episode_set_is_fixed(source):
    sampler = EpisodeSampler([source], batch_size=2, support_size=2)
    ds = EpisodeSet(sampler, seed=0, num_batches=3)
    assert len(ds) == 3 and _same(ds[1], EpisodeSet(sampler, 0, 3)[1])
    with pytest.raises(IndexError):
        ds[3]


def test_augment_gets_the_whole_episode_and_a_seeded_generator(source):
    calls = []

    def augment(images, labels, gen):
        calls.append(images.shape)
        return images + torch.rand((), generator=gen), labels

    sampler = EpisodeSampler([source], batch_size=2, support_size=3, augment=augment)
    a, b = sampler.batch(0, TRAIN_STREAM, 0, 5), sampler.batch(0, TRAIN_STREAM, 0, 5)
    assert calls[0] == (2, 4, 1, 8, 8) and _same(a, b)


def test_synthetic_source_is_hierarchical_over_task_then_label():
    synthetic = SyntheticTasks(5, config=SyntheticConfig(size=16, num_subjects=10))
    src = SyntheticTaskSource(synthetic)
    rng = np.random.default_rng(0)
    keys = [src.sample_task(rng) for _ in range(200)]
    assert {k.group for k in keys} == {str(t) for t in range(5)}
    assert all(0 <= int(k.label) < synthetic.num_labels(int(k.group)) for k in keys)
    images, labels = src.load(keys[0], [0, 1])
    assert images.shape == labels.shape == (2, 1, 16, 16)


# -- a tiny corpus on disk, built by the real pipeline ---------------------------------------


def build_tiny_corpus(tmp: Path) -> Path:
    """Three 2D datasets (DataA, DataB, DataC) of 16 cases at 64 px, built by data_prep."""
    pytest.importorskip("data_prep.store_writer")
    from fixtures_data import write_folder2d

    from data_prep.pipeline import build_corpus, job_from_spec
    from data_prep.specs import spec_from_path

    jobs = [job_from_spec(spec_from_path(write_folder2d(tmp / "raw", name=n, n_cases=16)),
                          tmp / "raw" / n) for n in ("DataA", "DataB", "DataC")]  # fmt: skip
    summary = build_corpus(jobs, tmp / "corpus", resolutions=(64,), progress=False)
    assert summary.ok, summary.text()
    return tmp / "corpus"


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_corpus_source_never_serves_a_held_out_dataset(tiny_corpus, split):
    corpus = Corpus(tiny_corpus, exclude=["datac"])
    source = CorpusTaskSource(corpus, split, 64, exclude=["datac"])
    assert "DataC" not in source.datasets
    sampler = EpisodeSampler([source], batch_size=8, support_size=4)
    tasks = [t for i in range(5) for t in sampler.batch(0, TRAIN_STREAM, 0, i)["task"]]
    assert tasks and not any("/DataC/" in t for t in tasks)
    b = sampler.batch(0, TRAIN_STREAM, 0, 0)
    assert b["query"].shape == (8, 1, 64, 64) and b["support_labels"].shape == (8, 4, 1, 64, 64)
    assert 0 <= float(b["support_images"].min()) and float(b["support_images"].max()) <= 1


def test_corpus_episodes_stay_in_their_task_and_split(tiny_corpus):
    corpus = Corpus(tiny_corpus)
    source = CorpusTaskSource(corpus, "train", 64)
    loaded = []
    load = source.load
    source.load = lambda key, idx: loaded.append((key, list(idx))) or load(key, idx)
    EpisodeSampler([source], batch_size=6, support_size=12).batch(0, TRAIN_STREAM, 0, 0)
    for key, indices in loaded:  # one call per episode: one task, one split, valid indices
        assert max(indices) < corpus.num_examples(key, "train")


# -- log-uniform support sizes (support_size_log) --------------------------------------------


def _support_sizes(sampler, n, seed=0, rank=0):
    return [sampler.batch(seed, TRAIN_STREAM, rank, i)["support_images"].shape[1] for i in range(n)]


def test_log_support_sizes_stay_in_range_and_reach_both_ends():
    source = FakeSource({k: 80 for k in keys_of("big", labels=3)})
    sampler = EpisodeSampler([source], batch_size=1, support_size=(2, 8), support_size_log=True)
    assert set(_support_sizes(sampler, 300)) == set(range(2, 9))
    fixed = EpisodeSampler([source], batch_size=1, support_size=5, support_size_log=True)
    assert set(_support_sizes(fixed, 20)) == {5}


def test_log_support_sizes_are_log_distributed_and_seeded():
    """S in [2, 64]: below sqrt(2 * 64) ~ 11.3 about half the time (log-uniform: (log 12 -
    log 2) / (log 65 - log 2) = 0.51), against 10/63 = 0.16 for the uniform draw."""
    source = FakeSource({k: 80 for k in keys_of("big", labels=3)})
    log = EpisodeSampler([source], batch_size=1, support_size=(2, 64), support_size_log=True)
    uniform = EpisodeSampler([source], batch_size=1, support_size=(2, 64))
    sizes = _support_sizes(log, 400)
    assert min(sizes) >= 2 and max(sizes) <= 64
    small = sum(s < 11.3 for s in sizes) / len(sizes)
    small_uniform = sum(s < 11.3 for s in _support_sizes(uniform, 400)) / 400
    assert 0.4 < small < 0.62 and small_uniform < 0.26, (small, small_uniform)
    # a pure function of (seed, stream, rank, step)
    assert _support_sizes(log, 30) == sizes[:30]
    assert _support_sizes(log, 30, rank=1) != sizes[:30]
    assert _support_sizes(log, 30, seed=1) != sizes[:30]
    val = [log.batch(0, VAL_STREAM, 0, i)["support_images"].shape[1] for i in range(30)]
    assert val != sizes[:30]


def test_uniform_support_sizes_keep_their_stream():
    """support_size_log=False draws S exactly as before the option existed."""
    from megaseg.data.tasks import episode_rng

    source = FakeSource({k: 80 for k in keys_of("big", labels=3)})
    sampler = EpisodeSampler([source], batch_size=2, support_size=(2, 9), support_size_log=False)
    for seed, rank in ((0, 0), (3, 1)):
        old = [int(episode_rng(seed, TRAIN_STREAM, rank, i).integers(2, 10)) for i in range(40)]
        assert _support_sizes(sampler, 40, seed, rank) == old
    default = EpisodeSampler([source], batch_size=2, support_size=(2, 9))
    assert _same(default.batch(4, TRAIN_STREAM, 0, 7), sampler.batch(4, TRAIN_STREAM, 0, 7))


# -- cross-subject episodes (cross_subject) ---------------------------------------------------


class SubjectSource(FakeSource):
    """A FakeSource whose examples belong to subjects: example i of every task is subject
    ``i % n_subjects``."""

    def __init__(self, counts, n_subjects):
        super().__init__(counts)
        self.n_subjects = n_subjects

    def subjects(self, key):
        return np.arange(self.counts[key]) % self.n_subjects


def test_draw_cross_subject_keeps_the_query_subject_out_of_the_support():
    rng = np.random.default_rng(0)
    subjects = np.array([0] * 5 + [1] * 3 + [2] * 12)
    for support_size in (1, 4, 16, 20):
        for _ in range(50):
            query, support = draw_cross_subject(rng, subjects, support_size)
            assert len(support) == support_size
            assert subjects[query] not in subjects[support]
            others = int((subjects != subjects[query]).sum())
            if others >= support_size:  # distinct while the other subjects allow
                assert len(set(support.tolist())) == support_size
    assert draw_cross_subject(rng, np.zeros(6, dtype=int), 4) is None  # one subject only


def _episode_subjects(sampler, source, steps=20):
    """(query subject, support subjects) of every episode of ``steps`` batches (a FakeSource
    label holds its example index at pixel (0, 0); example i is subject i % n_subjects)."""
    out = []
    for i in range(steps):
        b = sampler.batch(0, TRAIN_STREAM, 0, i)
        query = b["query_label"][:, 0, 0, 0].long() % source.n_subjects
        support = b["support_labels"][:, :, 0, 0, 0].long() % source.n_subjects
        out += [(int(q), set(s.tolist())) for q, s in zip(query, support, strict=True)]
    return out


def test_cross_subject_episodes_take_the_support_from_other_subjects():
    source = SubjectSource({k: 30 for k in keys_of("multi", labels=3)}, n_subjects=2)
    crossed = EpisodeSampler([source], batch_size=4, support_size=(2, 12), cross_subject=1.0)
    episodes = _episode_subjects(crossed, source)
    assert len(episodes) == 80 and all(q not in s for q, s in episodes)
    # the usual draw (and half of them at 0.5) puts the query's subject in the support
    usual = EpisodeSampler([source], batch_size=4, support_size=(2, 12))
    within = [q in s for q, s in _episode_subjects(usual, source)]
    assert sum(within) > 0.6 * len(within)
    half = EpisodeSampler([source], batch_size=4, support_size=(2, 12), cross_subject=0.5)
    within = [q in s for q, s in _episode_subjects(half, source, steps=50)]
    assert 0.2 * len(within) < sum(within) < 0.8 * len(within)


def test_cross_subject_leaves_single_subject_tasks_and_the_default_stream_alone():
    one = SubjectSource({k: 30 for k in keys_of("one", labels=2)}, n_subjects=1)
    crossed = EpisodeSampler([one], batch_size=4, support_size=8, cross_subject=1.0)
    assert all(q in s for q, s in _episode_subjects(crossed, one))  # falls back to the usual draw
    plain = FakeSource({k: 30 for k in keys_of("plain", labels=2)})  # no subjects(): untouched
    for a, b in ((EpisodeSampler([plain], batch_size=3, support_size=5, cross_subject=1.0),
                  EpisodeSampler([plain], batch_size=3, support_size=5)),
                 (EpisodeSampler([one], batch_size=3, support_size=5, cross_subject=0.0),
                  EpisodeSampler([one], batch_size=3, support_size=5))):  # fmt: skip
        assert _same(a.batch(2, TRAIN_STREAM, 0, 5), b.batch(2, TRAIN_STREAM, 0, 5))
    with pytest.raises(ValueError, match="cross_subject"):
        EpisodeSampler([plain], cross_subject=1.5)


def test_tasks_too_small_are_warned_about_once_by_short_name(tiny_corpus, monkeypatch):
    import warnings

    import megaseg.data.tasks

    monkeypatch.setattr(megaseg.data.tasks, "_SMALL_TASKS_SAID", set())  # as a new process
    corpus = Corpus(tiny_corpus)
    small = [k for k in corpus.tasks("val") if corpus.num_examples(k, "val") < 2]
    assert small  # 16 cases: a few subjects per val task
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # a fit sets its data up more than once
            CorpusTaskSource(corpus, "val", 64)
    texts = [str(w.message) for w in caught if "fewer than 2 examples" in str(w.message)]
    assert len(texts) == 1, texts
    k = small[0]
    assert f"left out: {k.dataset}/{k.group}/{k.modality}/{k.axis}/{k.label}" in texts[0]
    assert "TaskKey(" not in texts[0]
