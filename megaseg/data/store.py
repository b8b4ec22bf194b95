"""The corpus store, read side: cheap random access to 2D examples of binary tasks.

On-disk layout (written by ``data_prep/store_writer.py``; FORMAT_VERSION 1)::

    CORPUS/manifest.json                 written last: a corpus without it is incomplete
    CORPUS/datasets/NAME/index.json      subjects, splits, tasks and their example ranges
    CORPUS/datasets/NAME/examples.npy    int32 (n, 8), one row per example, see EXAMPLE_COLUMNS
    CORPUS/datasets/NAME/images_R.npy    uint8 (n_images, R, R), intensity * 255
    CORPUS/datasets/NAME/labels_R.npy    uint8 (n_labels, R, R), soft label * 255

Rows of ``examples.npy`` are sorted by (task, split, subject, case, slice), so the examples of
one task in one split are the contiguous range that ``index.json`` gives. Image and label rows
are shared between examples (one slice image serves every label task of that slice). The big
arrays are memory-mapped, opened lazily in each process (DataLoader workers included), so a
corpus is never loaded whole.

Which datasets are held out is the experiment's choice: pass the protocol (``load_protocol``)
as ``exclude=`` and the store refuses to serve those datasets' train and val examples.

A dataset rebuilt while a reader has it open (``prep build`` into the corpus of a running fit)
is detected: each dataset records the identity (device, inode, size, mtime) of its files when
its index is read, and a memory map opened later, in a DataLoader worker or at the first
validation, must be of those very files, else :class:`CorpusError`. Maps opened before the
rebuild keep reading the files they opened, which match the index read with them.
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
EXAMPLE_COLUMNS = ("task", "split", "subject", "case", "image_row", "label_row", "slice", "kind")
SLICE_KINDS = ("mid", "max", "2d", "extra")  # mid-slice, largest-label-area slice, a 2D image,
# a slice spread over the label's extent (a spec's slices_per_plane)
_IMAGE_ROW, _LABEL_ROW, _SUBJECT = (
    EXAMPLE_COLUMNS.index(c) for c in ("image_row", "label_row", "subject")
)


@dataclass(frozen=True, order=True)
class TaskKey:
    """One binary task: a label of one modality, seen along one axis, in one subject group."""

    dataset: str
    group: str
    modality: str
    axis: str
    label: str


class Protocol(set):
    """Names of held-out datasets, remembering which protocol file they came from."""

    def __init__(self, names: Iterable[str] = (), name: str = "", path: str = ""):
        super().__init__(names)
        self.name = name
        self.path = path

    def __repr__(self) -> str:
        return f"Protocol({self.name!r}, held_out={sorted(self)})"


def load_protocol(path: str | Path) -> Protocol:
    """Held-out dataset names of an evaluation protocol YAML (``held_out: [name, ...]``).

    Names match datasets case-insensitively and may be shell patterns (``WBC-*``).

    Raises:
        ValueError: the file has no ``held_out`` list of names.
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    names = data.get("held_out") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected 'held_out: [dataset names]', got {names!r}")
    return Protocol(names, name=str(data.get("name", path.stem)), path=str(path))


