"""One pipeline for every dataset: a loaded case -> the 2D examples the corpus stores; the build.

Per case (``process_case``):

1. check: finite intensities, label shape == image shape, at least one declared label present;
2. volumes only: orient to RAS and resample to the spec's spacing (``resample.py``: MONAI's
   ``Orientation`` and ``Spacing`` grid; linear for the image, nearest for the label map);
3. window each channel over the whole volume (``megaseg.preprocess.normalize_intensity`` with
   the channel's modality, or the spec's window);
4. pick slices: along each plane of the spec, the mid-slice and, per label, the slice with the
   largest area of that label. A task (channel, plane, label) gets the slices among these where
   the label is present: its max-area slice, plus the mid-slice when the label shows there.
   A 2D image is one slice on the axis "2d";
5. each slice -> ``prepare_image(..., normalize=False)`` / ``prepare_label`` (pad to square,
   blur-then-resize) at every stored resolution, quantized to uint8.

Subject splits are :mod:`data_prep.splits`; :func:`build_corpus` (and :func:`write_dataset`, for
in-memory sources) runs the cases of whole datasets through ``process_case`` into the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import select
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep import splits
from data_prep.readers.base import Case, CaseError, LoadedCase
from data_prep.readers.io import LIMIT_VARIABLES, label_values, max_labels, set_limits
from data_prep.resample import orient_and_resample
from data_prep.specs.base import check_dataset_name
from megaseg.cluster import as_finished
from megaseg.deprecation import moved
from megaseg.paths import atomic_write
from megaseg.preprocess import normalize_intensity, prepare_image, prepare_label

# Bump when a change here alters what is stored for a case: finished shards of an older
# version are then recomputed instead of reused.
PIPELINE_VERSION = 2  # 2: separable float32 resampling (data_prep/resample.py)
DEFAULT_RESOLUTIONS = (64, 128, 256)
PLANES = ("sagittal", "coronal", "axial")  # array axes 0, 1, 2 of a RAS-oriented volume
AXIS_2D = "2d"


@dataclass
class CaseSlices:
    """What the store keeps of one case.

    images: resolution -> ``(n_images, R, R)`` uint8 (intensity in [0, 1] * 255, rounded).
    labels: resolution -> ``(n_labels, R, R)`` uint8 (soft mask * 255, rounded).
    examples: ``(modality, axis, label, image_row, label_row, slice, kind)`` per example, rows
    indexing the arrays above; ``kind`` is "mid", "max" or "2d".
    """

    images: dict[int, np.ndarray]
    labels: dict[int, np.ndarray]
    examples: list[tuple[str, str, str, int, int, int, str]] = field(default_factory=list)


# -- spec fields ------------------------------------------------------------------------------


def case_labels(case: Case, spec, label_map: np.ndarray | None = None) -> list[tuple[str, int]]:
    """``(name, value)`` of the foreground labels of a case, sorted by value.

    The reader's (``case.labels``, from dataset.json or the spec), else the spec's
    ``{value: name}``, else every nonzero value present in ``label_map`` (named by its value).
    """
    pairs = dict(case.labels) or dict(getattr(spec, "labels", None) or {})
    if not pairs and label_map is not None:
        values = label_values(label_map)
        values = values[values != 0]
        if len(values) > max_labels():
            # each value would become a task: hundreds of values are a mislabelled file (an
            # image saved as a label, a float map), not hundreds of structures
            raise CaseError(
                f"{case.label_path}: {len(values)} distinct label values and none declared; more "
                f"than {max_labels()} (MEGASEG_MAX_LABELS / --max-labels) is refused: declare "
                "the labels in dataset.json or the spec"
            )
        pairs = {int(v): str(int(v)) for v in values}
    return sorted(((str(n), int(v)) for v, n in pairs.items() if int(v) != 0), key=lambda p: p[1])


def spec_planes(spec) -> tuple[int, ...]:
    """Array axes (0 sagittal, 1 coronal, 2 axial) to slice along; all three by default."""
    return tuple(sorted(set(getattr(spec, "planes", None) or (0, 1, 2))))


def spec_spacing(spec) -> tuple[float, float, float]:
    """Target voxel spacing in mm (the spec's isotropic ``spacing_mm``, default 1 mm)."""
    return (float(getattr(spec, "spacing_mm", None) or 1.0),) * 3


def channel_modalities(spec, loaded: LoadedCase) -> list[str]:
    """One unique modality name per image channel: the reader's, else the spec's."""
    n = loaded.image.shape[0]
    names = list(loaded.channel_names) if len(loaded.channel_names) == n else []
    if not names:
        default = str(getattr(spec, "modality", None) or "unknown")
        names = [default] if n == 1 else [f"{default}_{i}" for i in range(n)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return unique


# -- one case -----------------------------------------------------------------------------------


def _image_path(case: Case):
    """The file an image problem is reported against (the label's, for in-memory cases)."""
    return case.image_paths[0] if case.image_paths else case.label_path


def check_case(case: Case, loaded: LoadedCase, labels: Sequence[tuple[str, int]]) -> None:
    """Raise :class:`CaseError` naming the file when the case cannot be used."""
    image, label = loaded.image, loaded.label
    where = _image_path(case)
    if label.ndim not in (2, 3) or image.ndim != label.ndim + 1:
        raise CaseError(
            f"{where}: expected image (C, *S) and label S with S 2D or 3D, got image "
            f"{image.shape} and label {label.shape} ({case.label_path})"
        )
    if image.shape[1:] != label.shape:
        raise CaseError(
            f"{where}: image shape {image.shape[1:]} does not match label shape {label.shape} "
            f"({case.label_path})"
        )
    if not np.isfinite(image).all():
        raise CaseError(f"{where}: NaN or inf intensities")
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool) or (
        label.size and label.min() < 0
    ):
        raise CaseError(
            f"{case.label_path}: label must hold non-negative integers, got {label.dtype}"
        )
    present = label_values(label)
    present = present[present != 0]
    if present.size == 0:
        raise CaseError(f"{case.label_path}: empty label")
    values = sorted(v for _, v in labels)
    if not np.isin(present, values).any():
        raise CaseError(
            f"{case.label_path}: empty label (none of the declared labels {values} present)"
        )


def compact_label(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``label`` with ``values[k]`` -> ``k + 1`` and every other value -> 0, as int32.

    ``values`` sorted ascending, non-negative. Memory: a few copies of ``label``, whatever
    the values (a lookup table only when the largest value is small).
    """
    label = np.asarray(label)
    if label.dtype == bool:
        label = label.view(np.uint8)
    values = np.asarray(values, dtype=np.int64)
    top = int(label.max()) if label.size else 0
    if top < 1 << 16:
        lut = np.zeros(top + 1, np.int32)
        keep = values[(values >= 0) & (values <= top)]
        lut[keep] = np.searchsorted(values, keep) + 1
        return lut[label]
    index = np.clip(np.searchsorted(values, label), 0, len(values) - 1)
    return np.where(values[index] == label, index + 1, 0).astype(np.int32)


def label_areas(label: np.ndarray, axis: int, num_values: int) -> np.ndarray:
    """``(n_slices, num_values)`` pixel count of each label value in each slice along ``axis``.

    ``label`` holds integers in ``[0, num_values)``. One bincount per slice: faster than one
    bincount over the whole volume, which needs a volume-sized index array.
    """
    return np.stack(
        [
            np.bincount(np.take(label, i, axis).ravel(), minlength=num_values)
            for i in range(label.shape[axis])
        ]
    )


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice of ``volume (X, Y, Z)``, rotated so that superior (or anterior, axial) is up."""
    return np.rot90(np.take(volume, index, axis=axis)).copy()


def _quantize(x: torch.Tensor) -> np.ndarray:
    """``(1, R, R)`` float in [0, 1] -> ``(R, R)`` uint8."""
    return np.rint(x[0].numpy() * 255).astype(np.uint8)


def extra_slice_indices(areas: np.ndarray, count: int, min_fraction: float = 0.25) -> list[int]:
    """``count`` slice indices spread evenly over the slices where a label is large: those
    whose area (``areas (n_slices,)``) is at least ``min_fraction`` of its largest."""
    if count <= 0 or not areas.any():
        return []
    candidates = np.flatnonzero(areas >= min_fraction * areas.max())
    picks = np.linspace(0, len(candidates) - 1, min(count, len(candidates)))
    return sorted({int(candidates[int(round(p))]) for p in picks})


def process_case(
    case: Case,
    loaded: LoadedCase,
    spec,
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    extra_slices: int = 0,
) -> CaseSlices:
    """Run the whole per-case pipeline (see the module docstring).

    ``extra_slices``: per plane and label of a volume, also this many slices spread evenly over
    the label's extent (:func:`extra_slice_indices`; kind "extra"): corpus builds take the
    spec's ``slices_per_plane``; evaluation of a folder its ``--slices-per-plane``, to get more
    than two slices per task from a dataset of few subjects.

    Raises:
        CaseError: the case cannot be used (the message names the file and the reason).
    """
    labels = case_labels(case, spec, loaded.label)
    check_case(case, loaded, labels)
    modalities = channel_modalities(spec, loaded)
    # label values -> 1..n in label order (others 0): any declared value (even 2**40) then
    # fits int32 and the per-slice bincounts are n + 1 wide; names, not values, are stored
    image, label = np.asarray(loaded.image), compact_label(loaded.label, [v for _, v in labels])
    labels = [(name, k) for k, (name, _) in enumerate(labels, 1)]
    if loaded.is_3d:
        if loaded.affine is None:
            raise CaseError(f"{_image_path(case)}: volume without an affine")
        try:
            image, label = orient_and_resample(image, label, loaded.affine, spec_spacing(spec))
        except CaseError as err:
            raise CaseError(f"{_image_path(case)}: {err}") from err
    window = getattr(spec, "window", None)
    try:
        image = np.stack(
            [normalize_intensity(image[c], m, window) for c, m in enumerate(modalities)]
        )
    except ValueError as err:
        raise CaseError(f"{_image_path(case)}: {err}") from err

    # (axis name, axis, slice index, kind, label name, label value) of every example slice.
    picks: list[tuple[str, int | None, int, str, str, int]] = []
    num_values = len(labels) + 1
    if loaded.is_3d:
        for axis in spec_planes(spec):
            areas = label_areas(label, axis, num_values)
            mid = label.shape[axis] // 2
            for name, value in labels:
                if areas[:, value].any():
                    best = int(np.argmax(areas[:, value]))
                    if areas[mid, value] and mid != best:
                        picks.append((PLANES[axis], axis, mid, "mid", name, value))
                    picks.append(
                        (PLANES[axis], axis, best, "mid" if best == mid else "max", name, value)
                    )
                    taken = {best, mid} if areas[mid, value] else {best}
                    for index in extra_slice_indices(areas[:, value], extra_slices):
                        if index not in taken:
                            picks.append((PLANES[axis], axis, index, "extra", name, value))
    else:
        picks = [(AXIS_2D, None, 0, "2d", n, v) for n, v in labels if (label == v).any()]
    if not picks:
        raise CaseError(
            f"{case.label_path}: empty label after resampling to {spec_spacing(spec)} mm"
        )

    image_rows: dict[tuple[int, int | None, int], int] = {}
    label_rows: dict[tuple[int | None, int, int], int] = {}
    image_slices, label_slices = [], []
    out = CaseSlices(images={}, labels={})
    for c, modality in enumerate(modalities):
        for axis_name, axis, index, kind, name, value in picks:
            ikey, lkey = (c, axis, index), (axis, index, value)
            if ikey not in image_rows:
                image_rows[ikey] = len(image_slices)
                image_slices.append(image[c] if axis is None else _slice(image[c], axis, index))
            if lkey not in label_rows:
                label_rows[lkey] = len(label_slices)
                mask = label == value if axis is None else _slice(label, axis, index) == value
                label_slices.append(mask.astype(np.float32))
            out.examples.append(
                (modality, axis_name, name, image_rows[ikey], label_rows[lkey], index, kind)
            )
    for r in resolutions:
        out.images[r] = np.stack(
            [_quantize(prepare_image(s, r, normalize=False)[0]) for s in image_slices]
        )
        out.labels[r] = np.stack([_quantize(prepare_label(s, r)) for s in label_slices])
    return out


# -- a whole dataset in memory ------------------------------------------------------------------


@dataclass
class MemoryDataset:
    """A dataset read and processed as a corpus build would store it, held in memory.

    ``tasks``: ``"group/modality/axis/label"`` -> ``{"images", "labels"}`` (``(n, R, R)`` uint8,
    the store's quantization), ``"subjects"`` and ``"splits"`` (one per example), in task-name
    order. ``skipped``: ``"case_id: reason"`` of each case that could not be used.
    """

    name: str
    tasks: dict[str, dict]
    skipped: list[str]
    num_cases: int


def process_folder(
    path, spec, resolution: int, split_seed: int = 0, extra_slices: int = 0
) -> MemoryDataset:
    """Every case of the folder ``path`` (read as ``spec`` says) through :func:`process_case`
    at one ``resolution``, with the subject splits of :func:`data_prep.splits.assign_splits`
    (``seed=split_seed``): the examples a corpus build of the folder would store, without
    writing anything (``megaseg evaluate --folder``). A case that cannot be read is skipped and
    named in ``skipped``. ``extra_slices``: as in :func:`process_case`; an extra slice identical
    to one its task already holds is dropped (a left-right symmetric volume, such as the MNI152
    template, has mirror-image sagittal slices; a query whose twin is in the support would be
    scored on a copy of its answer).

    Raises ValueError naming ``path`` when no case is usable.
    """
    from data_prep.readers import get_reader

    reader = get_reader(spec.reader)
    cases = reader.cases(Path(path), spec)
    per_task: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    skipped = []
    for case in cases:
        try:
            slices = process_case(
                case, reader.load(case), spec, (resolution,), extra_slices=extra_slices
            )
        except CaseError as e:
            skipped.append(f"{case.case_id}: {e}")
            continue
        seen: set[tuple[str, bytes]] = set()
        for modality, axis, label, irow, lrow, _, kind in slices.examples:
            task = f"{case.group}/{modality}/{axis}/{label}"
            image, mask = slices.images[resolution][irow], slices.labels[resolution][lrow]
            fingerprint = (task, image.tobytes() + mask.tobytes())
            if kind == "extra" and fingerprint in seen:
                continue
            seen.add(fingerprint)
            per_task.setdefault(task, []).append((case.subject, image, mask))
    if not per_task:
        reasons = "".join(f"; {r}" for r in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise ValueError(
            f"{path}: no usable case ({len(cases)} found, {len(skipped)} skipped{reasons})"
        )
    split_of = splits.assign_splits(
        {s for ex in per_task.values() for s, _, _ in ex}, spec.name, split_seed
    )
    tasks = {
        task: {
            "images": np.stack([im for _, im, _ in ex]),
            "labels": np.stack([lab for _, _, lab in ex]),
            "subjects": [s for s, _, _ in ex],
            "splits": [split_of[s] for s, _, _ in ex],
        }
        for task, ex in sorted(per_task.items())
    }
    return MemoryDataset(spec.name, tasks, skipped, len(cases))


# -- the build: readers -> process_case -> shards -> consolidation -> manifest -------------------


@dataclass
class DatasetJob:
    """One dataset to build: its spec, its cases and how to load one.

    ``load`` and ``spec`` must be picklable for ``workers > 1`` (a reader's bound ``load`` is).
    ``fingerprint(case)`` identifies the case's inputs (default: the files' sizes and times);
    in-memory sources (synthetic tasks) pass their own, e.g. generator version and seed.
    """

    spec: object
    cases: list[Case]
    load: Callable[[Case], LoadedCase]
    fingerprint: Callable[[Case], str] | None = None


def job_from_spec(spec, root) -> DatasetJob:
    """The job of a dataset spec whose files are in folder ``root`` (raises DatasetError)."""
    from data_prep.readers import get_reader

    reader = get_reader(spec.reader)
    return DatasetJob(spec, reader.cases(Path(root), spec), reader.load)


@dataclass
class BuildSummary:
    """What a build did. ``fatal`` is set when ``strict`` stopped it (nothing was written)."""

    written: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    reused_cases: int = 0
    reused_datasets: list[str] = field(default_factory=list)
    failed_datasets: dict[str, str] = field(default_factory=dict)
    fatal: str | None = None

    @property
    def ok(self) -> bool:
        return self.fatal is None and not self.failed_datasets

    def text(self) -> str:
        n_written, n_skipped = sum(self.written.values()), sum(map(len, self.skipped.values()))
        lines = [
            f"cases written: {n_written}, skipped: {n_skipped}"
            + (f" (done by an earlier run: {self.reused_cases})" if self.reused_cases else "")
        ]
        for name in sorted(set(self.written) | set(self.skipped)):
            lines.append(
                f"  {name}: {self.written.get(name, 0)} written, {len(self.skipped.get(name, []))} skipped"
            )
            lines += [
                f"    skipped {case}: {reason}" for case, reason in self.skipped.get(name, [])
            ]
        if self.reused_datasets:
            lines.append(f"datasets already complete: {', '.join(self.reused_datasets)}")
        lines += [
            f"dataset {name} FAILED: {why}" for name, why in sorted(self.failed_datasets.items())
        ]
        if self.fatal:
            lines.append(f"STOPPED (--strict): {self.fatal}; the corpus was not changed")
        return "\n".join(lines)


_WORKER: dict = {}


def _init_worker(specs, loads, resolutions, strict, limits=None, parent=None) -> None:
    """Set up a worker. ``limits``: the build's limit variables; ``parent``: PID of the build
    process, watched so the worker exits when the build dies (see :func:`_exit_with`)."""
    torch.set_num_threads(1)  # parallelism is across cases; also keeps results bit-identical
    _WORKER.clear()  # nothing of an earlier build in this process (a cluster run's token)
    _WORKER.update(specs=specs, loads=loads, resolutions=resolutions, strict=strict)
    if limits is not None:
        set_limits(limits)
    if parent is not None:
        _WORKER["marked"] = True
        _exit_with(parent)


def _exit_with(pid: int) -> None:
    """Exit this process as soon as process ``pid`` ends.

    A worker's parent is the forkserver, not the build, and a killed build (kill -9) leaves
    the pool's queues open, so without this the workers (and through them the forkserver and
    the resource tracker, which share their pipes) wait forever. A pidfd (Linux >= 5.3)
    wakes the watcher when ``pid`` ends; elsewhere it polls ``os.kill(pid, 0)`` twice a second.
    """

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])
            os._exit(1)
        while True:
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):  # gone, or reused by another user
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="exit-with-build", daemon=True).start()


