"""Inference for notebooks: take a labelled support set once, then segment many queries.

    seg = Segmenter.from_checkpoint("run/best.safetensors")     # or Segmenter(model)
    seg.set_support(images, labels, modality="CT")              # list of 2D arrays, any sizes
    pred = seg.predict(image)                                   # pred.probs, pred.mask (H, W)
    labels = seg.predict_volume("ct.nii.gz", axis=2, out_path="seg.nii.gz")

Everything goes through the shared :mod:`megaseg.preprocess` path: images are windowed,
padded to a square and resized to the network's resolution; predictions come back at the
input's own size through :func:`~megaseg.preprocess.restore`.

What is cached. UniverSeg's support features depend on the query, so unlike an image
embedding they cannot be computed once. :meth:`Segmenter.set_support` keeps what can be
kept: the preprocessed support tensors on the device and, on the fast path, the first
block's query-independent support term (``model.support_term``), one per label.

Multi-label. An integer label map with several nonzero values (e.g. 0, 1, 2) gives one
binary task per value, all through the same network; the merged map is "the value whose
probability is largest, where that probability is above 0.5, else background 0".

Test-time augmentation. ``ensemble=K`` averages K random support subsets; ``flips=True``
averages the identity and the horizontal, vertical and both flips of the whole task (query,
support images and support labels flipped together, each prediction flipped back), see
:func:`flip_tta`. Both combine: K subsets x 4 views, 4K times the forward passes of one.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from megaseg.checkpoint import MAX_RESOLUTION, card_resolution
from megaseg.outputs import check_replaceable, record
from megaseg.paths import atomic_write
from megaseg.preprocess import (
    CT_WINDOW,
    HU_LIKE_MIN,
    guess_modality,
    modality_kind,
    normalize_intensity,
    prepare_image,
    prepare_label,
    restore,
    to_grayscale,
)

DEFAULT_RESOLUTION = 128

# Peak activation memory of one query, in units of one full-resolution support feature map
# ``S * C * R * R * 4`` bytes (S support examples, C features, R resolution, float32). On the
# fast path the largest live set is the last decoder level: the upsampled support features,
# their skip and the concatenation of both (~4 units), plus the coarser levels. Measured peak
# for v1 on the CPU (R=128, S=8): ~5 units; 6 leaves a margin. The naive path needs more.
ACTIVATION_UNITS = 6
CPU_MEMORY_BUDGET_MB = 2048  # default budget on the CPU
# The largest block glibc's malloc serves from its heap (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit):
# a larger tensor is mapped afresh at every allocation and its pages faulted in, zeroed.
CPU_HEAP_BLOCK_MB = 32
CUDA_MEMORY_FRACTION = 0.5  # default budget on a GPU: this share of its free memory
# One task per label value: more values than this in a support set is almost surely an image
# passed as a label map (each value would become a task); data_prep's --max-labels default.
MAX_LABELS = 100

# The views of flip test-time augmentation, as ``torch.flip`` dims of a ``(..., H, W)``
# tensor: identity, horizontal (W), vertical (H), both. Each is its own inverse.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


@dataclass(frozen=True)
class Prediction:
    """The segmentation of one 2D query, at the query's original ``(H, W)``.

    Attributes:
        probs: ``(H, W)`` float32 foreground probability; with several labels, the largest
            per-label probability (the one behind :attr:`label_map`).
        mask: ``(H, W)`` bool, ``probs > 0.5`` (equals ``label_map != 0``).
        label_map: ``(H, W)`` merged labels with the support's original values (0 =
            background): argmax over labels where the max probability is above 0.5.
        label_probs: ``(K, H, W)`` float32, one probability map per label of :attr:`labels`.
        labels: the K label values, in the order of :attr:`label_probs`.
    """

    probs: np.ndarray
    mask: np.ndarray
    label_map: np.ndarray
    label_probs: np.ndarray
    labels: tuple[int, ...]


@dataclass(frozen=True)
class _Support:
    """What :meth:`Segmenter.set_support` caches, on the model's device."""

    images: Tensor  # (S, 1, R, R)
    labels: Tensor  # (K, S, 1, R, R): one binary (or soft) mask per label value
    values: tuple[int, ...]  # the K label values
    term: Tensor | None  # (K, S, C, R, R) first-block support term, fast path only
    modality: str | None
    window: tuple[float, float] | None