class CorpusError(Exception):
    """The corpus on disk is missing, incomplete or of another format version."""


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten: (device, inode, size, mtime)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class _Dataset:
    """Index and lazily opened arrays of one dataset of the corpus."""

    def __init__(self, root: Path, name: str):
        self.root = root / "datasets" / name
        # Before reading: a file replaced while being read is then caught at its next open.
        files = {f: _identity(self.root / f) for f in ("index.json", "examples.npy")}
        self.index = json.loads((self.root / "index.json").read_text())
        self.examples = np.load(self.root / "examples.npy")
        self.subjects = self.index["subjects"]
        self.resolutions = tuple(self.index["resolutions"])
        for R in self.resolutions:
            for kind in ("images", "labels"):
                files[f"{kind}_{R}.npy"] = _identity(self.root / f"{kind}_{R}.npy")
        self._files = files
        self.ranges: dict[TaskKey, dict[str, tuple[int, int]]] = {
            TaskKey(name, t["group"], t["modality"], t["axis"], t["label"]): {
                s: tuple(r) for s, r in t["ranges"].items()
            }
            for t in self.index["tasks"]
        }
        self._arrays: dict[tuple[str, int], np.ndarray] = {}

    def array(self, kind: str, resolution: int) -> np.ndarray:
        """``(n, R, R)`` uint8 memory map of ``images`` or ``labels`` at ``resolution``."""
        arr = self._arrays.get((kind, resolution))
        if arr is None:
            if resolution not in self.resolutions:
                raise ValueError(
                    f"{self.root.name}: resolution {resolution} not stored (have {list(self.resolutions)})"
                )
            path = self.root / f"{kind}_{resolution}.npy"
            self._check_unchanged("index.json", "examples.npy", path.name)
            arr = np.load(path, mmap_mode="r")
            self._check_unchanged(path.name)  # and the file mapped is the one checked
            self._arrays[(kind, resolution)] = arr
        return arr

    def _check_unchanged(self, *names: str) -> None:
        for name in names:
            try:
                same = _identity(self.root / name) == self._files[name]
            except FileNotFoundError:
                same = False
            if not same:
                raise CorpusError(
                    f"{self.root / name}: replaced or changed since this corpus was opened (a "
                    "`megaseg prep build` into it while it is read?); the index read then does "
                    "not describe it. Restart the run once the build has finished, and build "
                    "into another --out while a run reads this corpus"
                )

    def __getstate__(self):
        # Memory maps would be pickled as full copies; workers reopen them instead.
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