def _started(npz: Path) -> Path:
    """Marker a worker keeps beside a case's shard while it processes the case."""
    return npz.with_suffix(".started")


def _run_case(item) -> tuple[int, int, str | None]:
    """Process one case and write its shard (or its skip record); returns the skip reason."""
    from data_prep.store_writer import write_shard, write_skip

    j, i, case, npz, skip = item
    spec, resolutions = _WORKER["specs"][j], _WORKER["resolutions"]
    _check_current_run()
    if _WORKER.get("marked"):  # in a worker: names the case if this process dies
        npz.parent.mkdir(parents=True, exist_ok=True)
        _started(npz).write_text(str(os.getpid()))
    try:
        # getattr: write_dataset takes any spec object, as the other spec fields read here
        extra = getattr(spec, "slices_per_plane", 0)
        slices = process_case(case, _WORKER["loads"][j](case), spec, resolutions, extra)
    except CaseError as err:
        reason = str(err)
    except (Exception, MemoryError) as err:  # a damaged file can make any library raise
        reason = f"{case.label_path}: {type(err).__name__}: {err}"
    else:
        _check_current_run()
        write_shard(npz, case, slices, resolutions)
        _started(npz).unlink(missing_ok=True)
        return j, i, None
    if not _WORKER["strict"]:
        _check_current_run()
        write_skip(skip, case, reason)
    _started(npz).unlink(missing_ok=True)
    return j, i, reason


