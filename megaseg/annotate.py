"""Annotate a whole volume from a few labelled slices, guided by the model's uncertainty.

    seg = Segmenter.from_checkpoint("megaseg_generalist")
    session = VolumeSession(seg, "t1.nii.gz", axis=2)
    session.add(90, labels_of_slice_90)             # (H, W) integer map: 0 bg, 1, 2, ...
    result = session.segment()                      # result.labels, .uncertainty, .slice_scores
    for index in session.suggest(2):                # the slices worth labelling next
        session.add(index, label_them(index))
    session.segment()                               # only the slices whose support changed
    session.save("labels.nii.gz")                   # + labels_uncertainty.nii.gz, same affine

How a slice is segmented. Every unlabelled slice is a query whose support set is its
``max_support`` nearest labelled slices along the axis (the slices that look most like it), so
the cost of a call does not grow with the number of labelled slices, and adding a slice only
changes the slices around it. The default, 2 (about one labelled slice on each side), was the
most accurate setting measured with 3 and 6 labelled slices and 0.004 short of 1 with 10
(benchmarks/annotate_loop.py, "support per slice": on MNI152 more or all labelled slices as
support gave a lower Dice and took longer). When the
support has at least ``min_ensemble_support`` slices (only with a larger ``max_support``), the
prediction is the mean over ``ensemble`` random support subsets of half its size; their
disagreement shows up in the uncertainty. Labelled slices keep their labels as given.

Uncertainty. Per voxel, the binary entropy (bits, in [0, 1]) of each label's mean probability,
the largest over labels: 0 where every member is sure, 1 where the mean is 0.5 (members that
disagree, or one member that hesitates). The slice score is the mean voxel uncertainty of the
slice: about how many of its voxels may be wrong, as a fraction of the slice.

What is cached between calls: the windowed and resized query slices (once per session), and
each slice's probabilities with the labelled slices (and their versions) they came from; a call
recomputes only the slices whose nearest labelled slices changed, and returns the previous
result at once when nothing changed.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megaseg.inference import (
    _input_path,
    _label_dtype,
    _load_volume,
    _same_file,
    merge_labels,
)
from megaseg.interpolate import (
    distance_prior,
    follow,
    guided_plan,
    holding,
    shape_between,
    taper,
)
from megaseg.metrics import mask_dice
from megaseg.outputs import check_replaceable, record
from megaseg.paths import atomic_write_all
from megaseg.preprocess import normalize_intensity, prepare_image, restore

ProgressCallback = Callable[[int, int], None]
"""``callback(done, total)``: slices predicted so far out of the slices this call predicts."""

_CHUNK = 16  # queries per forward call: small enough for a progress bar that moves
_DENSE = 2.0  # labelled slices this close (mean, in slices) know the end: _assemble_guided
METHODS = ("guided", "model", "interpolate")
_SAVED_BY = b"megaseg annotate"  # the header's descrip: informative, not proof of ownership


@dataclass(frozen=True)
class SessionResult:
    """What :meth:`VolumeSession.segment` returns, in the volume's own ``(X, Y, Z)`` layout.

    Attributes:
        labels: ``(X, Y, Z)`` integer label map, the smallest of uint8 / int16 / int32 /
            int64 that holds its values: the labelled slices as given, every other slice
            predicted.
        uncertainty: ``(X, Y, Z)`` float32 in [0, 1] (see the module doc); 0 on labelled slices.
        slice_scores: ``(D,)`` float32 along the axis, the mean uncertainty of each slice.
        labelled: the indices of the labelled slices, sorted.
        predicted: how many slices this call had to predict (0: all came from the cache).
        seconds: wall time of the call.
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    slice_scores: np.ndarray
    labelled: tuple[int, ...]
    predicted: int
    seconds: float