class Segmenter:
    """In-context segmentation of 2D images and 3D volumes with one network.

    Args:
        model: an in-context network, ``model(query (B,1,R,R), support_images (1,S,1,R,R),
            support_labels (1,S,1,R,R)) -> logits (B,1,R,R)``. It is moved to ``device`` and
            put in eval mode (in place); on the CPU also in channels-last memory layout
            (oneDNN's own: the same results, faster), whose weights are not contiguous:
            ``.contiguous()`` them before ``safetensors.torch.save_file`` (megaseg's
            ``save_checkpoint`` does).
        resolution: R, the square size the network sees.
        device: None picks CUDA when available, the CPU otherwise.
        max_batch: queries per forward pass; None derives it (:meth:`batch_size`).
        memory_budget_mb: activation memory allowed per forward pass (see
            :meth:`batch_size`); None: half the free GPU memory, or
            :data:`CPU_MEMORY_BUDGET_MB` on the CPU.
        cache_support_term: keep the first block's support term from :meth:`set_support`
            (``K * S * C * R * R * 4`` bytes for K labels; only used when ``model.fast``).
        card: the checkpoint's card. Its ``preprocessing`` fields are read (see
            :func:`megaseg.preprocess.card_fields`): ``modality`` and ``window`` are the
            defaults of :meth:`set_support` and :class:`~megaseg.annotate.VolumeSession`,
            ``normalization.ct_window`` the window of CT images (see :meth:`windowing`).

    Attributes: ``weights_path``, the checkpoint file the network was loaded from
    (:meth:`from_checkpoint`; None otherwise), so that errors about its card can name it.
    """

    def __init__(
        self,
        model: nn.Module,
        resolution: int = DEFAULT_RESOLUTION,
        device: str | torch.device | None = None,
        *,
        max_batch: int | None = None,
        memory_budget_mb: float | None = None,
        cache_support_term: bool = True,
        card: dict[str, Any] | None = None,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            # oneDNN's native layout: without it every conv reorders its input and output
            # (with blocks.support_mean keeping it, the first VolumeSession.segment() of
            # benchmarks/readme_timings.py took 8.1-9.1 CPU s against 9.6-12.2 before).
            self.model.to(memory_format=torch.channels_last)
        self.resolution = _check_resolution(resolution, model)
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if memory_budget_mb is not None and memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
        self.max_batch = max_batch
        self.memory_budget_mb = memory_budget_mb
        self.cache_support_term = cache_support_term
        self.card = card
        self.weights_path: Path | None = None
        pre = _card_preprocessing(card)
        self.default_modality: str | None = pre.get("modality")
        window = pre.get("window")
        self.default_window = None if window is None else (float(window[0]), float(window[1]))
        norm = pre.get("normalization")
        ct = norm.get("ct_window") if isinstance(norm, dict) else None
        self.ct_window = CT_WINDOW if ct is None else (float(ct[0]), float(ct[1]))
        self._support: _Support | None = None

    def windowing(
        self,
        data,
        modality: str | None = None,
        window: tuple[float, float] | None = None,
        what: str = "images",
    ) -> tuple[str | None, tuple[float, float] | None]:
        """``(modality, window)`` for :func:`~megaseg.preprocess.normalize_intensity` of
        ``data`` (an image, a volume or a list of images; ``what`` names it in the warning):
        the arguments, else the card's ``modality`` / ``window``, else CT when the values look
        like Hounsfield units (with a warning). CT is windowed with the card's
        ``normalization.ct_window`` (:data:`~megaseg.preprocess.CT_WINDOW` without one). The
        one decision for :meth:`set_support` and :class:`~megaseg.annotate.VolumeSession`."""
        modality = self.default_modality if modality is None else modality
        window = self.default_window if window is None else window
        # the warning names the caller of set_support / VolumeSession
        modality = guess_modality(data, modality, window, what, stacklevel=4)
        if window is None and modality_kind(modality) == "ct":
            window = self.ct_window
        return modality, window

    @classmethod
    def from_checkpoint(
        cls,
        path_or_name: str | os.PathLike,
        device: str | torch.device | None = None,
        *,
        resolution: int | None = None,
        allow_nonfinite: bool = False,
        **kwargs,
    ) -> Segmenter:
        """Load weights safely (see :mod:`megaseg.checkpoint`) and wrap them.

        ``path_or_name``: a ``.safetensors`` file (its ``.json`` card beside it), a raw state
        dict saved with ``torch.save`` (tensors only), the name of weights megaseg ships
        (``"megaseg_generalist"``, the default, and the others in ``checkpoints/README.md``),
        or the name of a registered model to load the default weights megaseg ships for it
        (``"universeg_v1_small"``: the same as ``"megaseg_generalist"``). ``resolution`` defaults to the card's
        (``resolution``, or ``preprocessing.resolution`` / ``preprocessing.size``), else 128.
        ``kwargs`` go to :class:`Segmenter`. Weights holding NaN or inf are refused unless
        ``allow_nonfinite=True``.

        Raises:
            FileNotFoundError: neither a file nor a registered model name.
            megaseg.checkpoint.CheckpointError (a ValueError): an unsafe or unreadable file, a
                malformed card, weights that do not fit the card's model or hold NaN/inf.
            ValueError: a model for which no weights are shipped.
        """
        from megaseg.checkpoint import card_preprocessing, load_checkpoint
        from megaseg.models import create_model, list_models
        from megaseg.models.registry import pretrained_path, shipped_weights

        path = Path(path_or_name)
        shipped = shipped_weights()
        if path.is_file():
            model, card = load_checkpoint(path, allow_nonfinite=allow_nonfinite)
        elif isinstance(path_or_name, str) and (
            path_or_name in list_models() or path_or_name in shipped
        ):
            name, tag = shipped.get(path_or_name, (path_or_name, True))
            path = pretrained_path(name, tag)
            model, card = load_checkpoint(
                path, model=create_model(name), allow_nonfinite=allow_nonfinite
            )
        else:
            raise FileNotFoundError(
                f"{path_or_name}: no such checkpoint file, and not the name of shipped weights "
                f"({', '.join(shipped)}) or of a model ({', '.join(list_models())})"
            )
        if resolution is None:
            resolution = card_resolution(card, path) or DEFAULT_RESOLUTION
        card_preprocessing(card, path)  # a malformed modality / window: named with the card
        seg = cls(model, resolution, device, card=card, **kwargs)
        seg.weights_path = path
        return seg

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        device: str | torch.device | None = None,
        *,
        accept_license: bool = False,
        path: str | os.PathLike | None = None,
        **kwargs,
    ) -> Segmenter:
        """Published weights by name: ``"universeg-v1-official"``, the UniverSeg authors' v1.

        Their licence is research-only, so they are loaded only with
        ``accept_license=True``; downloaded once to ``$MEGASEG_CACHE`` (default
        ``~/.cache/megaseg``), or read from ``path`` / ``$MEGASEG_UNIVERSEG_WEIGHTS`` on a
        machine without internet (see :mod:`megaseg.hub`). Runs at 128x128. ``kwargs`` go to
        :class:`Segmenter`.

        Raises:
            megaseg.hub.LicenseNotAccepted (a ValueError): without ``accept_license=True``.
            megaseg.hub.DownloadError (a ValueError): download failed or is not the weights.
        """
        from megaseg import hub

        if name != hub.OFFICIAL_NAME:
            raise ValueError(
                f"{name!r}: unknown pretrained weights; available: {hub.OFFICIAL_NAME!r} (for "
                "megaseg's own weights use Segmenter.from_checkpoint)"
            )
        weights = hub.official_weights(accept_license=accept_license, path=path)
        model = hub.load_official(accept_license=True, path=weights)
        resolution = kwargs.pop("resolution", hub.OFFICIAL_RESOLUTION)
        return cls(model, resolution, device, card=hub.official_card(weights), **kwargs)

    # ------------------------------------------------------------------ support set

    def set_support(
        self,
        images,
        labels,
        modality: str | None = None,
        window: tuple[float, float] | None = None,
        *,
        max_labels: int = MAX_LABELS,
    ) -> Segmenter:
        """Preprocess and cache the support set; returns ``self``.

        Args:
            images: a list of 2D images (each ``(H_i, W_i)`` or RGB ``(H_i, W_i, 3)``, any
                size, dtype and range; numpy or torch), or a stacked ``(S, H, W)`` array.
            labels: their label maps, in the same form and with the same sizes: binary or
                soft masks in [0, 1], or integer maps (one task per nonzero value).
            modality, window: intensity windowing (see
                :func:`~megaseg.preprocess.normalize_intensity`), applied to each support
                image and later to every query. Default: the card's; else CT when the
                images hold values below -500 (Hounsfield units, with a warning), else
                min-max (see :meth:`windowing`).
            max_labels: the most distinct nonzero label values (tasks) the integer maps may
                hold together (:data:`MAX_LABELS`); more is refused as a likely mistake.

        Raises:
            ValueError: naming the argument (and the example's index) that is wrong.
        """
        imgs = [
            _image_2d(x, f"support_images[{i}]")
            for i, x in enumerate(_examples(images, "support_images"))
        ]
        labs = [
            _label_2d(x, f"support_labels[{i}]")
            for i, x in enumerate(_examples(labels, "support_labels"))
        ]
        if not imgs:
            raise ValueError("support_images: the support set is empty")
        modality, window = self.windowing(imgs, modality, window, "support_images")
        if len(labs) != len(imgs):
            raise ValueError(
                f"support_labels: {len(labs)} label maps for {len(imgs)} support_images; "
                "they must pair one to one"
            )
        for i, (img, lab) in enumerate(zip(imgs, labs, strict=True)):
            if img.shape != lab.shape:
                raise ValueError(
                    f"support_labels[{i}]: shape {lab.shape} differs from support_images[{i}] "
                    f"{img.shape} (after RGB to gray)"
                )
            if not np.any(lab):
                raise ValueError(
                    f"support_labels[{i}]: no foreground (every value is 0); each support "
                    "example needs its structure labelled"
                )
        values, soft = _label_values(labs)
        if len(values) > max_labels:
            raise ValueError(
                f"support_labels: {len(values)} distinct label values, each of which would be "
                f"its own task; more than max_labels={max_labels}. Is an image passed as a label "
                "map? Pass max_labels=N to segment that many structures"
            )
        R = self.resolution
        image_t = torch.stack([prepare_image(x, R, modality, window)[0] for x in imgs])
        if soft:  # one task, the masks as given
            masks = [[prepare_label(x, R) for x in labs]]
        else:
            masks = [[prepare_label(x == v, R) for x in labs] for v in values]
        label_t = torch.stack([torch.stack(m) for m in masks])
        image_t, label_t = image_t.to(self.device), label_t.to(self.device)
        term = None
        if self.cache_support_term and getattr(self.model, "fast", False):
            with torch.inference_mode():
                term = torch.cat(
                    [self.model.support_term(image_t[None], lab[None]) for lab in label_t]
                )
        self._support = _Support(image_t, label_t, values, term, modality, window)
        return self

    @property
    def support_size(self) -> int:
        """S, the number of cached support examples."""
        return self._require_support().images.shape[0]

    @property
    def labels(self) -> tuple[int, ...]:
        """The label values of the support set, one task each."""
        return self._require_support().values

    def _require_support(self) -> _Support:
        if self._support is None:
            raise RuntimeError("no support set: call set_support(images, labels) first")
        return self._support

    # ------------------------------------------------------------------ prediction

    def batch_size(self, support_size: int) -> int:
        """Queries per forward pass: ``max_batch``, or as many as the memory budget allows.

        Activation memory per query ~ ``ACTIVATION_UNITS * S * C * R * R * 4`` bytes (S
        support examples, C the network's widest conv, R the resolution, float32): the
        support stream is a ``(B, S, C, R, R)`` tensor and a few of them, across levels, are
        alive at once. v1 at R=128, S=64: ~1.6 GB per query.

        On the CPU, also few enough that the widest of them, the ``(B, S, 2C, R, R)``
        concatenations, stay within :data:`CPU_HEAP_BLOCK_MB`: bigger ones are mapped afresh for
        every op and their pages faulted in, which took a third of the CPU time (kernel time)
        at 16-85 queries per pass. v1 at R=128: 4 queries per pass with S=1, 2 with S=2, 1
        with S>=3 (``predict()`` of 16 queries with S=8 on 1 thread: 3.2 -> 2.3 s).
        """
        if self.max_batch is not None:
            return self.max_batch
        budget = self.memory_budget_mb
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = CUDA_MEMORY_FRACTION * free / 2**20
            else:
                budget = CPU_MEMORY_BUDGET_MB
        width = _width(self.model)
        per_query = ACTIVATION_UNITS * support_size * width * self.resolution**2 * 4
        batch = max(1, int(budget * 2**20 // per_query))
        if self.device.type == "cpu":
            widest = support_size * 2 * width * self.resolution**2 * 4
            batch = min(batch, max(1, CPU_HEAP_BLOCK_MB * 2**20 // widest))
        return batch

    def predict_prepared(
        self,
        queries: Tensor,
        ensemble: int = 1,
        support_size: int | None = None,
        seed: int = 0,
        flips: bool = False,
    ) -> Tensor:
        """Network-resolution form of :meth:`predict`.

        ``queries (B, 1, R, R)`` in [0, 1], already prepared -> probabilities
        ``(K, B, 1, R, R)`` float32 on the CPU, one map per label, averaged over the
        ensemble (and the 4 flips with ``flips=True``, see :func:`flip_tta`). Queries are run
        in chunks of :meth:`batch_size`, once per support subset, label and flip.
        """
        sup = self._require_support()
        subsets = self._draw_subsets(ensemble, support_size, seed)
        chunk = self.batch_size(len(subsets[0]) if subsets[0] is not None else self.support_size)
        K, B = len(sup.values), queries.shape[0]
        out = torch.zeros(K, B, 1, *queries.shape[-2:])
        use_term = sup.term is not None and getattr(self.model, "fast", False)
        views = FLIPS if flips else FLIPS[:1]
        with torch.inference_mode():
            for idx in subsets:
                images = sup.images if idx is None else sup.images[idx]
                for k in range(K):
                    labels = sup.labels[k] if idx is None else sup.labels[k, idx]
                    for dims in views:  # the whole task flipped: query, images and labels
                        f_images, f_labels = _flip(images, dims), _flip(labels, dims)
                        term = None
                        if use_term and not dims:
                            term = (sup.term[k] if idx is None else sup.term[k, idx])[None]
                        elif use_term:
                            # The cached term is the unflipped support's and a conv is not
                            # flip-invariant: a flipped support needs its own, once per view.
                            term = self.model.support_term(f_images[None], f_labels[None])
                        for start in range(0, B, chunk):
                            q = queries[start : start + chunk].to(self.device, torch.float32)
                            logits = self.model(
                                _flip(q, dims), f_images[None], f_labels[None], support_term=term
                            )
                            probs = _flip(torch.sigmoid(logits.float()), dims)  # flipped back
                            out[k, start : start + chunk] += probs.cpu()
        return out / (len(subsets) * len(views))

    def predict(
        self,
        query,
        ensemble: int = 1,
        support_size: int | None = None,
        seed: int = 0,
        flips: bool = False,
    ) -> Prediction | list[Prediction]:
        """Segment one query or several.

        Args:
            query: a 2D image ``(H, W)`` or RGB ``(H, W, 3)`` (any size, dtype, range;
                numpy or torch) -> one :class:`Prediction`; a list of them (sizes may
                differ) or a ``(B, 1, H, W)`` stack -> a list of predictions, in order.
                Windowed like the support (``modality``/``window`` of :meth:`set_support`).
            ensemble: K; average the probabilities over K random support subsets.
            support_size: N, the size of each subset, drawn without replacement from the
                cached support; None: the whole support (then ``ensemble`` must be 1).
            seed: seeds the ``torch.Generator`` that draws the subsets: same seed, same draws.
            flips: flip test-time augmentation: average the probabilities over the identity
                and the horizontal, vertical and both flips of the task (the query and the
                support images and labels flipped together, so the network sees a consistent
                task; each prediction flipped back before averaging). 4x the forward passes
                (4K with an ensemble) plus, on the fast path, the first block's support term
                of each flipped support; the queries stay batched in chunks. False: exactly
                the unaugmented prediction.

        Raises:
            ValueError: a query that is not 2D (use :meth:`predict_volume` for volumes),
                holds NaN/inf, or an ensemble that does not fit the support set.
        """
        images, batched = _queries(query)
        sup = self._require_support()
        prepared = [prepare_image(x, self.resolution, sup.modality, sup.window) for x in images]
        probs = self.predict_prepared(
            torch.stack([t for t, _ in prepared]), ensemble, support_size, seed, flips
        )
        preds = [
            _prediction(restore(probs[:, b, 0], info).numpy(), sup.values)
            for b, (_, info) in enumerate(prepared)
        ]
        return preds if batched else preds[0]

    def predict_volume(
        self,
        volume,
        axis: int = 2,
        out_path: str | os.PathLike | None = None,
        *,
        ensemble: int = 1,
        support_size: int | None = None,
        seed: int = 0,
        flips: bool = False,
        return_probs: bool = False,
        overwrite_input: bool = False,
        overwrite: bool = False,
        slices: tuple[int, int] | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Segment a 3D volume slice by slice along ``axis``.

        Args:
            volume: a ``(X, Y, Z)`` array or tensor, a NIfTI file path, or a loaded nibabel
                image. It is windowed once as a whole with the support's ``modality`` and
                ``window``; slices are then prepared without re-windowing and batched.
            axis: the slicing axis (0, 1 or 2).
            out_path: write the label map there as NIfTI (uint8 or int16 for the label
                values), with the input's affine and header (identity affine for arrays).
                Written atomically (a temporary file beside it, then renamed). The input file
                itself (also through a symlink or hard link) is refused unless
                ``overwrite_input=True``: a label map written over the scan destroys it. Any
                other existing file is replaced only when megaseg wrote it and it is unchanged
                since (:mod:`megaseg.outputs`), or with ``overwrite=True``.
            ensemble, support_size, seed, flips: as in :meth:`predict`; every slice sees the
                same support subsets (and, with ``flips``, each slice is flipped in-plane).
            return_probs: also return the ``(K, X, Y, Z)`` float32 per-label probabilities.
            slices: ``(lo, hi)``: label only the slices ``lo <= i < hi`` along ``axis``
                (where the structure is; the others stay background, probability 0, and are
                not computed). Default: every slice, also where the structure is absent and
                the model may still see it.

        Returns:
            The merged label map, the volume's shape, with the support's label values.

        Raises:
            FileExistsError: ``out_path`` is a file megaseg did not write (see ``overwrite``).
        """
        sup = self._require_support()
        if out_path is not None and not overwrite_input:
            _refuse_input_as_output(volume, out_path)
        if out_path is not None and not _is_input(volume, out_path):
            check_replaceable(out_path, overwrite, hint="pass overwrite=True")
        data, image = _load_volume(volume)
        if axis not in (0, 1, 2, -1, -2, -3):
            raise ValueError(f"axis: must be 0, 1 or 2 for a 3D volume, got {axis}")
        if sup.modality is None and sup.window is None and np.nanmin(data) < HU_LIKE_MIN:
            warnings.warn(
                f"volume: intensities down to {float(np.nanmin(data)):.0f} look like CT Hounsfield "
                "units, but the support set was windowed min-max (its images did not); if both "
                "are CT, pass modality='CT' to set_support",
                stacklevel=2,
            )
        try:
            data = normalize_intensity(data, sup.modality, sup.window)
        except ValueError as e:
            raise ValueError(f"volume: {e}") from e
        stack = np.moveaxis(data, axis, 0)  # (D, h, w)
        K, D = len(sup.values), stack.shape[0]
        lo, hi = _slice_range(slices, D, axis)
        label_map = np.zeros(stack.shape, _label_dtype(sup.values))
        probs = np.zeros((K, *stack.shape), np.float32) if return_probs else None
        chunk = self.batch_size(support_size or self.support_size)
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            prepared = [
                prepare_image(s, self.resolution, normalize=False) for s in stack[start:stop]
            ]
            info = prepared[0][1]  # every slice has the same size
            p = self.predict_prepared(
                torch.stack([t for t, _ in prepared]), ensemble, support_size, seed, flips
            )
            p = restore(p[:, :, 0], info).numpy()  # (K, b, h, w)
            label_map[start:stop] = merge_labels(p, sup.values)
            if probs is not None:
                probs[:, start:stop] = p
        label_map = np.ascontiguousarray(np.moveaxis(label_map, 0, axis))
        if out_path is not None:
            _save_nifti(label_map, image, out_path)
            record([out_path], by="megaseg predict_volume")
        if probs is not None:
            return label_map, np.moveaxis(probs, 1, axis % 3 + 1)
        return label_map

    def _draw_subsets(
        self, ensemble: int, support_size: int | None, seed: int
    ) -> list[Tensor | None]:
        """K distinct index sets into the cached support, each without replacement;
        ``[None]`` = the whole support.

        An ensemble averages K *different* support sets: when the support holds fewer than K
        distinct subsets of the asked size (``comb(S, N) < K``; e.g. N = S gives one) the
        members would repeat each other, so it is refused, with the count in the message.
        """
        S = self.support_size
        if ensemble < 1:
            raise ValueError(f"ensemble: must be >= 1, got {ensemble}")
        if support_size is not None and not 1 <= support_size <= S:
            raise ValueError(
                f"support_size: {support_size} is not between 1 and the support set's "
                f"size ({S} examples)"
            )
        n = S if support_size is None else support_size
        distinct = math.comb(S, n)
        if ensemble > distinct:
            raise ValueError(
                f"support_size: ensemble={ensemble} needs {ensemble} different support sets, but "
                f"a support set of {S} examples has {distinct} distinct subset(s) of "
                f"{n}{' (support_size=None: the whole set)' if support_size is None else ''}; "
                f"give a smaller support_size (or ensemble=1)"
            )
        if support_size is None:
            return [None]
        gen = torch.Generator().manual_seed(seed)
        subsets, seen = [], set()
        while len(subsets) < ensemble:  # terminates: at least `ensemble` distinct subsets exist
            idx = torch.randperm(S, generator=gen)[:support_size]
            key = tuple(sorted(idx.tolist()))
            if key not in seen:
                seen.add(key)
                subsets.append(idx.to(self.device))
        return subsets


def segment(
    query,
    support_images,
    support_labels,
    *,
    model: nn.Module | str | os.PathLike | Segmenter,
    modality: str | None = None,
    window: tuple[float, float] | None = None,
    resolution: int | None = None,
    device: str | torch.device | None = None,
    ensemble: int = 1,
    support_size: int | None = None,
    seed: int = 0,
    flips: bool = False,
) -> Prediction | list[Prediction]:
    """One call: ``Segmenter(model).set_support(...).predict(query, ...)``.

    ``model`` is a network, a :class:`Segmenter`, or a checkpoint path / model name for
    :meth:`Segmenter.from_checkpoint`. Returns what :meth:`Segmenter.predict` returns.
    """
    if isinstance(model, Segmenter):
        seg = model
    elif isinstance(model, nn.Module):
        seg = Segmenter(model, resolution or DEFAULT_RESOLUTION, device)
    else:
        seg = Segmenter.from_checkpoint(model, device, resolution=resolution)
    seg.set_support(support_images, support_labels, modality, window)
    return seg.predict(query, ensemble, support_size, seed, flips)


def flip_tta(
    predict: Callable[[Tensor, Tensor, Tensor], Tensor],
    query: Tensor,
    support_images: Tensor,
    support_labels: Tensor,
) -> Tensor:
    """Flip test-time augmentation of any in-context predictor.

    ``predict(query (B,1,H,W), support_images (...,H,W), support_labels (...,H,W)) ->
    probabilities (B,1,H,W)`` is called once per view of :data:`FLIPS` (identity, horizontal,
    vertical, both) on the query and the support flipped together, so each call sees a
    consistent task; every output is flipped back and the 4 are averaged -> ``(B,1,H,W)``.
    Costs 4 calls. :meth:`Segmenter.predict_prepared` does the same inside its own batching.
    """
    total = None
    for dims in FLIPS:
        probs = predict(
            _flip(query, dims), _flip(support_images, dims), _flip(support_labels, dims)
        )
        probs = _flip(probs.float(), dims)
        total = probs if total is None else total + probs
    return total / len(FLIPS)


def _slice_range(slices, depth: int, axis: int) -> tuple[int, int]:
    """``predict_volume``'s ``slices=(lo, hi)`` checked against the ``depth`` slices."""
    if slices is None:
        return 0, depth
    try:
        lo, hi = (int(v) for v in slices)
        ok = all(not isinstance(v, bool) and float(v) == int(v) for v in slices)
    except (TypeError, ValueError):
        ok = False
    if not ok or not 0 <= lo < hi <= depth:
        raise ValueError(
            f"slices: {slices!r} is not a range (lo, hi) with 0 <= lo < hi <= {depth}, the "
            f"slices along axis {axis}"
        )
    return lo, hi


def merge_labels(label_probs: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``(K, ...)`` per-label probabilities -> ``(...)`` label map with the given values.

    The value of the most probable label where its probability is above 0.5, else 0; ties go
    to the first label.
    """
    values = np.asarray(values)
    best = label_probs.argmax(axis=0)
    top = np.take_along_axis(label_probs, best[None], axis=0)[0]
    return np.where(top > 0.5, values[best], 0).astype(_label_dtype(values))


# ---------------------------------------------------------------------- helpers


def _flip(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``x`` flipped along ``dims`` (one view of :data:`FLIPS`); the identity is ``x`` itself."""
    return x.flip(dims) if dims else x


def _prediction(label_probs: np.ndarray, values: tuple[int, ...]) -> Prediction:
    """``label_probs (K, H, W)`` -> :class:`Prediction`."""
    label_probs = label_probs.astype(np.float32, copy=False)
    probs = label_probs.max(axis=0)
    return Prediction(probs, probs > 0.5, merge_labels(label_probs, values), label_probs, values)


def _label_dtype(values: Sequence[int]) -> np.dtype:
    """The smallest of uint8 / int16 / int32 / int64 that holds every label value (negative
    ones included) and 0, the background: the dtype of label maps megaseg writes."""
    lo, hi = min([0, *values]), max([0, *values])
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _card_preprocessing(card: dict | None) -> dict:
    pre = (card or {}).get("preprocessing")
    return pre if isinstance(pre, dict) else {}


def _check_resolution(resolution: int, model: nn.Module) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int | np.integer):
        raise ValueError(f"resolution: expected an integer, got {resolution!r}")
    if resolution > MAX_RESOLUTION:
        raise ValueError(
            f"resolution: {resolution} is above the largest supported, {MAX_RESOLUTION} (the "
            "cached support set alone would need S*C*R*R*4 bytes)"
        )
    step = 2 ** (getattr(model, "depth", 1) - 1)
    if resolution < 1 or resolution % step:
        raise ValueError(
            f"resolution: {resolution} must be a positive multiple of {step} for this model"
        )
    return int(resolution)


def _width(model: nn.Module) -> int:
    """C: the largest number of output channels of any conv, for the memory estimate."""
    return max((m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)), default=64)


def _numeric(x, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != bool and not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name}: expected numbers, got an array of dtype {x.dtype}")
    if x.dtype.kind == "c":  # numpy would drop the imaginary part with only a warning
        raise ValueError(
            f"{name}: complex values (dtype {x.dtype}); pass real intensities, e.g. the "
            "magnitude np.abs(x)"
        )
    return x


def _finite(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf values")
    return x


def _image_2d(x, name: str) -> np.ndarray:
    """One 2D image, gray ``(H, W)`` (or ``(1, H, W)`` / ``(H, W, 1)``) or RGB(A)
    ``(H, W, 3|4)`` -> ``(H, W)``, checked.

    ``(3|4, H, W)`` is refused: channels-first RGB and three (or four) slices of a volume
    look the same, and reading slices as colour would silently average them into one gray
    image. Channels-last is what image readers (PIL, imageio, skimage) return, so that is
    the RGB form accepted without a word.
    """
    x = _numeric(x, name)
    if x.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2D image (H,W) or RGB (H,W,3), got shape {x.shape}")
    if x.ndim == 3 and x.shape[0] in (3, 4) and x.shape[-1] not in (3, 4):
        raise ValueError(
            f"{name}: shape {x.shape} is ambiguous: channels-first RGB(A) or {x.shape[0]} "
            "slices of a volume. Pass an RGB image channels-last, (H,W,3) (e.g. "
            "np.moveaxis(x, 0, -1)), a single 2D slice (H,W), or a list of 2D images"
        )
    try:
        x = to_grayscale(x)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e
    if x.size == 0:
        raise ValueError(f"{name}: empty image of shape {x.shape}")
    return _finite(x, name)


def _label_2d(x, name: str) -> np.ndarray:
    """One 2D label map ``(H, W)`` (a singleton channel axis is dropped), checked."""
    x = _numeric(x, name)
    if x.ndim == 3 and 1 in (x.shape[0], x.shape[-1]):
        x = x.reshape(x.shape[1:] if x.shape[0] == 1 else x.shape[:-1])
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2D label map (H,W), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name}: empty label map of shape {x.shape}")
    return _finite(x, name)


def _examples(x, name: str) -> list:
    """A list of examples, or a stacked ``(S, H, W)`` / ``(S, C, H, W)`` / ``(S, H, W, C)`` array."""
    if isinstance(x, list | tuple):
        return list(x)
    arr = _numeric(x, name)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise ValueError(
            f"{name}: shape {arr.shape} reads as one RGB image, not a stack (S,H,W); "
            "pass a list of images"
        )
    if arr.ndim not in (3, 4):
        raise ValueError(
            f"{name}: expected a list of 2D images or a stacked array (S,H,W), got an array "
            f"of shape {arr.shape}"
        )
    if arr.ndim == 4 and arr.shape[1] in (3, 4) and arr.shape[-1] not in (3, 4):
        # (S, C, H, W): the stack axis is explicit, so channels-first is the only reading
        # (torch's NCHW); hand each example on channels-last.
        arr = np.moveaxis(arr, 1, -1)
    return list(arr)


def _queries(query) -> tuple[list[np.ndarray], bool]:
    """The query argument -> (list of ``(H, W)`` images, whether it was a batch)."""
    if isinstance(query, list | tuple):
        if not query:
            raise ValueError("query: the list of queries is empty")
        return [_image_2d(q, f"query[{i}]") for i, q in enumerate(query)], True
    x = _numeric(query, "query")
    if x.ndim == 3 and not ({x.shape[0], x.shape[-1]} & {1, 3, 4}):
        raise ValueError(
            f"query: shape {x.shape} is a 3D volume but the support set is 2D; segment "
            "volumes with predict_volume(), or pass a list of 2D images"
        )
    if x.ndim == 4 and x.shape[1] == 1:  # (B, 1, H, W)
        return [_image_2d(q[0], f"query[{i}]") for i, q in enumerate(x)], True
    return [_image_2d(x, "query")], False


def _label_values(labels: list[np.ndarray]) -> tuple[tuple[int, ...], bool]:
    """``(values, soft)``: integer maps give their sorted nonzero values, one task each;
    soft masks in [0, 1] (any non-integer value) give one task, ``((1,), True)``."""
    if all(x.dtype.kind in "biu" or np.array_equal(x, np.round(x)) for x in labels):
        values = np.unique(np.concatenate([np.unique(x) for x in labels]))
        if values.size and not -(2**63) <= values.min() <= values.max() < 2**63:
            raise ValueError(
                f"support_labels: label values [{values.min()}, {values.max()}] outside the "
                "supported range [-2**63, 2**63 - 1]"
            )
        return tuple(v.item() for v in values[values != 0].astype(np.int64)), False
    for i, x in enumerate(labels):
        if x.min() < 0 or x.max() > 1:
            raise ValueError(
                f"support_labels[{i}]: soft (non-integer) labels must lie in [0, 1], got "
                f"[{x.min():g}, {x.max():g}]; integer label maps give one task per value"
            )
    return (1,), True


def _load_volume(volume) -> tuple[np.ndarray, Any]:
    """A path, nibabel image, array or tensor -> (``(X, Y, Z)`` array, the nibabel image or
    None); float32 when read from an image, the array's own numeric dtype otherwise.

    Raises:
        FileNotFoundError: a path that is not a file.
        ValueError: a file nibabel cannot read, non-numeric data, not 3D, or empty; the
            message names the file (or "volume").
    """
    image = None
    name = "volume"
    if isinstance(volume, str | os.PathLike):
        import nibabel as nib

        name = os.fspath(volume)
        if not Path(name).is_file():
            raise FileNotFoundError(f"{name}: no such volume file")
        try:
            image = nib.load(name)
        except Exception as e:  # nibabel raises several types for unreadable files
            raise ValueError(f"{name}: not a readable NIfTI/medical image ({e})") from e
    elif hasattr(volume, "affine") and hasattr(volume, "get_fdata"):
        image = volume
    if image is not None:
        if np.dtype(image.get_data_dtype()).kind == "c":
            raise ValueError(
                f"{name}: complex values (dtype {image.get_data_dtype()}); megaseg segments real "
                "intensities: save the magnitude image"
            )
        data = np.asarray(image.get_fdata(dtype=np.float32))
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
    else:
        data = _numeric(volume, "volume")
    if data.ndim != 3:
        raise ValueError(
            f"{name}: expected a 3D volume, got shape {data.shape}"
            + ("; use predict() for 2D images" if data.ndim == 2 else "")
        )
    if min(data.shape) < 1:
        raise ValueError(f"{name}: empty volume of shape {data.shape}")
    return data, image


def _save_nifti(label_map: np.ndarray, image, out_path: str | os.PathLike) -> None:
    """Write ``label_map`` as NIfTI with ``image``'s affine and header (identity if None)."""
    import nibabel as nib

    if isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        out = type(image)(label_map, image.affine, header=image.header.copy())
    else:  # dtype said explicitly: nibabel refuses int64 data (labels >= 2**31) without it
        out = nib.Nifti1Image(
            label_map, None if image is None else image.affine, dtype=label_map.dtype
        )
        if image is None:
            out.set_sform(np.eye(4), code=1)
            out.set_qform(np.eye(4), code=1)
    out.set_data_dtype(label_map.dtype)
    out.header.set_slope_inter(1, 0)  # label values are stored as they are, not rescaled
    _save_image(out, out_path)


def _save_image(image, out_path: str | os.PathLike) -> None:
    """``nib.save`` atomically: to a temporary file beside ``out_path``, then renamed."""
    import nibabel as nib

    out_path = Path(out_path)
    # nibabel picks the format from the extension, so the temporary keeps it (.nii.gz).
    suffix = ".nii.gz" if out_path.name.endswith(".nii.gz") else out_path.suffix
    atomic_write(out_path, lambda tmp: nib.save(image, tmp), suffix=suffix)


def _input_path(volume) -> Path | None:
    """The file a volume argument was read from (a path or a nibabel image's file), if any."""
    if isinstance(volume, str | os.PathLike):
        return Path(volume)
    get_filename = getattr(volume, "get_filename", None)
    name = get_filename() if callable(get_filename) else None
    return Path(name) if name else None


def _same_file(a: Path, b: Path) -> bool:
    """The same path after resolving symlinks, or the same file through a hard link."""
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _is_input(volume, out_path: str | os.PathLike) -> bool:
    src = _input_path(volume)
    return src is not None and _same_file(src, Path(out_path))


def _refuse_input_as_output(volume, out_path: str | os.PathLike) -> None:
    """Raise ValueError when ``out_path`` is the volume's own file: the same path after
    resolving symlinks, or the same file through a hard link (``os.path.samefile``)."""
    src, out = _input_path(volume), Path(out_path)
    if src is not None and _same_file(src, out):
        raise ValueError(
            f"out_path: {out} is the input volume {src}; writing the label map there would "
            "destroy the scan. Choose another out_path, or pass overwrite_input=True"
        )


__all__ = ["FLIPS", "Prediction", "Segmenter", "flip_tta", "merge_labels", "segment"]