def _run_cases(pending: list, workers: int, init: tuple, cluster=None, run=None):
    """Yield ``(job, case, skip reason or None)`` per pending case, here, in worker processes
    or on a Dask ``cluster`` (:func:`_cluster_cases`).

    A case that kills its worker process (the OS's out-of-memory killer, a crash in a file
    reader) breaks the pool: the cases then in flight (those with a ``.started`` marker) are
    rerun one at a time in a pool of their own; the one that breaks it again is skipped and
    named, and the other cases continue in a new pool.
    """
    if cluster is not None:
        yield from _cluster_cases(cluster, pending, init, run)
        return
    if workers <= 1 or len(pending) <= 1:
        threads = torch.get_num_threads()
        _init_worker(*init)
        try:
            yield from map(_run_case, pending)
        finally:
            torch.set_num_threads(threads)
        return
    # forkserver: workers fork from a server process that imported the pipeline (and MONAI)
    # once but never ran torch ops, so no thread-pool state is forked, and starting a worker
    # costs no import (spawn took ~10 s per worker on a busy 2-core machine).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.pipeline", "monai.transforms"])
    init = (*init, os.getpid())
    strict = init[3]
    queue = list(pending)
    while queue:
        broken = yield from _pool_round(ctx, workers, init, queue)
        if not broken:
            return
        suspects = [item for item in broken if _started(item[3]).exists()]
        if not suspects:
            raise BrokenProcessPool("a worker process died outside any case")
        for item in suspects:
            _started(item[3]).unlink(missing_ok=True)
            if (yield from _pool_round(ctx, 1, init, [item])):
                yield _worker_died(item, strict)
        queue = [item for item in broken if item not in suspects]


