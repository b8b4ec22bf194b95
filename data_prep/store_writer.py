"""The corpus store, write side: per-case shards, atomic consolidation, manifest, checksums.

The format is described in ``megaseg/data/store.py`` (the read side). Writing happens in
three steps, each safe to kill at any moment:

1. every finished case becomes its own shard under ``CORPUS/.build/shards/DATASET/``: an
   ``.npz`` (arrays + metadata) or, for a case that was skipped, a ``.skip.json`` with the
   reason. Each is written to a temporary file, fsynced and renamed into place, so the set of
   shard files *is* the journal of finished cases. A shard's name holds a fingerprint of its
   inputs (files' sizes and times, the spec, the resolutions, the pipeline version): a shard
   whose inputs changed is recomputed, never reused;
2. a dataset whose cases are all done is consolidated into a staging folder
   (``.build/staging/DATASET``), fsynced, then renamed to ``datasets/DATASET``. Its
   ``build_key.json`` (hash of the fingerprints, seed, resolutions; not checksummed, as it
   depends on file times) lets a rerun recognise a finished dataset and leave it alone;
3. ``manifest.json``, listing every dataset under ``datasets/`` with provenance, tasks, counts,
   splits and the sha256 of each file, is written last, atomically. A corpus without a
   manifest is incomplete; once the manifest is written the work folder is removed.

Only what megaseg marked is ever deleted or replaced (:func:`check_owned`, before anything is
written): ``.build`` holds ``megaseg-work.json``, a dataset folder its ``build_key.json``, and
``manifest.json`` must parse as a manifest. ``.lock`` (``flock``, holding the builder's PID)
keeps two builds of one corpus apart.

Everything checksummed is deterministic (sorted, no timestamps, no absolute output paths), so
a build that was killed and resumed verifies and equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.readers.base import Case
from data_prep.splits import assign_splits, declared_splits
from megaseg import paths
from megaseg.data.store import EXAMPLE_COLUMNS, FORMAT_VERSION, SLICE_KINDS, SPLITS
from megaseg.deprecation import moved
from megaseg.paths import fsync_path, pid_lock, sha256_file

WORK_DIR = ".build"
WORK_MARKER = "megaseg-work.json"  # in WORK_DIR: marks it as megaseg's, so a build may delete it
LOCK = ".lock"
MANIFEST = "manifest.json"
BUILD_KEY = "build_key.json"  # per dataset: hash of its inputs, to recognise a finished dataset
ARRAY_KINDS = ("images", "labels")
# Spec fields that are provenance or change what the pipeline stores; ``root`` (a local path)
# and ``notes`` are left out so a corpus does not depend on where its inputs were.
SPEC_FIELDS = (
    "name", "reader", "modality", "planes", "window", "spacing_mm", "labels", "structures",
    "subject_regex", "case_regex", "group", "layout", "licence", "citation", "source", "version",
)  # fmt: skip


class BuildRefused(ValueError):
    """A build would touch a path megaseg did not write, or another build holds the corpus.

    A user error: the message names the path and what to do; the CLI exits 2 on it.
    """


@contextlib.contextmanager
def build_lock(out: Path):
    """Hold an exclusive lock on corpus ``out``; the file ``out/.lock`` holds the holder's PID
    (:func:`megaseg.paths.pid_lock`: a killed build's lock is taken over). Raises BuildRefused
    naming the lock and the PID of the build that holds it.
    """
    path = Path(out) / LOCK
    busy = lambda pid: BuildRefused(  # noqa: E731
        f"{out}: another build is writing this corpus (lock {path}, held by PID {pid}); wait for "
        "it or stop it"
    )
    with pid_lock(path, busy=busy, refused=BuildRefused):
        yield


def _is_megaseg_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"format_version", "datasets", "files"} <= data.keys()


def check_owned(out: Path, names: Sequence[str]) -> None:
    """Raise BuildRefused naming the path when a build of ``names`` into ``out`` would delete
    or replace something megaseg did not write.

    A build replaces ``datasets/NAME`` (megaseg's when it holds a ``build_key.json``),
    ``manifest.json`` (megaseg's when it parses as a manifest) and works in ``.build`` (megaseg's
    when it holds :data:`WORK_MARKER`); anything else at those paths is refused.
    """
    out = Path(out)
    work = out / WORK_DIR
    if (work.exists() or work.is_symlink()) and not (
        work.is_dir() and not work.is_symlink() and (work / WORK_MARKER).is_file()
    ):
        raise BuildRefused(
            f"{work}: exists but megaseg did not make it (no {WORK_MARKER}); the build would "
            "delete it: move it away or choose another --out"
        )
    manifest = out / MANIFEST
    if (manifest.exists() or manifest.is_symlink()) and (
        manifest.is_symlink() or not _is_megaseg_manifest(manifest)
    ):
        raise BuildRefused(
            f"{manifest}: not a megaseg manifest (unreadable, not JSON or without format_version, "
            "datasets and files); the build would replace it: move it away or choose another --out"
        )
    datasets = out / "datasets"
    if datasets.is_symlink() or (datasets.exists() and not datasets.is_dir()):
        raise BuildRefused(
            f"{datasets}: not a folder megaseg made (a link or a file); the build writes its "
            "datasets there: move it away or choose another --out"
        )
    for name in names:
        folder = dataset_dir(out, name)
        if (folder.exists() or folder.is_symlink()) and not _is_dataset_folder(folder):
            raise BuildRefused(
                f"{folder}: exists but megaseg did not write it (no {BUILD_KEY}); building "
                f"dataset {name!r} would replace it: move it away or choose another --out"
            )


def _is_dataset_folder(folder: Path) -> bool:
    """A consolidated dataset folder megaseg wrote: a real folder with a readable build key."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        return "build_key" in json.loads((folder / BUILD_KEY).read_text())
    except (OSError, ValueError, TypeError):
        return False


def make_work_dir(out: Path) -> Path:
    """``out/.build`` with its marker (call :func:`check_owned` first)."""
    work = Path(out) / WORK_DIR
    work.mkdir(exist_ok=True)
    if not (work / WORK_MARKER).is_file():
        paths.atomic_write_json(work / WORK_MARKER, {"written_by": "megaseg prep build"})
    return work


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# -- specs and fingerprints ------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-safe, deterministic copy of a spec field (mappings sorted, tuples -> lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def spec_record(spec: Any) -> dict:
    """The spec's provenance and pipeline fields as plain JSON (see :data:`SPEC_FIELDS`).

    Labels are recorded as ``{"value": name}`` whether the spec holds a mapping or
    ``(value, name)`` pairs (``DatasetSpec``), so the record does not depend on that choice.
    """
    record = {f: _plain(getattr(spec, f, None)) for f in SPEC_FIELDS}
    labels = getattr(spec, "labels", None)
    if labels is not None:
        record["labels"] = _plain(dict(labels))
    if getattr(spec, "slices_per_plane", 0):  # only when set: older build keys stay the same
        record["slices_per_plane"] = int(spec.slices_per_plane)
    split = getattr(spec, "split", None)
    if split and not isinstance(split, str):  # per subject: recorded (card, build key)
        record["split"] = {str(x): str(s) for x, s in split}
    return record


def file_fingerprint(case: Case) -> str:
    """Identity of a case's input files: path, size and modification time of each."""
    stats = []
    for path in (*case.image_paths, case.label_path, *case.mask_paths):
        try:
            st = os.stat(path)
            stats.append((str(path), st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((str(path), None, None))
    return _hash(stats)


def case_fingerprint(case: Case, inputs: str, job_key: str) -> str:
    """Hash of everything a case's shard depends on."""
    fields = {f.name: _plain(getattr(case, f.name)) for f in dataclasses.fields(case)}
    fields.pop("image_paths"), fields.pop("label_path"), fields.pop("mask_paths")
    return _hash([job_key, fields, inputs])[:20]


# -- shards ---------------------------------------------------------------------------------------


def shard_dir(out: Path, dataset: str) -> Path:
    return Path(out) / WORK_DIR / "shards" / paths.slug(dataset)


def shard_stem(case_id: str, fingerprint: str) -> str:
    return f"{paths.slug(case_id)}-{fingerprint}"


def write_shard(path: Path, case: Case, slices, resolutions: Sequence[int]) -> None:
    """One finished case -> ``path`` (``.npz``): ``images_R``, ``labels_R`` and ``meta`` (JSON)."""
    meta = {
        "case_id": case.case_id,
        "subject": case.subject,
        "group": case.group,
        "examples": [list(e) for e in slices.examples],
        "rows": {k: len(getattr(slices, k)[resolutions[0]]) for k in ARRAY_KINDS},
    }
    arrays = {f"{k}_{r}": getattr(slices, k)[r] for k in ARRAY_KINDS for r in resolutions}
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a path would get ".npz" appended by numpy
            np.savez(f, **arrays)

    paths.atomic_write(path, write)


def write_skip(path: Path, case: Case, reason: str) -> None:
    paths.atomic_write_json(path, {"case_id": case.case_id, "reason": reason})


def read_shard_meta(path: Path) -> dict:
    with np.load(path) as z:
        return json.loads(z["meta"].tobytes().decode())


# -- consolidation ----------------------------------------------------------------------------


def dataset_dir(out: Path, dataset: str) -> Path:
    return Path(out) / "datasets" / dataset


def dataset_is_current(out: Path, dataset: str, build_key: str) -> bool:
    """True when ``datasets/DATASET`` is complete and was built from the same inputs."""
    path = dataset_dir(out, dataset) / BUILD_KEY
    try:
        return json.loads(path.read_text()).get("build_key") == build_key
    except (OSError, ValueError):
        return False


def consolidate_dataset(
    out: Path,
    spec: Any,
    shards: Sequence[tuple[Case, Path]],
    skipped: Sequence[tuple[Case, str]],
    seed: int,
    resolutions: Sequence[int],
    build_key: str,
) -> Path:
    """Shards of one dataset -> ``datasets/NAME/`` (arrays, examples, index, card, preview).

    Built in ``.build/staging/NAME`` and renamed into place, so ``datasets/NAME`` is always
    either absent, an older complete build, or this complete build.
    """
    from data_prep.card import write_card, write_preview

    name = spec.name
    if not shards:
        raise ValueError(f"dataset {name!r}: no usable case ({len(skipped)} skipped)")
    shards = sorted(shards, key=lambda cs: cs[0].case_id)
    metas = [read_shard_meta(path) for _, path in shards]
    subjects = sorted({m["subject"] for m in metas})
    split_of = declared_splits(spec, subjects) or assign_splits(subjects, name, seed)

    offsets = {k: np.cumsum([0] + [m["rows"][k] for m in metas]) for k in ARRAY_KINDS}
    task_keys, examples = _example_table(metas, offsets, subjects, split_of)
    staging = Path(out) / WORK_DIR / "staging" / paths.slug(name)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _concatenate_shards(staging, [path for _, path in shards], offsets, resolutions)
    np.save(staging / "examples.npy", examples)
    tasks = _task_ranges(task_keys, examples)

    per_split_subjects = {s: [x for x in subjects if split_of[x] == s] for s in SPLITS}
    info = {
        "spec": spec_record(spec),
        "seed": seed,
        "resolutions": list(resolutions),
        "cases": {
            "found": len(shards) + len(skipped),
            "written": len(shards),
            "skipped": len(skipped),
        },
        "skipped": [
            {"case_id": c.case_id, "reason": r}
            for c, r in sorted(skipped, key=lambda x: x[0].case_id)
        ],
        "subjects": {s: len(v) for s, v in per_split_subjects.items()},
        "split_fractions": {
            s: round(len(v) / len(subjects), 4) for s, v in per_split_subjects.items()
        },
        "examples": {s: int((examples[:, 1] == i).sum()) for i, s in enumerate(SPLITS)},
        "num_images": int(offsets["images"][-1]),
        "num_labels": int(offsets["labels"][-1]),
        "labels": sorted({t[3] for t in task_keys}),
        "modalities": sorted({t[1] for t in task_keys}),
        "axes": sorted({t[2] for t in task_keys}),
    }
    index = {
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "resolutions": list(resolutions),
        "image_dtype": "uint8",
        "label_dtype": "uint8",
        "example_columns": list(EXAMPLE_COLUMNS),
        "slice_kinds": list(SLICE_KINDS),
        "subjects": subjects,
        "subject_split": [split_of[s] for s in subjects],
        "cases": [
            {"case_id": c.case_id, "subject": m["subject"], "group": m["group"]}
            for (c, _), m in zip(shards, metas, strict=True)
        ],
        "tasks": tasks,
        "info": info,
    }
    paths.atomic_write_json(staging / "index.json", index)
    write_preview(staging / "preview.png", staging, index)
    write_card(staging / "card.md", index)
    checksums = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    paths.atomic_write_json(staging / "checksums.json", checksums)
    # Not checksummed: it hashes the inputs' paths and modification times.
    paths.atomic_write_json(staging / BUILD_KEY, {"build_key": build_key})
    for p in staging.iterdir():
        fsync_path(p)
    fsync_path(staging)
    _swap_into_place(staging, dataset_dir(out, name))
    return dataset_dir(out, name)


def _example_table(
    metas: list[dict], offsets: dict, subjects: list[str], split_of: dict[str, str]
) -> tuple[list[tuple], np.ndarray]:
    """Sorted task keys ``(group, modality, axis, label)`` and the ``(n, 8)`` int32 example
    table (columns ``EXAMPLE_COLUMNS``), rows sorted so each (task, split) is contiguous."""
    task_keys = sorted({(m["group"], *e[:3]) for m in metas for e in m["examples"]})
    task_index = {t: i for i, t in enumerate(task_keys)}
    subject_index = {s: i for i, s in enumerate(subjects)}
    rows = []
    for c, m in enumerate(metas):
        for modality, axis, label, irow, lrow, slice_, kind in m["examples"]:
            rows.append((
                task_index[(m["group"], modality, axis, label)],
                SPLITS.index(split_of[m["subject"]]),
                subject_index[m["subject"]],
                c,
                offsets["images"][c] + irow,
                offsets["labels"][c] + lrow,
                slice_,
                SLICE_KINDS.index(kind),
            ))  # fmt: skip
    return task_keys, np.array(sorted(rows), dtype=np.int32).reshape(-1, len(EXAMPLE_COLUMNS))


def _concatenate_shards(
    folder: Path, shards: list[Path], offsets: dict, resolutions: Sequence[int]
) -> None:
    """Shard arrays, in case order -> ``folder/{images,labels}_R.npy`` (uint8), one pass."""
    arrays = {
        (k, r): np.lib.format.open_memmap(
            folder / f"{k}_{r}.npy", "w+", np.uint8, (int(offsets[k][-1]), r, r)
        )
        for k in ARRAY_KINDS
        for r in resolutions
    }
    for c, path in enumerate(shards):
        with np.load(path) as z:
            for (k, r), arr in arrays.items():
                arr[offsets[k][c] : offsets[k][c + 1]] = z[f"{k}_{r}"]
    for arr in arrays.values():
        arr.flush()


def _task_ranges(task_keys: list[tuple], examples: np.ndarray) -> list[dict]:
    """The ``index.json`` entry of each task: its key and ``[start, stop)`` rows per split."""
    order = examples[:, 0].astype(np.int64) * len(SPLITS) + examples[:, 1]
    tasks = []
    for t, (group, modality, axis, label) in enumerate(task_keys):
        codes = [t * len(SPLITS) + s for s in range(len(SPLITS))]
        ranges = {
            split: [
                int(np.searchsorted(order, code, "left")),
                int(np.searchsorted(order, code, "right")),
            ]
            for split, code in zip(SPLITS, codes, strict=True)
        }
        tasks.append(
            {"group": group, "modality": modality, "axis": axis, "label": label, "ranges": ranges}
        )
    return tasks


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace ``final`` (megaseg's, checked by :func:`check_owned`) by ``staging``.

    A kill between the two renames leaves ``final`` absent: a rerun rebuilds it, and
    ``Corpus`` / ``prep info`` say so instead of failing on a missing file.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    trash = staging.with_name(staging.name + ".old")
    shutil.rmtree(trash, ignore_errors=True)
    if final.exists() or final.is_symlink():
        if not _is_dataset_folder(final):
            raise BuildRefused(f"{final}: exists but megaseg did not write it (no {BUILD_KEY})")
        os.replace(final, trash)
    os.replace(staging, final)
    fsync_path(final.parent)
    shutil.rmtree(trash, ignore_errors=True)


# -- manifest ------------------------------------------------------------------------------------


def complete_datasets(out: Path) -> list[str]:
    """Names of the consolidated datasets under ``out/datasets`` (those with a checksums file)."""
    root = Path(out) / "datasets"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "checksums.json").is_file())


def write_manifest(out: Path) -> dict | None:
    """Write ``manifest.json`` over every complete dataset (none: nothing written); returns it.

    Written last, atomically: the corpus is complete once it exists.
    """
    import megaseg

    out = Path(out)
    datasets, tasks, files = {}, [], {}
    for name in complete_datasets(out):
        folder = dataset_dir(out, name)
        index = json.loads((folder / "index.json").read_text())
        sums = json.loads((folder / "checksums.json").read_text())
        files |= {f"datasets/{name}/{k}": v for k, v in sums.items()}
        files[f"datasets/{name}/checksums.json"] = sha256_file(folder / "checksums.json")
        subjects = index["subjects"]
        datasets[name] = index["info"] | {
            "splits": {
                s: [x for x, y in zip(subjects, index["subject_split"], strict=True) if y == s]
                for s in SPLITS
            },
            "num_tasks": len(index["tasks"]),
        }
        for t in index["tasks"]:
            counts = {s: r[1] - r[0] for s, r in t["ranges"].items()}
            tasks.append(
                {
                    "dataset": name,
                    **{k: t[k] for k in ("group", "modality", "axis", "label")},
                    **counts,
                }
            )
    if not datasets:
        return None
    for stale in out.glob(f".{MANIFEST}.*.tmp"):  # left by a build killed while writing it
        stale.unlink(missing_ok=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "megaseg_version": megaseg.__version__,
        "datasets": datasets,
        "tasks": tasks,
        "files": dict(sorted(files.items())),
    }
    paths.atomic_write_json(out / MANIFEST, manifest)
    return manifest


def verify_files(out: Path) -> list[str]:
    """Problems with a corpus's files: format version, missing files, checksum mismatches."""
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        return [f"{path}: missing: the corpus is incomplete (rerun its build)"]
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return [f"{path}: unreadable manifest ({type(err).__name__}: {err})"]
    if not isinstance(manifest, dict):
        return [f"{path}: not a manifest (a JSON {type(manifest).__name__}, expected an object)"]
    problems = []
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(
            f"{path}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [*problems, f"{path}: no files mapping (path -> sha256)"]
    for rel, digest in files.items():
        f = out / rel
        if not f.resolve().is_relative_to(out.resolve()):
            problems.append(f"{path}: file {rel!r} lies outside the corpus")
        elif not f.is_file():
            problems.append(f"{f}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{f}: checksum mismatch")
    return problems


# -- other sources: synthetic tasks and any in-memory arrays ----------------------------------


def memory_case(
    dataset: str,
    case_id: str,
    subject: str,
    labels: dict[int, str],
    group: str = "all",
    channel_names: Sequence[str] = (),
) -> Case:
    """A :class:`Case` with no files behind it, for sources that make arrays in memory."""
    return Case(
        dataset=dataset,
        case_id=case_id,
        subject=subject,
        image_paths=(),
        label_path=Path(f"<memory>/{dataset}/{case_id}"),
        group=group,
        channel_names=tuple(channel_names),
        labels=tuple(sorted((int(v), str(n)) for v, n in labels.items() if int(v) != 0)),
    )


def _atomic_write_file(path: Path, write: Callable[[Any], None]) -> None:
    """The old ``store_writer.atomic_write``: ``write`` gets an open binary file."""

    def write_path(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    paths.atomic_write(path, write_path)


__getattr__ = moved(
    __name__,
    {
        "check_dataset_name": "data_prep.specs.base:check_dataset_name",
        "write_dataset": "data_prep.pipeline:write_dataset",
        "atomic_write": ("megaseg.paths:atomic_write", _atomic_write_file),
        "atomic_write_json": "megaseg.paths:atomic_write_json",
        "fsync_dir": "megaseg.paths:fsync_path",
    },
)
