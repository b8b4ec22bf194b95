"""Task index, hierarchical task sampling and episodes.

An *episode* is one query (image and label) and ``S`` support examples of the same binary task
and the same split, the query never among its own support. A training batch holds ``B``
episodes, each of its own task, with one support size per batch.

Tasks are drawn hierarchically and uniformly at each level, dataset -> group -> modality ->
axis -> label (:class:`TaskTree`), so a dataset with many labels or subject groups does not
dominate. Several *sources* (corpora, on-the-fly synthetic tasks) are mixed with fixed weights.

A batch is a pure function of ``(seed, stream, rank, step)`` (:meth:`EpisodeSampler.batch`),
whatever ran before and whichever worker computes it: training resumes exactly from a step, and
every DDP rank has its own reproducible stream. :class:`EpisodeStream` serves training batches
from a start step on; :class:`EpisodeSet` is a fixed, finite set of batches for validation.
"""

from __future__ import annotations

import bisect
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from megaseg.data.store import UNIT, Corpus, TaskKey
from megaseg.data.synthetic import SyntheticTasks
from megaseg.deprecation import moved

# Independent random streams of one seed: a training batch and a validation batch of the same
# index never share draws.
TRAIN_STREAM, VAL_STREAM, TEST_STREAM = 0, 1, 2

HIERARCHY = ("dataset", "group", "modality", "axis", "label")

# (B, S+1, 1, H, W) images and labels and a generator -> augmented images and labels.
Augment = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]


def episode_rng(seed: int, stream: int, rank: int, step: int) -> np.random.Generator:
    """The generator of one batch: a pure function of its coordinates."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, rank, step]))


class TaskTree:
    """Uniform sampling at each level of the task hierarchy, over a fixed set of task keys.

    ``P(key) = 1/#datasets * 1/#groups of its dataset * ... * 1/#labels of its axis``.
    """

    def __init__(self, keys: Sequence[TaskKey]):
        if not keys:
            raise ValueError("no tasks to sample from")
        self.keys = sorted(set(keys))
        self._root: dict = {}
        for key in self.keys:
            node = self._root
            for level in HIERARCHY[:-1]:
                node = node.setdefault(getattr(key, level), {})
            node[key.label] = key
        self._root = _freeze(self._root)

    def __len__(self) -> int:
        return len(self.keys)

    def sample(self, rng: np.random.Generator) -> TaskKey:
        node = self._root
        while isinstance(node, tuple):
            node = node[int(rng.integers(len(node)))][1]
        return node

    def probability(self, key: TaskKey) -> float:
        """Probability that :meth:`sample` returns ``key`` (0 if it is not in the tree)."""
        node, p = self._root, 1.0
        for level in HIERARCHY:
            children = dict(node)
            if getattr(key, level) not in children:
                return 0.0
            p /= len(children)
            node = children[getattr(key, level)]
        return p


def _freeze(node):
    """Nested dicts -> nested sorted tuples of (name, child), for fast, ordered indexing."""
    if isinstance(node, TaskKey):
        return node
    return tuple((name, _freeze(child)) for name, child in sorted(node.items()))


class TaskSource(Protocol):
    """Where episodes come from: a set of binary tasks of one split, each with examples."""

    name: str

    def sample_task(self, rng: np.random.Generator) -> TaskKey: ...

    def num_examples(self, key: TaskKey) -> int: ...

    def load(self, key: TaskKey, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Images and labels ``(n, 1, R, R)`` float32 in [0, 1], one per index."""
        ...


# (corpus, split, tasks) whose "fewer than 2 examples" warning this process already gave
_SMALL_TASKS_SAID: set[tuple] = set()