def _worker_died(item, strict: bool) -> tuple[int, int, str]:
    """Skip (and name) a case whose worker process died each time it ran."""
    from data_prep.store_writer import write_skip

    j, i, case, npz, skip = item
    _started(npz).unlink(missing_ok=True)
    reason = (
        f"{case.label_path}: the worker process died while processing this case "
        "(killed by the OS, e.g. out of memory, or a crash in a file reader)"
    )
    if not strict:
        write_skip(skip, case, reason)
    return j, i, reason


def _pool_round(ctx, workers: int, init: tuple, items: list):
    """Run ``items`` in a new pool, yielding results; returns the items its breaking stopped."""
    broken = []
    with ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=init) as pool:
        for item, result in as_finished(pool, _run_case, items, survive=(BrokenProcessPool,)):
            if isinstance(result, BrokenProcessPool):
                broken.append(item)
            else:
                yield result
    return broken


# -- the build on a Dask cluster ---------------------------------------------------------------

RUN_FILE = "run.json"  # in WORK_DIR: the running build's token; tasks of any other write nothing


def _cluster_cases(cluster, pending: list, init: tuple, run: tuple[Path, str]):
    """Yield ``(job, case, skip reason or None)`` per pending case, each a Dask task.

    Dask reruns a case whose worker died on another worker. A case given up by the scheduler
    (it was on more dying workers than ``allowed-failures``, see ``megaseg.cluster``) is
    skipped and named, as in the local pool, when its ``.started`` marker shows it was running
    there; one that was only queued on workers that died running other cases is resubmitted.
    """
    # Sent with each task, not scattered once: scattered data dies with the workers holding
    # it (a case that kills two workers would take it along), a task's arguments do not.
    setup = (init, run)
    queue = [_on_shared_filesystem(item) for item in pending]
    for item in queue:  # markers of an earlier, killed run would name innocent cases
        _started(item[3]).unlink(missing_ok=True)
    while queue:
        done = as_finished(
            cluster.executor, _run_case_in_cluster, queue, setup, survive=(cluster.worker_died,)
        )
        queue = []
        try:
            for item, result in done:
                if not isinstance(result, BaseException):
                    yield result
                elif _started(item[3]).exists():
                    yield _worker_died(item, init[3])
                else:
                    queue.append(item)
        finally:
            done.close()