class VolumeSession:
    """One volume, one slicing axis, the labelled slices and the model's guesses for the rest.

    Args:
        segmenter: a :class:`megaseg.Segmenter` (its support set is replaced by each call).
        volume: ``(X, Y, Z)`` array or tensor, a NIfTI path, or a loaded nibabel image.
        axis: the slicing axis, 0, 1 or 2 (negative allowed); slice ``i`` is
            ``np.take(volume, i, axis)``, shape ``(H, W)``.
        modality, window: intensity windowing of the whole volume (see
            :func:`megaseg.preprocess.normalize_intensity`); default: the segmenter's, else
            CT when the volume holds values below -500 (Hounsfield units; a warning says
            so), else min-max.
        affine: ``(4, 4)`` voxel-to-world matrix for :meth:`save` and the voxel sizes
            (``reach``) when ``volume`` is an array (default identity); a NIfTI input keeps
            its own.
        max_support: each slice's support is its ``max_support`` nearest labelled slices
            (None: all of them).
        ensemble: support subsets averaged per prediction once the support is large enough
            (at most as many as there are distinct subsets).
        min_ensemble_support: the smallest support that is split into an ensemble.
        method: how unlabelled slices are labelled (see the module doc): ``"guided"`` (the
            default: interpolation between labelled slices corrected by the model, and beyond
            them only what the model follows with confidence), ``"model"`` (every slice of the
            volume from the model alone), ``"interpolate"`` (shape-based interpolation between
            labelled slices, no model: instant).
        reach: ``"guided"``: how far beyond the outermost labelled slice of a structure the
            model may follow it, in mean spacings of that structure's labelled slices (with
            one labelled slice: as far as the structure is wide in it, in slices by the
            voxel sizes of ``affine`` or the file's, isotropic without); it stops earlier
            where its mask collapses or its confidence drops. Its probabilities are mixed
            with a shape that shrinks to nothing within that reach; where the model still
            sees the structure one more reach on (a look-alike that goes on), it weighs at
            most as much as that shape.
        prior_weight: ``"guided"``: weight of the interpolated shape against the model's
            probability between labelled slices (0: the model alone, 1: interpolation alone);
            None (default): chosen per structure from how well each predicts the labelled
            slices when they are left out in turn.
        stride: ``"guided"``: the model predicts every ``stride``-th slice of each run of
            consecutive slices it helps fill (and the run's last); a slice between two
            predicted ones takes the linear mix of their probabilities, by distance. 1: every
            slice: 2.6x the CPU time of the default, 3, on a 200-slice volume; on the 13
            structures of the volume benchmark a mean Dice 0.002 higher, 0.032 on a thin skull
            bone (docs/results/annotate_speed.md).
        progress: show a tqdm bar during :meth:`segment`.

    Raises:
        ValueError: a volume that is not 3D or holds NaN/inf, an axis that does not exist.
    """

    def __init__(
        self,
        segmenter,
        volume,
        axis: int = 2,
        *,
        modality: str | None = None,
        window: tuple[float, float] | None = None,
        affine: np.ndarray | None = None,
        max_support: int | None = 2,
        ensemble: int = 3,
        min_ensemble_support: int = 4,
        method: str = "guided",
        reach: float = 1.0,
        prior_weight: float | None = None,
        stride: int = 3,
        progress: bool = True,
    ):
        data, image = _load_volume(volume)
        data = data.astype(np.float32, copy=False)
        if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not -3 <= axis < 3:
            raise ValueError(
                f"axis: {axis!r} does not exist; a 3D volume {data.shape} has axes 0, 1 and 2"
            )
        if max_support is not None and max_support < 1:
            raise ValueError(f"max_support: must be >= 1 or None, got {max_support}")
        if ensemble < 1:
            raise ValueError(f"ensemble: must be >= 1, got {ensemble}")
        if min_ensemble_support < 2:
            raise ValueError(f"min_ensemble_support: must be >= 2, got {min_ensemble_support}")
        if method not in METHODS:
            raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
        if not reach > 0:
            raise ValueError(f"reach: must be > 0 (in labelled-slice spacings), got {reach!r}")
        if prior_weight is not None and not 0 <= prior_weight <= 1:
            raise ValueError(f"prior_weight: must be in [0, 1], got {prior_weight!r}")
        if isinstance(stride, bool) or not isinstance(stride, int | np.integer) or stride < 1:
            raise ValueError(f"stride: must be an integer >= 1, got {stride!r}")
        self.segmenter = segmenter
        self.axis = int(axis) % 3
        self.shape: tuple[int, int, int] = tuple(int(s) for s in data.shape)
        # the arguments, else the card's; HU-like values: CT, with a warning (Segmenter.windowing)
        self.modality, self.window = segmenter.windowing(data, modality, window, "volume")
        self.max_support = max_support
        self.ensemble = int(ensemble)
        self.min_ensemble_support = int(min_ensemble_support)
        self.method = method
        self.reach = float(reach)
        self.prior_weight = None if prior_weight is None else float(prior_weight)
        self.stride = int(stride)
        self.progress = progress
        self._image = image  # nibabel image or None
        self._source = _input_path(volume)  # the file read, never written over
        if affine is not None:
            affine = np.asarray(affine, dtype=np.float64)
            if affine.shape != (4, 4):
                raise ValueError(f"affine: expected a (4, 4) matrix, got shape {affine.shape}")
        world = affine if image is None else image.affine  # a file keeps its own
        self._affine = None if world is None else np.asarray(world, dtype=np.float64)
        # (nibabel gives a file's image nonzero voxel sizes: only a given affine is checked)
        if self._affine is not None and not _voxels_ok(self._affine):
            raise ValueError(
                f"affine gives voxel sizes {_voxel_sizes(self._affine)}; every voxel axis "
                "needs a finite, nonzero length (the slice spacing decides how far a structure "
                "labelled on one slice is followed)"
            )
        # in-plane pixel size over the slice spacing (rows, columns): from the affine, else 1
        self._scale = _scale(self._affine, self.axis)
        try:
            windowed = normalize_intensity(data, self.modality, self.window)
        except ValueError as e:
            raise ValueError(f"volume: {e}") from e
        # Slices first, (D, H, W), windowed once as a whole so every slice (support or query)
        # sees the same intensity mapping.
        self._slices = np.ascontiguousarray(np.moveaxis(windowed, self.axis, 0))
        self._queries: torch.Tensor | None = None  # (D, 1, R, R), prepared on first use
        self._pad = None
        self._labels: dict[int, np.ndarray] = {}  # index -> (H, W) integer map
        self._versions: dict[int, int] = {}  # index -> edit counter, part of cache keys
        self._edits = 0
        self._cache: dict[int, tuple[tuple, tuple[int, ...], torch.Tensor]] = {}
        self._result: SessionResult | None = None
        self._result_key: tuple | None = None

    # ------------------------------------------------------------------ labelled slices

    @property
    def depth(self) -> int:
        """D, the number of slices along the axis."""
        return self.shape[self.axis]

    @property
    def slice_shape(self) -> tuple[int, int]:
        """``(H, W)`` of one slice."""
        return tuple(s for a, s in enumerate(self.shape) if a != self.axis)

    @property
    def labelled(self) -> tuple[int, ...]:
        """Indices of the labelled slices, sorted."""
        return tuple(sorted(self._labels))

    def image(self, index: int) -> np.ndarray:
        """The windowed slice ``index``, ``(H, W)`` float32 in [0, 1]."""
        return self._slices[self._check_index(index, "index")]

    def labels_of(self, index: int) -> np.ndarray:
        """The labels given for slice ``index`` (a copy). Raises KeyError if it has none."""
        if index not in self._labels:
            raise KeyError(f"slice {index} has no labels; labelled: {list(self.labelled)}")
        return self._labels[index].copy()

    def add(self, index: int, labels) -> VolumeSession:
        """Label slice ``index`` (new or corrected) with an ``(H, W)`` integer map; returns self.

        0 is background, every other value a structure (several at once allowed), up to
        2**63 - 1. A slice whose labels are all 0 is kept as given (it stays background) but
        cannot serve as a support example. Raises ValueError for an index outside the volume,
        a map of another shape, or values that are not integers in that range.
        """
        index = self._check_index(index, "index")
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
        lab = np.asarray(lab)
        where = f"labels for slice {index} (axis {self.axis})"
        if lab.shape != self.slice_shape:
            raise ValueError(
                f"{where}: shape {lab.shape} does not match the slice shape {self.slice_shape} "
                f"of volume {self.shape}"
            )
        if lab.dtype == bool:
            lab = lab.astype(np.uint8)
        if lab.dtype.kind == "f":
            if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
                raise ValueError(f"{where}: expected integer label values, got fractional ones")
        elif lab.dtype.kind not in "iu":
            raise ValueError(f"{where}: expected an integer label map, got dtype {lab.dtype}")
        if lab.min() < 0:
            raise ValueError(f"{where}: label values must be >= 0 (0 = background)")
        if lab.max() >= 2**63:  # would wrap around in the int64 the session keeps
            raise ValueError(
                f"{where}: label value {lab.max()} is above the largest supported, 2**63 - 1"
            )
        self._labels[index] = lab.astype(np.int64)
        self._edits += 1
        self._versions[index] = self._edits
        return self

    def add_volume(self, label_volume, indices: Sequence[int] | None = None) -> VolumeSession:
        """Take labelled slices from an ``(X, Y, Z)`` label volume; returns self.

        ``indices`` None: every slice along the axis that holds a nonzero label (what a user
        painted). Slices whose labels did not change keep their cached predictions.
        """
        vol = np.asarray(label_volume)
        if vol.shape != self.shape:
            raise ValueError(
                f"label_volume: shape {vol.shape} does not match the volume {self.shape}"
            )
        stack = np.moveaxis(vol, self.axis, 0)
        if indices is None:
            indices = np.flatnonzero(stack.reshape(self.depth, -1).any(axis=1)).tolist()
        for i in indices:
            i = self._check_index(i, "indices")
            if i in self._labels and np.array_equal(self._labels[i], stack[i]):
                continue
            self.add(i, stack[i])
        return self

    def remove(self, index: int) -> VolumeSession:
        """Forget the labels of slice ``index`` (it will be predicted again); returns self."""
        index = self._check_index(index, "index")
        if self._labels.pop(index, None) is not None:
            self._versions.pop(index)
            self._edits += 1
        return self

    def _check_index(self, index, name: str) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise ValueError(f"{name}: slice index must be an integer, got {index!r}")
        if not 0 <= index < self.depth:
            raise ValueError(
                f"{name}: slice {index} is outside the volume; axis {self.axis} of {self.shape} "
                f"has slices 0..{self.depth - 1}"
            )
        return int(index)

    # ------------------------------------------------------------------ segmentation

    def support_for(self, index: int) -> tuple[int, ...]:
        """The labelled slices (with foreground) that serve as support for slice ``index``:
        the ``max_support`` nearest along the axis (ties: the lower index), sorted; never
        ``index`` itself (a labelled slice is predicted from the others to score the model)."""
        usable = [i for i in self.labelled if i != index and self._labels[i].any()]
        usable.sort(key=lambda i: (abs(i - index), i))
        if self.max_support is not None:
            usable = usable[: self.max_support]
        return tuple(sorted(usable))

    def segment(self, callback: ProgressCallback | None = None) -> SessionResult:
        """Label every unlabelled slice (``method``); see :class:`SessionResult`.

        ``callback(done, total)`` is called after each chunk of slices (for a GUI); it may
        raise to cancel. Raises ValueError when no labelled slice has any foreground.
        """
        start = time.perf_counter()
        settings = (self.max_support, self.ensemble, self.min_ensemble_support)
        key = (self._edits, *settings, self.method, self.reach, self.prior_weight, self.stride)
        if self._result is not None and self._result_key == key:
            return replace(self._result, predicted=0, seconds=time.perf_counter() - start)
        if not any(lab.any() for lab in self._labels.values()):
            raise ValueError(
                "no labelled slice with foreground: add(index, labels) at least one slice that "
                "shows the structure(s) to segment"
            )
        plan = None
        if self.method == "model":
            targets = [i for i in range(self.depth) if i not in self._labels]
        elif self.method == "guided":
            plan = guided_plan(self._labels, self.depth, self.reach, self._scale)
            # The labelled slices too, each from the others: how well the model does on
            # this structure, against interpolation (see _model_weight).
            targets = sorted(
                {i for p in plan.values() for i in p.slices}
                | {i for i in self._labels if self._labels[i].any() and self.support_for(i)}
            )
        else:
            targets = []
        # guided: every stride-th slice of each run (the slices between mix their neighbours)
        run = _thinned(targets, self._labels, self.stride) if plan is not None else targets
        todo: dict[tuple[int, ...], list[int]] = {}
        for i in run:
            support = self.support_for(i)
            sig = tuple((j, self._versions[j]) for j in support) + settings
            cached = self._cache.get(i)
            if cached is None or cached[0] != sig:
                todo.setdefault(support, []).append(i)
        total = sum(len(v) for v in todo.values())
        if total:
            self._predict(todo, total, settings, callback)
        if self.method == "model":
            result = self._assemble(total, time.perf_counter() - start)
        else:
            result = self._assemble_guided(plan, targets, run, total, start)
        self._result, self._result_key = result, key
        return result

    def _prepared_queries(self) -> torch.Tensor:
        """``(D, 1, R, R)``: every slice windowed, padded and resized once per session."""
        if self._queries is None:
            R = self.segmenter.resolution
            prepared = [prepare_image(s, R, normalize=False) for s in self._slices]
            self._pad = prepared[0][1]  # every slice has the same size
            self._queries = torch.stack([t for t, _ in prepared])
        return self._queries

    def _predict(self, todo, total: int, settings: tuple, callback) -> None:
        queries = self._prepared_queries()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            from megaseg.progress import progress_options

            bar = tqdm(total=total, desc="segment", unit="slice", leave=False, **progress_options())
        done = 0
        try:
            for support, indices in todo.items():
                seg = self.segmenter
                seg.set_support(
                    [self._slices[j] for j in support],
                    [self._labels[j] for j in support],
                    window=(0.0, 1.0),  # already windowed as a volume: identity on [0, 1]
                )
                S = len(support)
                kwargs: dict[str, Any] = {}
                if self.ensemble > 1 and S >= self.min_ensemble_support:
                    # Deterministic per support set, so a re-run gives the same answer.
                    # Segmenter refuses more members than distinct subsets (C(S, n)).
                    kwargs = {
                        "ensemble": min(self.ensemble, math.comb(S, S - S // 2)),
                        "support_size": S - S // 2,
                        "seed": zlib.crc32(repr(support).encode()),
                    }
                sig = tuple((j, self._versions[j]) for j in support) + settings
                for lo in range(0, len(indices), _CHUNK):
                    chunk = indices[lo : lo + _CHUNK]
                    probs = seg.predict_prepared(queries[chunk], **kwargs)  # (K, b, 1, R, R)
                    for b, i in enumerate(chunk):
                        self._cache[i] = (sig, seg.labels, probs[:, b, 0].clone())
                    done += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    if callback is not None:
                        callback(done, total)
        finally:
            if bar is not None:
                bar.close()

    def _values(self, slices) -> list[int]:
        """The label values of the labelled slices and of the predictions of ``slices``."""
        return sorted(
            {int(v) for lab in self._labels.values() for v in np.unique(lab) if v != 0}
            | {v for i in slices for v in self._cache[i][1]}
        )

    def _restored(self, chunk: list[int], values: list[int]) -> np.ndarray:
        """``(K, len(chunk), H, W)`` float32: the cached model probabilities of ``chunk`` at
        the slices' own size, one row per value (0 where a support lacked the value)."""
        R = self.segmenter.resolution
        small = torch.zeros(len(values), len(chunk), R, R)
        for b, i in enumerate(chunk):
            _, vals, probs = self._cache[i]
            for k, v in enumerate(vals):
                small[values.index(v), b] = probs[k]
        return restore(small, self._pad).numpy()

    def _assemble(self, predicted: int, seconds: float) -> SessionResult:
        """``method="model"``: every unlabelled slice from its cached model probabilities."""
        todo = [i for i in range(self.depth) if i not in self._labels]
        values = self._values(todo)
        D, (H, W) = self.depth, self.slice_shape
        labels = np.zeros((D, H, W), _label_dtype(values))
        unc = np.zeros((D, H, W), np.float32)
        for lo in range(0, len(todo), 64):  # restore in chunks: (K, b, H, W) float32 each
            chunk = todo[lo : lo + 64]
            full = self._restored(chunk, values)
            labels[chunk] = merge_labels(full, values)
            unc[chunk] = _entropy(full)
        return self._result_of(labels, unc, predicted, seconds)

    def _assemble_guided(
        self, plan, targets: list[int], predicted_slices: list[int], predicted: int, start: float
    ):
        """``method="guided"`` / ``"interpolate"``: per label value, the interpolated shape
        between its labelled slices (mixed with the model's probability when guided), and
        beyond them the model's masks followed slice by slice (:func:`follow`), mixed with
        the labels' taper (with at most equal weight where the model shows no end: _ends;
        where it shows none and the labelled slices lie under ``_DENSE`` apart, not painted).
        ``predicted_slices``: the ``targets`` the model ran on (the rest are mixed)."""
        values = self._values(predicted_slices)
        D, (H, W) = self.depth, self.slice_shape
        probs: dict[int, np.ndarray] = {}  # slice -> (K, H, W)
        for lo in range(0, len(predicted_slices), 64):
            chunk = predicted_slices[lo : lo + 64]
            for b, p in zip(chunk, self._restored(chunk, values).swapaxes(0, 1), strict=True):
                probs[b] = p
        _fill_between(probs, targets)
        out: dict[int, np.ndarray] = {}
        stopped: dict[int, set[int]] = {}  # slice -> the values (k) whose model guess is kept out
        for k, v in enumerate(values):
            prior, between = distance_prior(self._labels, D, v)
            w = self._model_weight(probs, k, v) if plan is not None else 0.0
            for p, i in zip(prior, between, strict=True):
                mixed = p if i not in probs else (1 - w) * p + w * probs[i][k]
                out.setdefault(i, np.zeros((len(values), H, W), np.float32))[k] = mixed
            if plan is None:
                continue
            for (first, walk), look in zip(plan[v].walks, plan[v].looks, strict=True):
                seen = [probs[j][k] for j in walk]
                paint = True
                if plan[v].limit is not None:  # the structure ends within about one spacing
                    shrink = taper(self._labels[first] == v, len(walk), plan[v].limit)
                    # Where the model shows no end either, it goes on into a look-alike (the
                    # next vertebra, a neighbouring nucleus): there it weighs no more than the
                    # taper. An equal mix: where the model is sure, it keeps what lies within
                    # the taper's soft edge (a few pixels). On benchmarks/annotate_volumes.py
                    # the smaller of the two cost 0.02 of mean Dice at k = 2-3 (it stopped thin
                    # structures at once), nothing beyond the labels 0.07-0.11.
                    ends = _ends(self._labels[first] == v, seen, probs, look, k)
                    u = w if ends else min(w, 0.5)
                    seen = [(1 - u) * t + u * q for t, q in zip(shrink, seen, strict=True)]
                    # Labelled less than two slices apart, the structure ends within about a
                    # slice of the outermost one; a model that shows no end by the look slice
                    # follows a look-alike there (the thoracic section of the spine at k = 10
                    # painted the next vertebra: 0.046 below a copy of the nearest labelled
                    # slice on benchmarks/annotate_volumes.py). Nothing is painted beyond; its
                    # probabilities still count for the uncertainty.
                    paint = ends or plan[v].spacing >= _DENSE
                kept = follow(self._labels[first] == v, seen)
                if not paint:
                    kept = (kept[0], [False] * len(kept[1]))
                for j, q, keep in zip(walk, *kept, strict=True):
                    out.setdefault(j, np.zeros((len(values), H, W), np.float32))[k] = q
                    if not keep:
                        stopped.setdefault(j, set()).add(k)
        labels = np.zeros((D, H, W), _label_dtype(values))
        unc = np.zeros((D, H, W), np.float32)
        for i, p in out.items():
            if i in self._labels:
                continue
            shown = p.copy()
            shown[sorted(stopped.get(i, ()))] = 0
            labels[i] = merge_labels(shown, values)
            unc[i] = _entropy(p)
        return self._result_of(labels, unc, predicted, time.perf_counter() - start)

    def _model_weight(self, probs: dict[int, np.ndarray], k: int, value: int) -> float:
        """The model's weight against the interpolated shape between labelled slices.

        ``1 - prior_weight`` when given; else measured on the labelled slices, each left out
        in turn: the mean Dice of the model's mask (predicted from the other labelled slices)
        against that of interpolation from its two labelled neighbours, the model's weight
        ``0.5 + 2.5 * (model - interpolation)`` within [0.1, 0.9] (0.5 while fewer than
        three slices hold the structure, or either could not be scored).

        A left-out slice whose two labelled neighbours' masks do not overlap at all is not
        scored for interpolation: across twice the real spacing a structure that moves in the
        plane (the left hippocampus of MNI152 at 2 mm, 3-5 labelled slices) has disjoint
        masks, whose interpolation vanishes, while at the real spacing its masks overlap and
        interpolation does well. Scored anyway, those slices gave the model weight 0.9 and
        the session ended below a copy of the nearest labelled slice
        (benchmarks/annotate_volumes.py; docs/results/annotate_volumes.md).
        """
        if self.prior_weight is not None:
            return 1 - self.prior_weight
        where = holding(self._labels, value)
        model = [
            mask_dice(probs[i][k] > 0.5, self._labels[i] == value) for i in where if i in probs
        ]
        order = self.labelled
        interp = []
        for a, i, b in zip(order, order[1:], order[2:], strict=False):
            if a in where and i in where and b in where:
                before, after = self._labels[a] == value, self._labels[b] == value
                if not (before & after).any():  # disjoint: says nothing (see above)
                    continue
                guess = shape_between(before, after, (i - a) / (b - a))
                interp.append(mask_dice(guess > 0.5, self._labels[i] == value))
        if not model or not interp:
            return 0.5
        return float(np.clip(0.5 + 2.5 * (np.mean(model) - np.mean(interp)), 0.1, 0.9))

    def _result_of(self, labels, unc, predicted: int, seconds: float) -> SessionResult:
        """The result from ``(D, H, W)`` predictions: labelled slices as given, axis restored."""
        for i, lab in self._labels.items():
            labels[i] = lab
            unc[i] = 0
        scores = unc.reshape(self.depth, -1).mean(axis=1)
        return SessionResult(
            labels=np.ascontiguousarray(np.moveaxis(labels, 0, self.axis)),
            uncertainty=np.ascontiguousarray(np.moveaxis(unc, 0, self.axis)),
            slice_scores=scores.astype(np.float32),
            labelled=self.labelled,
            predicted=predicted,
            seconds=seconds,
        )

    # ------------------------------------------------------------------ guidance

    def suggest(
        self,
        k: int = 1,
        callback: ProgressCallback | None = None,
        *,
        within: tuple[int, int] | None = None,
    ) -> list[int]:
        """The ``k`` unlabelled slices whose labels should help most, best first.

        ``method="guided"`` / ``"interpolate"`` (filled between labelled slices): the middle of
        the gap along the axis whose filling is least sure, greedily, each pick closing its
        gap. A gap lies between two consecutive labelled (or already suggested) slices, or
        between the outermost one and the end of the structure's extent; its change is
        ``2 - Dice``, Dice being the mean over the structures at its two ends of each one's
        Dice there (so a small structure's move is not hidden by a large one that stays; a
        gap at a slice suggested in the same call has change 1: that slice's shape is not
        known yet). Told the extent (``within``), the longest gap comes first, as with even
        spacing, and of equally long ones the one of largest change (an end gap compares
        with the session's labels at the extent's end slice): on
        benchmarks/annotate_volumes.py +0.005 [+0.000, +0.010] of mean Dice over 2-10
        labelled slices against even spacing, where ranking by ``length * change`` was
        +0.003 [-0.002, +0.009] (it traded a long gap for a shorter one that changes more).
        Not told, the score is ``length * change`` and the extent is where the session's
        result labels anything, reaching ``reach`` mean spacings of the labelled slices
        further on each side that no labelled empty slice bounds (beyond the outermost
        labelled slice the session follows the structure at most that far, so where it
        really ends is unknown by about as much), and widening by 5% of the depth at a time
        once no gap is left; an end gap's Dice counts as 1 - (the area at its inner end /
        the largest labelled area): the more of the structure is left at the gap's inner
        end, the more there is to find beyond it.

        ``method="model"``: the slice with the highest ``slice_score * min(1, d / gap)``,
        ``d`` its distance to the nearest labelled (or suggested) slice and ``gap`` half the
        spacing that ``k`` more slices would have if evenly spread.

        ``within=(lo, hi)``: only slices ``lo <= i < hi``, where the user knows the
        structures are (the benchmark: with it, a little ahead of even spacing over the extent;
        without it, a slice where the model wrongly sees a structure can be suggested).
        Segments first if needed. With nothing labelled: ``k`` evenly spaced slices. Never
        returns a labelled slice; fewer than ``k`` when fewer are unlabelled.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k: must be a positive integer, got {k!r}")
        D = self.depth
        lo, hi = (0, D) if within is None else (int(within[0]), int(within[1]))
        if not 0 <= lo < hi <= D:
            raise ValueError(
                f"within: {within!r} is not a slice range lo < hi within 0..{D} (axis {self.axis})"
            )
        free = [i for i in range(lo, hi) if i not in self._labels]
        k = min(int(k), len(free))
        if not k:
            return []
        if not any(lab.any() for lab in self._labels.values()):
            if k + 2 <= len(free):  # the interior points are 1 or more apart: distinct
                picks = np.linspace(0, len(free) - 1, k + 2)[1:-1].round()
            else:  # the middles of k equal parts
                picks = np.floor((np.arange(k) + 0.5) * len(free) / k)
            return [free[int(p)] for p in picks]
        result = self.segment(callback)
        if self.method != "model":
            return self._suggest_gaps(result, k, lo, hi, told=within is not None)
        scores = result.slice_scores.astype(np.float64)
        taken = list(self.labelled)
        gap = max(1.0, (hi - lo) / (2 * (sum(lo <= i < hi for i in taken) + k)))
        outside = np.ones(D, bool)
        outside[lo:hi] = False
        picks: list[int] = []
        for _ in range(k):
            pos = np.arange(D)
            dist = np.min(np.abs(pos[:, None] - np.array(taken)[None, :]), axis=1)
            value = scores * np.minimum(1.0, dist / gap)
            value[taken] = -np.inf
            value[outside] = -np.inf
            if not np.isfinite(value).any():
                break
            if value.max() <= 0:  # no uncertainty left: the farthest slice instead
                value = np.where(np.isfinite(value), dist.astype(np.float64), -np.inf)
            best = int(np.argmax(value))
            picks.append(best)
            taken.append(best)
        return picks

    def _suggest_gaps(self, result: SessionResult, k: int, lo: int, hi: int, told: bool):
        """:meth:`suggest` for the methods that fill between labelled slices."""
        D = self.depth
        stack = np.moveaxis(result.labels, self.axis, 0).reshape(D, -1)  # (D, H*W)
        found = stack != 0
        area = {i: int(np.count_nonzero(lab)) for i, lab in self._labels.items()}
        largest = max(1, max(area.values()))
        present = sorted(i for i in area if area[i] and lo <= i < hi)
        if told:
            first, last = lo - 1, hi
        else:
            where = np.flatnonzero(found[lo:hi].any(axis=1)) + lo
            first, last = (int(where[0]) - 1, int(where[-1]) + 1) if len(where) else (lo - 1, hi)
            if len(present) > 1:  # the session follows them at most `reach` spacings
                spacing = math.ceil(self.reach * (present[-1] - present[0]) / (len(present) - 1))
                empty = [i for i in area if not area[i]]  # the structures are absent there
                below = max((i for i in empty if lo <= i < present[0]), default=lo - 1)
                above = min((i for i in empty if present[-1] < i < hi), default=hi)
                first = max(below, first - spacing) if first > below else first
                last = min(above, last + spacing) if last < above else last

        picks: list[int] = []

        def change(a: int, b: int) -> float:
            """2 - the mean over the structures at the gap's ends of their Dice there."""
            if a in picks or b in picks:  # not labelled yet: its shape is not known
                return 1.0
            if told:  # the extent's end slices, as the session labels them now
                a, b = max(a, lo), min(b, hi - 1)
            elif a == first or b == last:  # how much is left to find beyond the inner end
                inner = b if a == first else a
                return 1.0 + min(1.0, np.count_nonzero(stack[inner]) / largest)
            values = np.union1d(stack[a], stack[b])
            values = values[values != 0]
            if not len(values):
                return 1.0
            return 2.0 - float(np.mean([mask_dice(stack[a] == v, stack[b] == v) for v in values]))

        widen = max(1, math.ceil(0.05 * D))
        while len(picks) < k:
            inside = sorted(i for i in (*self.labelled, *picks) if first < i < last)
            anchors = [first, *inside, last]
            gaps = [  # told: by length, then change; else by their product
                ((b - a, change(a, b)) if told else (b - a) * change(a, b), a, b)
                for a, b in zip(anchors, anchors[1:], strict=False)
                if b - a > 1
            ]
            if gaps:
                _, a, b = max(gaps)  # ties: the later gap
                picks.append((a + b) // 2)
            elif not told and (first > lo - 1 or last < hi):
                first, last = max(lo - 1, first - widen), min(hi, last + widen)
            else:
                break
        return picks

    # ------------------------------------------------------------------ output

    def save(
        self,
        path: str | os.PathLike,
        uncertainty_path: str | os.PathLike | None = None,
        *,
        overwrite: bool = False,
    ) -> tuple[Path, Path]:
        """Write the labels and the uncertainty as NIfTI on the input's affine, atomically.

        ``uncertainty_path`` defaults to ``<name>_uncertainty.nii.gz`` beside ``path``.
        Segments first if needed. Returns both paths. An existing file is replaced only when
        megaseg wrote it and nobody changed it since (the sha256 megaseg recorded in the
        folder's :data:`megaseg.outputs.RECORD` matches), or with ``overwrite=True``; the
        input volume itself never. Both files are written to temporaries before either is
        renamed into place, so a failed write leaves the previous pair as it was.

        Raises:
            ValueError: either path is not a .nii / .nii.gz name, is the input volume, or
                both are the same file.
            FileExistsError: a file megaseg did not write (or one changed since) is in the way.
        """
        path = Path(path)
        if uncertainty_path is None:
            stem = path.name[: -len(".nii.gz")] if path.name.endswith(".gz") else path.stem
            uncertainty_path = path.with_name(f"{stem}_uncertainty.nii.gz")
        uncertainty_path = Path(uncertainty_path)
        for out in (path, uncertainty_path):
            # nibabel would pick another format (or none) from another extension
            if not out.name.endswith((".nii", ".nii.gz")):
                raise ValueError(f"{out}: label maps are written as .nii or .nii.gz")
        if _same_file(path, uncertainty_path):
            raise ValueError(
                f"{uncertainty_path}: is also the labels' path {path}; the uncertainty would "
                "replace the labels: give it another path"
            )
        for out in (path, uncertainty_path):
            self._check_target(out, overwrite)
        result = self.segment()
        import nibabel as nib

        images = {
            path: self._nifti(result.labels),
            uncertainty_path: self._nifti(result.uncertainty),
        }
        atomic_write_all(
            [(out, lambda tmp, img=img: nib.save(img, tmp), _nifti_suffix(out))
             for out, img in images.items()]
        )  # fmt: skip
        record([path, uncertainty_path], by="megaseg annotate")
        return path, uncertainty_path

    def _check_target(self, out: Path, overwrite: bool) -> None:
        if not out.exists():
            return
        if self._source is not None and _same_file(self._source, out):
            raise ValueError(f"{out}: is the input volume; choose another output path")
        check_replaceable(out, overwrite, hint="pass overwrite=True")

    def _nifti(self, data: np.ndarray):
        import nibabel as nib

        src = self._image
        if isinstance(src, nib.Nifti1Image | nib.Nifti2Image):
            img = type(src)(data, src.affine, header=src.header.copy())
        else:
            affine = np.eye(4) if self._affine is None else self._affine
            img = nib.Nifti1Image(data, affine, dtype=data.dtype)  # int64 needs it said
            img.set_sform(affine, code=1)
            img.set_qform(affine, code=1)
        img.set_data_dtype(data.dtype)
        img.header.set_slope_inter(1, 0)  # values stored as they are, not rescaled
        img.header["descrip"] = _SAVED_BY
        return img


# ---------------------------------------------------------------------- helpers


def _scale(affine: np.ndarray | None, axis: int) -> tuple[float, float]:
    """A slice's pixel size along its rows and columns over the spacing along ``axis``, by
    the affine's voxel sizes; ``(1, 1)`` without one."""
    if affine is None:
        return (1.0, 1.0)
    sizes = _voxel_sizes(affine)
    rows, cols = np.delete(sizes, axis) / sizes[axis]
    return (float(rows), float(cols))


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """The length of each voxel axis (the affine's first three columns)."""
    from nibabel.affines import voxel_sizes

    return voxel_sizes(np.asarray(affine, np.float64))


def _voxels_ok(affine: np.ndarray) -> bool:
    """Whether every voxel axis of ``affine`` has a finite, nonzero length."""
    sizes = _voxel_sizes(affine)
    return bool(np.all(np.isfinite(sizes)) and np.all(sizes > 0))


def _nifti_suffix(path: Path) -> str:
    """The temporary's suffix: nibabel picks the format (and compression) from the name."""
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def _thinned(targets: list[int], labelled, stride: int) -> list[int]:
    """The slices of ``targets`` (sorted) the model predicts: the labelled ones, and in each
    run of consecutive unlabelled ones, every ``stride``-th from its start and its last."""
    keep, run = [], []
    for i in [*targets, None]:
        if i is not None and i not in labelled and (not run or i == run[-1] + 1):
            run.append(i)
            continue
        keep += run[::stride] + ([run[-1]] if run and (len(run) - 1) % stride else [])
        run = [i] if i is not None and i not in labelled else []
        if i is not None and i in labelled:
            keep.append(i)
    return sorted(keep)


def _fill_between(probs: dict[int, np.ndarray], targets: list[int]) -> None:
    """Give each slice of ``targets`` missing from ``probs`` the linear mix, by distance, of
    the probabilities of the nearest predicted slices on either side within its run."""
    have = sorted(probs)
    for i in targets:
        if i in probs:
            continue
        pos = int(np.searchsorted(have, i))
        a, b = have[pos - 1], have[pos]  # _thinned keeps each run's first and last slices
        t = (i - a) / (b - a)
        probs[i] = ((1 - t) * probs[a] + t * probs[b]).astype(np.float32)


def _ends(first: np.ndarray, walk: list[np.ndarray], probs, look: int | None, k: int) -> bool:
    """Whether the model shows structure ``k`` ending by slice ``look`` (one more spacing past
    where its labelled slices say it ends): followed from mask ``first`` through the walk's
    probabilities and on to that slice's, its mask stops. True where there is no ``look``
    (the walk ends at the volume's end or a labelled slice).
    """
    if look is None:
        return True
    _, kept = follow(first, [*walk, probs[look][k]])
    return not all(kept)


def _entropy(probs: np.ndarray) -> np.ndarray:
    """``(K, ...)`` probabilities -> ``(...)`` largest binary entropy over K, in bits."""
    if probs.shape[0] == 0:
        return np.zeros(probs.shape[1:], np.float32)
    p = np.clip(probs, 1e-6, 1 - 1e-6)
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return h.max(axis=0).astype(np.float32)


__all__ = ["METHODS", "ProgressCallback", "SessionResult", "VolumeSession"]