class CorpusTaskSource:
    """The tasks of one split of a :class:`~megaseg.data.store.Corpus`, as a training
    :class:`TaskSource` (not the evaluation's ``megaseg.evaluation.CorpusSource``, which lists
    a dataset's held-out tasks with their support and query pools).

    ``datasets``: restrict to these datasets (default: every dataset the corpus serves for this
    split). Tasks with fewer than two examples in the split cannot form an episode (the query is
    never its own support) and are left out with a warning naming them.
    """

    def __init__(
        self,
        corpus: Corpus,
        split: str,
        resolution: int,
        datasets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ):
        self.corpus, self.split, self.resolution = corpus, split, resolution
        self.name = f"corpus:{corpus.root.name}"
        keys = corpus.tasks(split, exclude=exclude)
        if datasets is not None:
            wanted = {d.casefold() for d in datasets}
            keys = [k for k in keys if k.dataset.casefold() in wanted]
        counts = {k: corpus.num_examples(k, split) for k in keys}
        small = [k for k, n in counts.items() if n < 2]
        said = (str(corpus.root), split, tuple(small))
        if small and said not in _SMALL_TASKS_SAID:  # once per process, not at every setup
            _SMALL_TASKS_SAID.add(said)
            names = ", ".join("/".join(astuple(k)) for k in small[:3])
            warnings.warn(
                f"{corpus.root} {split}: {len(small)} task(s) with fewer than 2 examples left "
                f"out: {names}{' ...' if len(small) > 3 else ''}",
                stacklevel=2,
            )
        self._counts = {k: n for k, n in counts.items() if n >= 2}
        self._subjects: dict[TaskKey, np.ndarray] = {}
        if not self._counts:
            raise EmptySplitError(
                f"{corpus.root}: no {split} task with >= 2 examples to draw episodes from"
            )
        self.tree = TaskTree(list(self._counts))

    @property
    def datasets(self) -> list[str]:
        return sorted({k.dataset for k in self.tree.keys})

    def sample_task(self, rng: np.random.Generator) -> TaskKey:
        return self.tree.sample(rng)

    def num_examples(self, key: TaskKey) -> int:
        return self._counts[key]

    def load(
        self, key: TaskKey, indices: Sequence[int], raw: bool = False
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`TaskSource.load`; ``raw``: the stored uint8 (value * 255) instead."""
        images, labels = self.corpus.load_many(key, indices, self.resolution, self.split, raw)
        return torch.from_numpy(images), torch.from_numpy(labels)

    def subjects(self, key: TaskKey) -> np.ndarray:
        """Subject of each example index of ``key``, as integer codes (equal = same subject)."""
        codes = self._subjects.get(key)
        if codes is None:
            names = self.corpus.subjects(key, self.split)
            codes = np.unique(names, return_inverse=True)[1].reshape(-1)
            self._subjects[key] = codes
        return codes


class SyntheticTaskSource:
    """Synthetic tasks as a training :class:`TaskSource`: dataset "synthetic", one group per
    task, one key per label (``megaseg.evaluation.SyntheticSource`` is the evaluation's).

    The hierarchy is walked lazily (task uniform, then label uniform), which is the hierarchical
    draw without listing the labels of every task up front.
    """

    def __init__(self, synthetic: SyntheticTasks, name: str = "synthetic"):
        self.synthetic, self.name = synthetic, name

    def sample_task(self, rng: np.random.Generator) -> TaskKey:
        task = int(rng.integers(self.synthetic.num_tasks))
        label = int(rng.integers(self.synthetic.num_labels(task)))
        return TaskKey(self.name, str(task), "synthetic", "2d", str(label))

    def num_examples(self, key: TaskKey) -> int:
        return self.synthetic.config.num_subjects

    def load(self, key: TaskKey, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        return self.synthetic.batch(int(key.group), int(key.label), list(indices))


def stage_name(source: TaskSource) -> str:
    """The loader stage of reading from ``source``: "corpus read" for stored examples,
    "synthetic generation" for tasks generated on the fly."""
    return "corpus read" if isinstance(source, CorpusTaskSource) else "synthetic generation"


def draw_indices(rng: np.random.Generator, n: int, support_size: int) -> tuple[int, np.ndarray]:
    """A query index in ``[0, n)`` and ``support_size`` others: distinct while ``n - 1`` allows,
    drawn with replacement otherwise; never the query."""
    if n < 2:
        raise ValueError(f"a task needs >= 2 examples for an episode, got {n}")
    query = int(rng.integers(n))
    if n - 1 >= support_size:
        support = rng.choice(n - 1, size=support_size, replace=False)
    else:
        support = rng.integers(n - 1, size=support_size)
    return query, support + (support >= query)


def draw_cross_subject(
    rng: np.random.Generator, subjects: np.ndarray, support_size: int
) -> tuple[int, np.ndarray] | None:
    """A query index and ``support_size`` others, none of the query's subject: distinct while
    the other subjects' examples allow, with replacement otherwise. ``subjects``: one code per
    example. None when the drawn query's subject is the task's only one (draw as usual then)."""
    query = int(rng.integers(len(subjects)))
    others = np.flatnonzero(subjects != subjects[query])
    if others.size == 0:
        return None
    replace = others.size < support_size
    return query, rng.choice(others, size=support_size, replace=replace)


class EmptySplitError(ValueError):
    """A corpus has no task with >= 2 examples in the split asked for."""


def _load_unique(
    source: TaskSource, key: TaskKey, indices: np.ndarray, raw: bool = False
) -> tuple[Tensor, Tensor]:
    """``source.load`` once per distinct index, gathered back to ``indices``' order; ``raw``:
    stored uint8 (corpus sources only)."""
    unique, inverse = np.unique(indices, return_inverse=True)
    images, labels = (
        source.load(key, unique.tolist(), raw=True) if raw else source.load(key, unique.tolist())
    )
    inverse = torch.from_numpy(inverse.reshape(-1))
    return images[inverse], labels[inverse]


@dataclass
class EpisodeSampler:
    """Draws batches of episodes from weighted sources.

    Args:
        sources: task sources; each episode picks one with probability ``weights / sum``.
        weights: one non-negative weight per source (e.g. corpus 0.5, synthetic 0.5).
        batch_size: episodes per batch, B.
        support_size: S, fixed, or ``(lo, hi)``: one S drawn uniformly in [lo, hi] per batch.
        support_size_log: draw S log-uniformly in [lo, hi] instead (``floor(exp(u))``, ``u``
            uniform in ``[log lo, log(hi + 1))``); False keeps the uniform draw's stream.
        augment: optional ``(images, labels, generator) -> (images, labels)`` on the batch's
            ``(B, S+1, 1, H, W)`` stack (query first), e.g. task-level then in-task augmentation.
        foreign_support: also draw, per episode, a support set of another task
            (``other_support_*``), for the support-swap metric.
        cross_subject: probability that an episode of a task with several subjects (a source
            with ``subjects(key)``: corpora) takes its support only from subjects other than
            the query's, as when a user segments a new patient from others' examples. 0 keeps
            the stream of the usual draw, where most support sets hold the query's subject.
        support_size_buckets: draw S uniformly among the powers of two in ``[lo, hi]`` (2, 4,
            ..., 64 for ``(2, 64)``: each with probability 1/6, a log-uniform draw on a grid of
            powers of two), so a compiled network sees a handful of shapes; overrides
            ``support_size_log``.
        defer_augment: leave ``augment`` to the training device (:func:`finish_batch` after the
            transfer): the batch carries ``augment_seed``, the seed the loader would have
            augmented with, so both paths give the same episodes. When every source is stored
            (corpora), images and labels then also stay uint8 (value * 255): a quarter of the
            bytes to pin and copy, converted on the device.
    """

    sources: Sequence[TaskSource]
    weights: Sequence[float] | None = None
    batch_size: int = 8
    support_size: int | Sequence[int] = 64
    augment: Augment | None = None
    foreign_support: bool = False
    support_size_log: bool = False
    cross_subject: float = 0.0
    # Process CPU seconds per loader stage, accumulated by :meth:`batch` when a dict is set
    # (benchmarks/input_speed.py); None: not measured.
    stage_times: dict[str, float] | None = field(default=None, repr=False)
    support_size_buckets: bool = False
    defer_augment: bool = False

    def __post_init__(self):
        if not 0.0 <= self.cross_subject <= 1.0:
            raise ValueError(f"cross_subject must be in [0, 1], got {self.cross_subject}")
        if not self.sources:
            raise ValueError("EpisodeSampler needs at least one source")
        w = np.ones(len(self.sources)) if self.weights is None else np.asarray(self.weights, float)
        if w.shape != (len(self.sources),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"need one non-negative weight per source, got {self.weights}")
        self._cum = np.cumsum(w / w.sum()).tolist()
        lo, hi = _support_range(self.support_size)
        if lo < 1:
            raise ValueError(f"support size must be >= 1, got {self.support_size}")
        self._support_range = (lo, hi)
        self._buckets = support_buckets(lo, hi) if self.support_size_buckets else None
        self._raw = self.defer_augment and all(
            isinstance(s, CorpusTaskSource) for s in self.sources
        )

    @contextmanager
    def _stage(self, name: str):
        """Add the process CPU time of the block to ``stage_times[name]`` (when measuring)."""
        if self.stage_times is None:
            yield
            return
        start = time.process_time()
        try:
            yield
        finally:
            self.stage_times[name] = self.stage_times.get(name, 0.0) + time.process_time() - start

    def _pick_source(self, rng: np.random.Generator) -> TaskSource:
        i = bisect.bisect_right(self._cum, float(rng.random()))
        return self.sources[min(i, len(self.sources) - 1)]

    def _episode(self, rng, source, key, support_size):
        drawn = None
        if self.cross_subject > 0 and hasattr(source, "subjects"):
            if rng.random() < self.cross_subject:
                drawn = draw_cross_subject(rng, source.subjects(key), support_size)
        query, support = drawn or draw_indices(rng, source.num_examples(key), support_size)
        with self._stage(stage_name(source)):
            return _load_unique(source, key, np.concatenate([[query], support]), self._raw)

    def _foreign(self, rng, key, support_size) -> tuple[Tensor, Tensor]:
        for _ in range(100):
            source = self._pick_source(rng)
            other = source.sample_task(rng)
            if other != key:
                _, support = draw_indices(rng, source.num_examples(other), support_size)
                return _load_unique(source, other, support, self._raw)
        raise ValueError("foreign_support needs at least two distinct tasks")

    def batch(self, seed: int, stream: int, rank: int, step: int) -> dict:
        """Batch ``step`` of stream ``(seed, stream, rank)``.

        Returns a dict: ``query``, ``query_label`` ``(B,1,H,W)``; ``support_images``,
        ``support_labels`` ``(B,S,1,H,W)``; ``task``: B strings ``source/dataset/.../label``;
        ``index``: ``(4,)`` int64 ``(seed, stream, rank, step)``; with ``foreign_support``,
        ``other_support_images`` and ``other_support_labels`` ``(B,S,1,H,W)``. With
        ``defer_augment``, not yet augmented, ``augment_seed`` ``(1,)`` int64 for
        :func:`finish_batch`, and uint8 images and labels when every source is stored.
        """
        rng = episode_rng(seed, stream, rank, step)
        lo, hi = self._support_range
        if self._buckets is not None:
            support_size = self._buckets[int(rng.integers(len(self._buckets)))]
        elif self.support_size_log:
            u = rng.uniform(np.log(lo), np.log(hi + 1))
            support_size = min(hi, max(lo, int(np.exp(u))))  # exp(log(lo)) may round below lo
        else:
            support_size = int(rng.integers(lo, hi + 1))
        images, labels, names, others = [], [], [], []
        for _ in range(self.batch_size):
            with self._stage("task choice"):
                source = self._pick_source(rng)
                key = source.sample_task(rng)
            x, y = self._episode(rng, source, key, support_size)
            images.append(x)
            labels.append(y)
            names.append("/".join((source.name, *(getattr(key, f) for f in HIERARCHY))))
            if self.foreign_support:
                others.append(self._foreign(rng, key, support_size))
        with self._stage("collation"):
            images, labels = torch.stack(images), torch.stack(labels)  # (B, S+1, 1, H, W)
        augment_seed = None
        if self.augment is not None:
            augment_seed = int(rng.integers(2**63 - 1))
            if not self.defer_augment:
                with self._stage("augmentation"):
                    gen = torch.Generator().manual_seed(augment_seed)
                    images, labels = self.augment(images, labels, gen)
        out = {
            "query": images[:, 0],
            "query_label": labels[:, 0],
            "support_images": images[:, 1:],
            "support_labels": labels[:, 1:],
            "task": names,
            "index": torch.tensor([seed, stream, rank, step], dtype=torch.int64),
        }
        if self.foreign_support:
            out["other_support_images"] = torch.stack([o[0] for o in others])
            out["other_support_labels"] = torch.stack([o[1] for o in others])
        if self.defer_augment and augment_seed is not None:
            out["augment_seed"] = torch.tensor([augment_seed], dtype=torch.int64)
        return out


def support_buckets(lo: int, hi: int) -> list[int]:
    """The powers of two in ``[lo, hi]``: the support sizes of ``support_size_buckets``."""
    buckets = [2**k for k in range(hi.bit_length()) if lo <= 2**k <= hi]
    if not buckets:
        raise ValueError(f"support_size_buckets: no power of two in [{lo}, {hi}]")
    return buckets


EPISODE_KEYS = ("query", "query_label", "support_images", "support_labels")


def finish_batch(batch: dict, augment: Augment | None) -> dict:
    """What the loader left to the training device, on the batch's device: uint8 images and
    labels to float32 in [0, 1] (the store's conversion), then ``augment`` with the generator
    seeded by ``augment_seed``; the same episodes as augmenting in the loader. A batch without
    uint8 tensors or ``augment_seed`` is returned as is. Shapes as :meth:`EpisodeSampler.batch`.
    """
    out = dict(batch)
    for key in (*EPISODE_KEYS, "other_support_images", "other_support_labels"):
        x = out.get(key)
        if x is not None and x.dtype == torch.uint8:
            out[key] = x.to(torch.float32).mul_(torch.tensor(UNIT, device=x.device))
    seed = out.pop("augment_seed", None)
    if seed is None or augment is None:
        return out
    images = torch.cat([out["query"][:, None], out["support_images"]], dim=1)
    labels = torch.cat([out["query_label"][:, None], out["support_labels"]], dim=1)
    gen = torch.Generator().manual_seed(int(seed.reshape(-1)[0]))  # CPU: parameters drawn there
    images, labels = augment(images, labels, gen)
    out["query"], out["support_images"] = images[:, 0], images[:, 1:]
    out["query_label"], out["support_labels"] = labels[:, 0], labels[:, 1:]
    return out


def _support_range(support_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(support_size, int):
        return support_size, support_size
    lo, hi = (int(s) for s in support_size)
    if hi < lo:
        raise ValueError(f"support size range must be (lo, hi) with lo <= hi, got {support_size}")
    return lo, hi


class EpisodeStream(IterableDataset):
    """Endless training batches ``start_step, start_step + 1, ...`` of one rank's stream.

    Use with ``DataLoader(stream, batch_size=None, num_workers=k)``: worker ``w`` computes the
    steps ``= start_step + w (mod k)`` and the loader interleaves workers round-robin, so batches
    arrive in step order, identical for any ``k``.
    """

    def __init__(
        self,
        sampler: EpisodeSampler,
        seed: int,
        rank: int = 0,
        start_step: int = 0,
        stream: int = TRAIN_STREAM,
    ):
        super().__init__()
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.start_step, self.stream = start_step, stream

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + worker
        while True:
            yield self.sampler.batch(self.seed, self.stream, self.rank, step)
            step += workers


class EpisodeSet(Dataset):
    """A fixed set of ``num_batches`` batches (validation, test): item ``i`` is batch ``i`` of
    the ``(seed, stream, rank=0)`` stream, the same on every rank and in every run."""

    def __init__(
        self, sampler: EpisodeSampler, seed: int, num_batches: int, stream: int = VAL_STREAM
    ):
        self.sampler, self.seed, self.num_batches, self.stream = sampler, seed, num_batches, stream

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_batches:
            raise IndexError(i)
        return self.sampler.batch(self.seed, self.stream, 0, i)


__getattr__ = moved(
    __name__,
    {
        "CorpusSource": "megaseg.data.tasks:CorpusTaskSource",
        "SyntheticSource": "megaseg.data.tasks:SyntheticTaskSource",
    },
)