def _on_shared_filesystem(item):
    """A pending case with absolute input and output paths: workers do not share the client's
    working directory. (In-memory cases, which have no image file, keep their label_path.)"""
    j, i, case, npz, skip = item
    if case.image_paths:
        case = dataclasses.replace(
            case,
            image_paths=tuple(Path(p).absolute() for p in case.image_paths),
            label_path=Path(case.label_path).absolute(),
            mask_paths=tuple(Path(p).absolute() for p in case.mask_paths),
        )
    return j, i, case, npz.absolute(), skip.absolute()


_SETUP_LOCK = threading.Lock()


def _run_case_in_cluster(setup, item) -> tuple[int, int, str | None]:
    """:func:`_run_case` in a Dask worker; ``setup`` = ``(init, run)`` of :func:`_run_cases`."""
    init, run = setup
    with _SETUP_LOCK:
        if _WORKER.get("run") != run:  # this build's first case in this process
            _init_worker(*init)
            _WORKER.update(marked=True, run=run)
    return _run_case(item)


class StaleBuild(RuntimeError):
    """A Dask task of a build that stopped (its client was killed) while a newer build of the
    corpus started or finished: the task writes nothing, so the corpus stays the newer one's."""


def _check_current_run() -> None:
    """Raise :class:`StaleBuild` in a Dask task whose build is no longer the corpus's."""
    run = _WORKER.get("run")
    if run is None:  # the local pool: its workers die with their build
        return
    path, token = run
    try:
        current = path.read_text() == token
    except OSError:
        current = False
    if not current:
        raise StaleBuild(f"{path}: not this build's token any more; nothing written")


