"""Where evaluation examples come from: a corpus, held-out synthetic tasks, a folder, arrays.

A *source* is one dataset. It lists its binary tasks (:class:`EvalTask`), each with a pool of
support candidates and a pool of queries, and loads examples by id at the network's
resolution::

    source.tasks() -> [EvalTask]
    source.load(task_name, ids, resolution) -> images (n,1,R,R), labels (n,1,R,R) float32 in [0, 1]
    source.describe() -> dict  (recorded in draws.json; a replay checks it is the same data)

Pools follow the evaluation protocol (DESIGN.md section 4): support candidates come from the
dataset's *train* split and queries from its *test* split, so support and query never share a
subject. A task whose examples all belong to ONE subject (a single-subject dataset such as the
MNI152 template) cannot be split that way; it is evaluated *within-subject*: both pools are all
its examples, and the protocol excludes each query from its own support. Every row from such a
task is marked ``within_subject``.

Example ids are strings: ``"train:12"`` (split and index in that split) for a corpus or a
folder, the subject index ``"17"`` for synthetic tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from megaseg.data.synthetic import versions
from megaseg.data.synthetic.versions import SYNTHETIC_VERSIONS
from megaseg.preprocess import resize

SUPPORT_SPLIT, QUERY_SPLIT = "train", "test"


@dataclass(frozen=True)
class EvalTask:
    """One binary task of one dataset, with its support and query pools (example ids).

    ``subjects`` maps every id of both pools to its subject. ``within_subject``: the pools are
    the same examples of a single subject (see the module docstring).
    """

    dataset: str
    name: str
    support_pool: tuple[str, ...]
    query_pool: tuple[str, ...]
    subjects: Mapping[str, str] = field(repr=False)
    within_subject: bool = False

    @property
    def candidates(self) -> int:
        """Support examples a query can draw from: the support pool, less the query itself
        when the pools are one subject's examples."""
        return len(self.support_pool) - (1 if self.within_subject else 0)


class Source(Protocol):
    """One dataset to evaluate on (see the module docstring)."""

    dataset: str

    def tasks(self) -> list[EvalTask]: ...

    def load(self, task: str, ids: Sequence[str], resolution: int) -> tuple[Tensor, Tensor]: ...

    def describe(self) -> dict: ...


def pools_from_splits(
    dataset: str, name: str, examples: Iterable[tuple[str, str, str]]
) -> EvalTask:
    """``(id, split, subject)`` of every example of a task -> its :class:`EvalTask`.

    Several subjects: support pool = the train split, query pool = the test split (the val
    split is not used). One subject: within-subject, both pools = every example.
    """
    examples = list(examples)
    subjects = {i: s for i, _, s in examples}
    if len(set(subjects.values())) == 1:
        ids = tuple(i for i, _, _ in examples)
        return EvalTask(dataset, name, ids, ids, subjects, within_subject=True)
    support = tuple(i for i, split, _ in examples if split == SUPPORT_SPLIT)
    query = tuple(i for i, split, _ in examples if split == QUERY_SPLIT)
    return EvalTask(dataset, name, support, query, subjects)


def _split_id(example_id: str) -> tuple[str, int]:
    split, _, index = example_id.partition(":")
    return split, int(index)