class Corpus:
    """Read access to a corpus built by ``megaseg prep build``.

    ``exclude``: datasets held out from training (e.g. ``load_protocol(...)``); their train and
    val tasks are never listed and asking for them raises ``ValueError``; their test split
    stays available for evaluation. Names match case-insensitively and may be shell patterns.
    """

    def __init__(self, root: str | Path, exclude: Iterable[str] = ()):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise CorpusError(
                f"{self.root}: no manifest.json: not a corpus, or its build did not finish "
                "(rerun the same `megaseg prep build` command to finish it)"
            )
        try:
            self.manifest: dict = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise CorpusError(
                f"{manifest_path}: unreadable ({type(err).__name__}: {err}); rerun the corpus's "
                "`megaseg prep build` after moving the file away"
            ) from None
        if not isinstance(self.manifest, dict) or not isinstance(
            self.manifest.get("datasets"), dict
        ):
            raise CorpusError(f"{manifest_path}: not a megaseg manifest (no datasets mapping)")
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise CorpusError(
                f"{manifest_path}: format version {version}, this code reads {FORMAT_VERSION}"
            )
        self.datasets: list[str] = sorted(self.manifest["datasets"])
        self._data = {name: self._open(name) for name in self.datasets}
        self._ranges = {k: r for d in self._data.values() for k, r in d.ranges.items()}
        self.exclude = {n.casefold() for n in exclude}
        self._protocol = getattr(exclude, "name", "") or "exclude="
        unknown = {p for p in self.exclude if not any(_matches(d, {p}) for d in self.datasets)}
        if unknown:
            warnings.warn(
                f"{self.root}: held-out datasets not in this corpus (protocol {self._protocol}): "
                f"{sorted(unknown)}",
                stacklevel=2,
            )

    def _open(self, name: str) -> _Dataset:
        """The dataset ``name`` listed by the manifest; CorpusError naming what is missing."""
        try:
            return _Dataset(self.root, name)
        except FileNotFoundError as err:
            # a build killed while swapping a rebuilt dataset into place leaves it absent
            raise CorpusError(
                f"{self.root}: dataset {name!r} is listed in manifest.json but "
                f"{err.filename} is missing: a build of this corpus was interrupted; rerun "
                "the same `megaseg prep build` command to finish it"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorpusError(
                f"{self.root / 'datasets' / name}: unreadable ({type(err).__name__}: {err}); "
                "run `megaseg prep verify` on the corpus"
            ) from None

    def __repr__(self) -> str:
        return f"Corpus({str(self.root)!r}, datasets={len(self.datasets)}, exclude={sorted(self.exclude)})"

    def resolutions(self, dataset: str) -> tuple[int, ...]:
        """The resolutions ``R`` at which ``dataset``'s examples are stored, ascending.

        Raises:
            KeyError: no dataset of that name in the corpus (the message lists them).
        """
        try:
            return tuple(sorted(self._data[dataset].resolutions))
        except KeyError:
            raise KeyError(
                f"{self.root}: no dataset {dataset!r}; have {', '.join(self.datasets)}"
            ) from None

    def _served(self, dataset: str, split: str, exclude: set[str]) -> bool:
        if _matches(dataset, exclude):
            return False
        return split == "test" or not _matches(dataset, self.exclude)

    def tasks(self, split: str, exclude: Iterable[str] = ()) -> list[TaskKey]:
        """Sorted tasks with at least one example in ``split``, without excluded datasets."""
        _check_split(split)
        extra = {n.casefold() for n in exclude}
        return sorted(
            k for k, r in self._ranges.items()
            if self._served(k.dataset, split, extra) and r[split][1] > r[split][0]
        )  # fmt: skip

    def _range(self, key: TaskKey, split: str) -> tuple[int, int]:
        _check_split(split)
        if split != "test" and _matches(key.dataset, self.exclude):
            raise ValueError(
                f"dataset {key.dataset!r} is held out by protocol {self._protocol!r}: "
                f"its {split} examples are not served for training"
            )
        try:
            return self._ranges[key][split]
        except KeyError:
            raise KeyError(f"{self.root}: no task {key}") from None

    def num_examples(self, key: TaskKey, split: str) -> int:
        start, stop = self._range(key, split)
        return stop - start

    def subjects(self, key: TaskKey, split: str) -> list[str]:
        """Subject id of each example index of ``key`` in ``split``."""
        start, stop = self._range(key, split)
        d = self._data[key.dataset]
        return [d.subjects[i] for i in d.examples[start:stop, _SUBJECT]]

    def _rows(self, key: TaskKey, indices: Sequence[int] | np.ndarray, split: str) -> np.ndarray:
        start, stop = self._range(key, split)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= stop - start):
            raise IndexError(
                f"{key} {split}: index out of range [0, {stop - start}): {idx.tolist()}"
            )
        return self._data[key.dataset].examples[start + idx]

    def load(
        self, key: TaskKey, index: int, resolution: int, split: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(1, R, R)`` and soft label ``(1, R, R)``, float32 in [0, 1]."""
        images, labels = self.load_many(key, [index], resolution, split)
        return images[0], labels[0]

    def load_many(
        self,
        key: TaskKey,
        indices: Sequence[int] | np.ndarray,
        resolution: int,
        split: str,
        raw: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images ``(n, 1, R, R)`` and soft labels ``(n, 1, R, R)``, float32 in [0, 1]; with
        ``raw``, the stored uint8 (value * 255), for a conversion on the training device."""
        rows = self._rows(key, indices, split)
        d = self._data[key.dataset]
        images = d.array("images", resolution)[rows[:, _IMAGE_ROW]]
        labels = d.array("labels", resolution)[rows[:, _LABEL_ROW]]
        if not raw:
            images, labels = _to_unit(images), _to_unit(labels)
        return images[:, None], labels[:, None]


def _matches(dataset: str, patterns: set[str]) -> bool:
    """``dataset`` matches one of the casefolded names / shell patterns."""
    name = dataset.casefold()
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


UNIT = np.float32(1 / 255)  # a stored uint8 value times UNIT is the float32 in [0, 1]


def _to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 ``(n, R, R)`` -> float32 in [0, 1]."""
    return np.multiply(x, UNIT, dtype=np.float32)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