def _start_run(out: Path, cluster) -> tuple[Path, str] | None:
    """Make the tasks of an earlier, killed cluster build stale; a new token when on a cluster."""
    from data_prep import store_writer as sw

    path = (out / sw.WORK_DIR / RUN_FILE).absolute()
    if cluster is None:
        path.unlink(missing_ok=True)
        return None
    token = uuid.uuid4().hex
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(token.encode()))
    return path, token


def build_corpus(
    jobs: Sequence[DatasetJob],
    out,
    workers: int = 1,
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    strict: bool = False,
    seed: int = 0,
    progress: bool = True,
    scheduler: str | None = None,
) -> BuildSummary:
    """Build (or finish building) the corpus ``out`` from ``jobs``; see ``store_writer``.

    Resumable: rerunning the same call after a kill reuses every finished shard and dataset.
    ``strict``: the first bad case stops the build; the corpus is left as it was (the resume
    cache of other datasets and of earlier runs included).
    ``scheduler``: a Dask scheduler address or ``local:N`` (:mod:`megaseg.cluster`): each case
    is a task on its workers, which read the inputs and write the shards into ``out`` (a
    shared filesystem, the same absolute paths); ``workers`` is then unused. The corpus is the
    same as a local build's, and either resumes the other's interrupted build. Raises
    ``megaseg.cluster.SchedulerError`` (before anything is written when the scheduler cannot be
    reached; a lost scheduler leaves the finished shards for a rerun).

    Raises ValueError for a bad job (a name that is not a plain folder name, no cases) and
    ``store_writer.BuildRefused`` when the build would replace a path megaseg did not write
    or another build holds the corpus. Limits on input files: ``MEGASEG_MAX_VOXELS`` and
    ``MEGASEG_MAX_LABELS`` (``data_prep.readers.io``), passed on to the workers.
    """
    from data_prep import store_writer as sw

    out = Path(out)
    resolutions = tuple(sorted(int(r) for r in resolutions))
    names = [job.spec.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"dataset names given twice: {sorted(n for n in set(names) if names.count(n) > 1)}"
        )
    for job in jobs:
        check_dataset_name(job.spec.name)
        if not job.cases:
            raise ValueError(f"dataset {job.spec.name!r}: no cases found")
    if out.exists() and not out.is_dir():
        raise sw.BuildRefused(f"{out}: exists and is not a folder")
    sw.check_owned(out, names)  # before anything is created: a refused build leaves no trace
    with contextlib.ExitStack() as stack:
        cluster = None
        if scheduler is not None:  # connected before anything is created, too
            from megaseg.cluster import connect

            cluster = stack.enter_context(connect(scheduler))
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        with sw.build_lock(out):
            sw.check_owned(out, names)  # again, now that no other build can change the corpus
            work_existed = (out / sw.WORK_DIR).exists()
            sw.make_work_dir(out)
            return _build(
                jobs, out, workers, resolutions, strict, seed, progress, created, work_existed,
                cluster,
            )  # fmt: skip