def _at_resolution(x: np.ndarray | Tensor, resolution: int) -> Tensor:
    """``(n, 1, r, r)`` -> float32 tensor ``(n, 1, R, R)`` through the shared resize path."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if t.shape[-1] != resolution:
        t = resize(t, resolution).clamp_(0.0, 1.0)
    return t


# ------------------------------------------------------------------------------ corpus


class CorpusSource:
    """One dataset of a corpus built by ``megaseg prep build``.

    ``corpus`` is a :class:`~megaseg.data.store.Corpus` or its folder. The corpus is opened
    without a held-out protocol: evaluation needs the held-out dataset's train split too (as
    support candidates, never trained on). Tasks are the dataset's tasks with examples in any
    split, named ``group/modality/axis/label``.
    """

    def __init__(self, corpus, dataset: str):
        from megaseg.data.store import Corpus

        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
        names = {d.casefold(): d for d in self.corpus.datasets}
        if dataset.casefold() not in names:
            raise ValueError(
                f"{self.corpus.root}: no dataset {dataset!r}; the corpus holds: "
                f"{', '.join(self.corpus.datasets)}"
            )
        self.dataset = names[dataset.casefold()]
        keys = {k for split in ("train", "val", "test") for k in self.corpus.tasks(split)}
        self._keys = {_task_name(k): k for k in sorted(keys) if k.dataset == self.dataset}

    def __repr__(self) -> str:
        return f"CorpusSource({str(self.corpus.root)!r}, {self.dataset!r})"

    def tasks(self) -> list[EvalTask]:
        out = []
        for name, key in self._keys.items():
            examples = [
                (f"{split}:{i}", split, subject)
                for split in ("train", "val", "test")
                for i, subject in enumerate(self.corpus.subjects(key, split))
            ]
            out.append(pools_from_splits(self.dataset, name, examples))
        return out

    def load(self, task: str, ids: Sequence[str], resolution: int) -> tuple[Tensor, Tensor]:
        key = self._keys[task]
        stored = self._resolution(resolution)
        images = np.zeros((len(ids), 1, stored, stored), np.float32)
        labels = np.zeros_like(images)
        by_split: dict[str, list[tuple[int, int]]] = {}
        for pos, example_id in enumerate(ids):
            split, index = _split_id(example_id)
            by_split.setdefault(split, []).append((pos, index))
        for split, items in by_split.items():
            pos, idx = zip(*items, strict=True)
            imgs, labs = self.corpus.load_many(key, list(idx), stored, split)
            images[list(pos)], labels[list(pos)] = imgs, labs
        return _at_resolution(images, resolution), _at_resolution(labels, resolution)

    def _resolution(self, resolution: int) -> int:
        """The stored resolution to read: R itself, else the smallest larger one (resized)."""
        stored = list(self.corpus.resolutions(self.dataset))
        if resolution in stored:
            return resolution
        larger = [r for r in stored if r > resolution]
        if not larger:
            raise ValueError(
                f"{self.corpus.root}: dataset {self.dataset!r} is stored at {stored}, none at or "
                f"above the network's resolution {resolution}; rebuild the corpus with "
                f"--resolutions {resolution}"
            )
        warnings.warn(
            f"{self.dataset}: resolution {resolution} not stored; reading {larger[0]} and "
            "resizing (blur + bilinear), which differs slightly from a corpus built at "
            f"{resolution}",
            stacklevel=3,
        )
        return larger[0]

    def describe(self) -> dict:
        index = self.corpus.root / "datasets" / self.dataset / "index.json"
        return {
            "kind": "corpus",
            "dataset": self.dataset,
            # absolute, so that a replay from another folder finds it
            "root": str(self.corpus.root.resolve()),
            "index_sha256": hashlib.sha256(index.read_bytes()).hexdigest(),
        }


def _task_name(key) -> str:
    return f"{key.group}/{key.modality}/{key.axis}/{key.label}"


def corpus_sources(corpus, datasets: Sequence[str]) -> list[CorpusSource]:
    """One :class:`CorpusSource` per dataset name, sharing one opened corpus."""
    from megaseg.data.store import Corpus

    corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
    return [CorpusSource(corpus, d) for d in datasets]


# ------------------------------------------------------------------------------ synthetic


class SyntheticSource:
    """Held-out synthetic tasks: seeds from ``HELDOUT_SEED_OFFSET``, never used in training.

    Task ``t`` contributes ``labels_per_task`` of its labels (picked by a hash of the task
    seed, so the choice does not depend on ``num_tasks``), each a binary task named
    ``task0007/label3``. Subjects are independent draws: support candidates are subjects
    ``[0, 0.7 S)``, queries ``[0.85 S, S)`` for ``S = config.num_subjects`` (the corpus's
    70/15/15 split). ``config.size`` is ignored: examples are generated at the resolution asked.

    ``version``: the generator, 1 (:mod:`megaseg.data.synthetic`, ``config`` a
    ``SyntheticConfig``) or 2 (:mod:`megaseg.data.synthetic.v2`, a ``SyntheticV2Config``, with
    the MNI152 label maps for its label-to-image tasks unless ``real_maps=False``). The two
    versions hash different task seeds from the same held-out range: different tasks.
    """

    dataset = "synthetic"

    def __init__(
        self,
        num_tasks: int = 50,
        labels_per_task: int = 1,
        config=None,
        version: int = 1,
        real_maps: bool | str = True,
    ):
        from megaseg.data.synthetic import HELDOUT_SEED_OFFSET

        if num_tasks < 1 or labels_per_task < 1:
            raise ValueError(
                f"need num_tasks >= 1 and labels_per_task >= 1, got {num_tasks}, {labels_per_task}"
            )
        versions.check_version(version)
        self.num_tasks = num_tasks
        self.labels_per_task = labels_per_task
        self.version = version
        self.real_maps = versions.label_maps_name(real_maps)
        self.seed_offset = HELDOUT_SEED_OFFSET
        self._generators: dict[int, Any] = {}
        self.config = config or versions.make_config(version)
        self._tasks: dict[str, tuple[int, int]] = {}
        gen = self._generator(self.config.size)
        for t in range(num_tasks):
            num = gen.num_labels(t)
            rng = np.random.default_rng(gen.task_seed(t))
            for label in sorted(rng.permutation(num)[: min(labels_per_task, num)].tolist()):
                self._tasks[f"task{t:04d}/label{label}"] = (t, label)

    def __repr__(self) -> str:
        version = "" if self.version == 1 else f", version={self.version}"
        return (
            f"SyntheticSource(num_tasks={self.num_tasks}, labels_per_task={self.labels_per_task}"
            f"{version})"
        )

    def _generator(self, resolution: int):
        import dataclasses

        gen = self._generators.get(resolution)
        if gen is None:
            config = dataclasses.replace(self.config, size=resolution)
            from data_prep.label_maps import make_tasks  # builds the named label maps (v2)

            gen = make_tasks(self.version, self.num_tasks, self.seed_offset, config, self.real_maps)
            self._generators[resolution] = gen
        return gen

    def tasks(self) -> list[EvalTask]:
        S = self.config.num_subjects
        support = tuple(str(i) for i in range(int(0.7 * S)))
        query = tuple(str(i) for i in range(int(0.85 * S), S))
        subjects = {i: i for i in support + query}
        return [EvalTask(self.dataset, name, support, query, subjects) for name in self._tasks]

    def load(self, task: str, ids: Sequence[str], resolution: int) -> tuple[Tensor, Tensor]:
        t, label = self._tasks[task]
        images, labels = self._generator(resolution).batch(t, label, [int(i) for i in ids])
        return images.float(), labels.float()

    def describe(self) -> dict:
        import dataclasses

        from megaseg.data.synthetic.v1 import GENERATOR_VERSION

        config = dataclasses.asdict(self.config)
        config.pop("size")
        out = {
            "kind": "synthetic",
            "dataset": self.dataset,
            "generator_version": GENERATOR_VERSION,
            "seed_range": [self.seed_offset, self.seed_offset + self.num_tasks],
            "labels_per_task": self.labels_per_task,
            "config": json.loads(json.dumps(config)),
        }
        if self.version != 1:  # v1 records stay as they were, so old draws files replay
            out["generator_version"] = self.version
            out["label_maps"] = self.real_maps
        return out


# ------------------------------------------------------------------------------ arrays / folders


class ArraySource:
    """A dataset held in memory: per task, images and labels with a subject and split each.

    ``tasks``: task name -> dict with ``images`` and ``labels`` ``(n, 1, r, r)`` (or
    ``(n, r, r)``) in [0, 1], ``subjects`` (n strings) and ``splits`` (n of train / val / test).
    Examples are resized to the network's resolution through the shared resize path.
    """

    def __init__(
        self, dataset: str, tasks: Mapping[str, Mapping[str, Any]], info: dict | None = None
    ):
        self.dataset = dataset
        self._data: dict[str, dict[str, Any]] = {}
        for name, t in tasks.items():
            images, labels = (
                np.asarray(t["images"], np.float32),
                np.asarray(t["labels"], np.float32),
            )
            if images.ndim == 3:
                images, labels = images[:, None], labels[:, None]
            n = images.shape[0]
            if labels.shape != images.shape or images.ndim != 4 or images.shape[1] != 1:
                raise ValueError(
                    f"{dataset}/{name}: images {images.shape} and labels {labels.shape} must "
                    "both be (n, 1, r, r)"
                )
            subjects, splits = [str(s) for s in t["subjects"]], [str(s) for s in t["splits"]]
            if len(subjects) != n or len(splits) != n:
                raise ValueError(f"{dataset}/{name}: need one subject and one split per example")
            counters: dict[str, int] = {}
            ids = []
            for split in splits:
                ids.append(f"{split}:{counters.get(split, 0)}")
                counters[split] = counters.get(split, 0) + 1
            self._data[name] = {
                "images": images,
                "labels": labels,
                "index": {i: k for k, i in enumerate(ids)},
                "examples": list(zip(ids, splits, subjects, strict=True)),
            }
        self.info = info or {}

    def __repr__(self) -> str:
        return f"ArraySource({self.dataset!r}, tasks={len(self._data)})"

    def tasks(self) -> list[EvalTask]:
        return [
            pools_from_splits(self.dataset, name, d["examples"]) for name, d in self._data.items()
        ]

    def load(self, task: str, ids: Sequence[str], resolution: int) -> tuple[Tensor, Tensor]:
        d = self._data[task]
        rows = [d["index"][i] for i in ids]
        return (
            _at_resolution(d["images"][rows], resolution),
            _at_resolution(d["labels"][rows], resolution),
        )

    def describe(self) -> dict:
        h = hashlib.sha256()
        for name in sorted(self._data):
            d = self._data[name]
            h.update(name.encode())
            h.update(np.ascontiguousarray(d["images"]).tobytes())
            h.update(np.ascontiguousarray(d["labels"]).tobytes())
            h.update(json.dumps(d["examples"]).encode())
        return {"kind": "arrays", "dataset": self.dataset, "sha256": h.hexdigest(), **self.info}


def folder_source(
    path: str | os.PathLike,
    name: str | None = None,
    resolution: int = 128,
    split_seed: int = 0,
    spec=None,
    slices_per_plane: int = 0,
) -> ArraySource:
    """Any folder data_prep can read (nnU-Net, Decathlon, 2D image/mask pairs) as a source.

    The folder goes through exactly the corpus build's path (``data_prep.pipeline.
    process_folder``: the data_prep reader, the pipeline, uint8 quantization and the subject
    splits with ``seed=split_seed``), so evaluating a folder equals evaluating the corpus built
    from it at ``resolution``. ``spec``: a
    :class:`~data_prep.specs.base.DatasetSpec` (default: detected with ``spec_from_path``).
    A case that cannot be read is skipped with a warning naming the file and the reason.
    ``slices_per_plane`` > 0 adds, per plane and label of a volume, that many slices spread over
    the label's extent (``process_case(extra_slices=...)``): more examples per task than the
    corpus stores, for datasets of few subjects (then it no longer equals the corpus).
    """
    from data_prep.pipeline import process_folder
    from data_prep.specs.adhoc import spec_from_path

    if slices_per_plane < 0:
        raise ValueError(f"{path}: slices_per_plane must be >= 0, got {slices_per_plane}")
    spec = spec or spec_from_path(path, name=name)
    built = process_folder(path, spec, resolution, split_seed, extra_slices=slices_per_plane)
    if built.skipped:
        warnings.warn(
            f"{path}: {len(built.skipped)} case(s) skipped: " + "; ".join(built.skipped),
            stacklevel=2,
        )
    tasks = {
        task: {
            **arrays,
            "images": arrays["images"][:, None].astype(np.float32) / 255,
            "labels": arrays["labels"][:, None].astype(np.float32) / 255,
        }
        for task, arrays in built.tasks.items()
    }
    info = {"kind": "folder", "root": str(Path(path).resolve()), "split_seed": split_seed}
    if slices_per_plane:
        info["slices_per_plane"] = slices_per_plane
    return ArraySource(spec.name, tasks, info=info)


def check_synthetic_version(records: Sequence[dict], version: int | None) -> None:
    """Raise ValueError if ``records`` (``DrawSet.sources``) hold synthetic tasks of another
    generator version than ``version`` (None: any)."""
    recorded = {r.get("generator_version", 1) for r in records if r.get("kind") == "synthetic"}
    if version is not None and recorded and recorded != {version}:
        raise ValueError(
            f"draws: the synthetic tasks were drawn with generator version "
            f"{', '.join(map(str, sorted(recorded)))}, not {version}: replay without "
            "--synthetic-version, or make new draws"
        )


def sources_from_record(
    records: Sequence[dict],
    resolution: int,
    base: str | os.PathLike | None = None,
    synthetic_version: int | None = None,
) -> list[Source]:
    """Re-open the sources a draws file recorded (``DrawSet.sources``), for a replay.

    Corpora and synthetic tasks re-open from their record; folders are re-read (at
    ``resolution``). In-memory arrays cannot be re-opened: pass them as sources. A relative
    root (written by older versions) is looked up beside the draws file, ``base`` (its
    folder), then in the current folder. Synthetic tasks re-open with their recorded generator
    version; ``synthetic_version``, when given, must be that version (else ValueError).
    """
    from megaseg.data.synthetic import HELDOUT_SEED_OFFSET

    check_synthetic_version(records, synthetic_version)
    out: list[Source] = []
    for rec in records:
        kind = rec.get("kind")
        if kind == "corpus":
            out.append(CorpusSource(_recorded_root(rec, base), rec["dataset"]))
        elif kind == "synthetic":
            lo, hi = rec["seed_range"]
            if lo != HELDOUT_SEED_OFFSET:
                raise ValueError(f"draws: synthetic seeds start at {lo}, not the held-out range")
            version = rec.get("generator_version", 1)
            if version not in SYNTHETIC_VERSIONS:
                raise ValueError(
                    f"draws: synthetic generator version {version!r} is unknown to this megaseg "
                    f"(it has {SYNTHETIC_VERSIONS})"
                )
            fields = versions.config_fields(version)
            config = {k: v for k, v in rec.get("config", {}).items() if k in fields}
            out.append(
                SyntheticSource(
                    hi - lo,
                    rec.get("labels_per_task", 1),
                    versions.make_config(version, config),
                    version,
                    real_maps=rec.get("label_maps", "mni152"),
                )
            )
        elif kind == "folder":
            out.append(
                folder_source(
                    _recorded_root(rec, base),
                    rec["dataset"],
                    resolution,
                    rec.get("split_seed", 0),
                    slices_per_plane=rec.get("slices_per_plane", 0),
                )  # fmt: skip
            )
        else:
            raise ValueError(
                f"draws: dataset {rec.get('dataset')!r} was given as in-memory arrays; pass it as "
                "a source to replay it"
            )
    return out


def _recorded_root(rec: dict, base: str | os.PathLike | None) -> Path:
    root = rec.get("root")
    if not isinstance(root, str) or not root:
        raise ValueError(f"draws: dataset {rec.get('dataset')!r} has no recorded 'root' folder")
    path = Path(root)
    if path.is_absolute() or base is None:
        return path
    beside = Path(base) / path
    return beside if beside.exists() or not path.exists() else path


__all__ = [
    "ArraySource",
    "CorpusSource",
    "EvalTask",
    "Source",
    "SyntheticSource",
    "check_synthetic_version",
    "corpus_sources",
    "folder_source",
    "pools_from_splits",
    "sources_from_record",
]
