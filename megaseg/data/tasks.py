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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from megaseg.data.store import Corpus, TaskKey
from megaseg.data.synthetic import SyntheticTasks

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


class CorpusSource:
    """The tasks of one split of a :class:`~megaseg.data.store.Corpus`.

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

    def load(self, key: TaskKey, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        images, labels = self.corpus.load_many(key, indices, self.resolution, self.split)
        return torch.from_numpy(images), torch.from_numpy(labels)

    def subjects(self, key: TaskKey) -> np.ndarray:
        """Subject of each example index of ``key``, as integer codes (equal = same subject)."""
        codes = self._subjects.get(key)
        if codes is None:
            names = self.corpus.subjects(key, self.split)
            codes = np.unique(names, return_inverse=True)[1].reshape(-1)
            self._subjects[key] = codes
        return codes


class SyntheticSource:
    """Synthetic tasks as a source: dataset "synthetic", one group per task, one key per label.

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


def _load_unique(source: TaskSource, key: TaskKey, indices: np.ndarray) -> tuple[Tensor, Tensor]:
    """``source.load`` once per distinct index, gathered back to ``indices``' order."""
    unique, inverse = np.unique(indices, return_inverse=True)
    images, labels = source.load(key, unique.tolist())
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
    """

    sources: Sequence[TaskSource]
    weights: Sequence[float] | None = None
    batch_size: int = 8
    support_size: int | Sequence[int] = 64
    augment: Augment | None = None
    foreign_support: bool = False
    support_size_log: bool = False
    cross_subject: float = 0.0

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

    def _pick_source(self, rng: np.random.Generator) -> TaskSource:
        i = bisect.bisect_right(self._cum, float(rng.random()))
        return self.sources[min(i, len(self.sources) - 1)]

    def _episode(self, rng, source, key, support_size):
        drawn = None
        if self.cross_subject > 0 and hasattr(source, "subjects"):
            if rng.random() < self.cross_subject:
                drawn = draw_cross_subject(rng, source.subjects(key), support_size)
        query, support = drawn or draw_indices(rng, source.num_examples(key), support_size)
        return _load_unique(source, key, np.concatenate([[query], support]))

    def _foreign(self, rng, key, support_size) -> tuple[Tensor, Tensor]:
        for _ in range(100):
            source = self._pick_source(rng)
            other = source.sample_task(rng)
            if other != key:
                _, support = draw_indices(rng, source.num_examples(other), support_size)
                return _load_unique(source, other, support)
        raise ValueError("foreign_support needs at least two distinct tasks")

    def batch(self, seed: int, stream: int, rank: int, step: int) -> dict:
        """Batch ``step`` of stream ``(seed, stream, rank)``.

        Returns a dict: ``query``, ``query_label`` ``(B,1,H,W)``; ``support_images``,
        ``support_labels`` ``(B,S,1,H,W)``; ``task``: B strings ``source/dataset/.../label``;
        ``index``: ``(4,)`` int64 ``(seed, stream, rank, step)``; with ``foreign_support``,
        ``other_support_images`` and ``other_support_labels`` ``(B,S,1,H,W)``.
        """
        rng = episode_rng(seed, stream, rank, step)
        lo, hi = self._support_range
        if self.support_size_log:
            u = rng.uniform(np.log(lo), np.log(hi + 1))
            support_size = min(hi, max(lo, int(np.exp(u))))  # exp(log(lo)) may round below lo
        else:
            support_size = int(rng.integers(lo, hi + 1))
        images, labels, names, others = [], [], [], []
        for _ in range(self.batch_size):
            source = self._pick_source(rng)
            key = source.sample_task(rng)
            x, y = self._episode(rng, source, key, support_size)
            images.append(x)
            labels.append(y)
            names.append("/".join((source.name, *(getattr(key, f) for f in HIERARCHY))))
            if self.foreign_support:
                others.append(self._foreign(rng, key, support_size))
        images, labels = torch.stack(images), torch.stack(labels)  # (B, S+1, 1, H, W)
        if self.augment is not None:
            gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
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