def write_dataset(
    out: str | Path,
    spec: Any,
    cases: Sequence[Case],
    load: Callable[[Case], Any],
    fingerprint: Callable[[Case], str],
    **build_options,
):
    """Write one dataset from any source into the corpus ``out``, in the same format and through
    the same pipeline as a public dataset; returns the :class:`BuildSummary`.

    The hook for synthetic tasks (``prep synth``): ``cases`` from :func:`memory_case`,
    ``load(case) -> LoadedCase`` with a ``(C, H, W)`` image and an ``(H, W)`` integer label map
    (0 = background), ``fingerprint(case)`` a string that changes whenever the arrays would
    (e.g. generator version + seed), and ``spec`` any object with ``name`` and the provenance
    fields (``licence``, ``source``...). ``build_options``: ``workers`` (``load`` must then be
    picklable), ``resolutions``, ``seed``, ``strict``, ``progress``. Other datasets already in
    ``out`` are kept; the manifest is rewritten over all of them.
    """
    return build_corpus([DatasetJob(spec, list(cases), load, fingerprint)], out, **build_options)


def _shard_files(job: DatasetJob, out: Path, resolutions, seed: int):
    """A dataset's build key and the ``(shard, skip record)`` paths of each of its cases.

    Both hash everything the output depends on (spec, resolutions, pipeline and format
    versions, each case's fields and input fingerprint; the seed for the build key only).
    """
    from data_prep import store_writer as sw

    job_key = sw._hash([PIPELINE_VERSION, sw.FORMAT_VERSION, sw.spec_record(job.spec), resolutions])
    fingerprint = job.fingerprint or sw.file_fingerprint
    fps = [sw.case_fingerprint(c, fingerprint(c), job_key) for c in job.cases]
    pairs = list(zip(job.cases, fps, strict=True))
    build_key = sw._hash([job_key, seed, [(c.case_id, fp) for c, fp in pairs]])
    folder = sw.shard_dir(out, job.spec.name)
    stems = [sw.shard_stem(c.case_id, fp) for c, fp in pairs]
    return build_key, [(folder / f"{s}.npz", folder / f"{s}.skip.json") for s in stems]


def _build(
    jobs, out: Path, workers, resolutions, strict, seed, progress, created, work_existed, cluster
) -> BuildSummary:
    from tqdm import tqdm

    from data_prep import store_writer as sw
    from megaseg.progress import progress_options

    names = [job.spec.name for job in jobs]
    summary = BuildSummary()
    plans, pending = [], []
    for j, job in enumerate(jobs):
        name = job.spec.name
        build_key, files = _shard_files(job, out, resolutions, seed)
        plans.append((job, build_key, files))
        if sw.dataset_is_current(out, name, build_key):
            summary.reused_datasets.append(name)
            continue
        for i, (case, (npz, skip)) in enumerate(zip(job.cases, files, strict=True)):
            if npz.is_file() or (skip.is_file() and not strict):
                summary.reused_cases += 1
            elif skip.is_file():
                summary.fatal = json.loads(skip.read_text())["reason"]
                break
            else:
                pending.append((j, i, case, npz, skip))

    limits = {name: os.environ.get(name) for name in LIMIT_VARIABLES}
    init = ([job.spec for job in jobs], [job.load for job in jobs], resolutions, strict, limits)
    bar = tqdm(total=len(pending), desc="cases", unit="case", disable=not progress or not pending,
               **progress_options())  # fmt: skip
    run = _start_run(out, cluster)
    results = _run_cases(pending if summary.fatal is None else [], workers, init, cluster, run)
    try:
        for j, i, reason in results:
            bar.update()
            if reason is not None:
                bar.write(f"skipped {names[j]}/{jobs[j].cases[i].case_id}: {reason}")
                if strict:
                    summary.fatal = reason
                    break
    finally:
        results.close()  # strict stop: cases not started are cancelled, running ones finish
    bar.close()
    if run is not None:  # first: cluster tasks still running now write nothing
        run[0].unlink(missing_ok=True)
    if summary.fatal is not None:
        # only what this run wrote: the shards it finished before the stop (the resume cache
        # of earlier runs and other datasets stays), then the folders it made, if now empty
        for _, _, _, npz, skip in pending:
            npz.unlink(missing_ok=True)
            skip.unlink(missing_ok=True)
            _started(npz).unlink(missing_ok=True)
        for job in jobs:
            _remove_empty(sw.shard_dir(out, job.spec.name))
        _remove_empty(out / sw.WORK_DIR / "shards")
        if not work_existed:
            (out / sw.WORK_DIR / sw.WORK_MARKER).unlink(missing_ok=True)
            _remove_empty(out / sw.WORK_DIR)
        if created:
            (out / sw.LOCK).unlink(missing_ok=True)
            _remove_empty(out)
        return summary

    for job, build_key, files in plans:
        name = job.spec.name
        if name in summary.reused_datasets:
            continue
        shards, skipped = [], []
        for case, (npz, skip) in zip(job.cases, files, strict=True):
            if npz.is_file():
                shards.append((case, npz))
            else:
                skipped.append((case, json.loads(skip.read_text())["reason"]))
        summary.written[name] = len(shards)
        summary.skipped[name] = [(c.case_id, r) for c, r in skipped]
        try:
            sw.consolidate_dataset(out, job.spec, shards, skipped, seed, resolutions, build_key)
        except ValueError as err:
            summary.failed_datasets[name] = str(err)
    sw.write_manifest(out)
    # the resume cache of these datasets is spent; another dataset's (an interrupted build of
    # it) stays until that build is rerun
    for job in jobs:
        shutil.rmtree(sw.shard_dir(out, job.spec.name), ignore_errors=True)
    shutil.rmtree(out / sw.WORK_DIR / "staging", ignore_errors=True)
    _remove_empty(out / sw.WORK_DIR / "shards")
    work = out / sw.WORK_DIR
    if work.is_dir() and {p.name for p in work.iterdir()} <= {sw.WORK_MARKER}:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _remove_empty(folder: Path) -> None:
    """Remove ``folder`` if it is an empty folder."""
    try:
        folder.rmdir()
    except OSError:
        pass


__getattr__ = moved(
    __name__,
    {
        "SPLIT_FRACTIONS": "data_prep.splits:SPLIT_FRACTIONS",
        "assign_splits": "data_prep.splits:assign_splits",
        "natural_split": "data_prep.splits:natural_split",
        "subject_unit": "data_prep.splits:subject_unit",
    },
)
