"""The napari dock widget: segment a volume from the slices painted in a labels layer.

Workflow: open a 3D image, add a labels layer of the same shape, paint a few slices (several
label values allowed), press *Segment*. The widget runs :meth:`VolumeSession.segment` in a
worker thread, adds the layers ``megaseg labels`` and ``megaseg uncertainty``, and moves the
viewer to the slice :meth:`VolumeSession.suggest` names. Correct that slice (or press
*Copy prediction here* to start from the model's guess, then fix it) and press *Segment*
again: only slices whose nearest labelled slices changed are predicted again. Where you know
the structures lie along the axis, say so (*structure's slices*, e.g. ``40-75``): the suggested
slices then stay in that range instead of chasing what the model guesses beyond it. A
suggested slice where the structures are absent cannot be painted: press *Nothing here* on it
(again to take it back), and the session learns that they end before it.

Labelled slices are the slices of the labels layer that hold any nonzero label, and those
marked *Nothing here* (labelled all background; painting one makes it a painted slice;
another scan in the image layer drops the marks); erasing a painted slice completely
un-labels it. The session (and its cached predictions) is kept while the image's content,
the axis and the checkpoint stay the same: replacing the layer's data with another scan of
the same shape starts a new session.
"""

from __future__ import annotations

import hashlib
import sys
import time

import napari
import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    create_widget,
)
from napari.qt.threading import thread_worker
from qtpy.QtCore import QObject, Signal

DEFAULT_CHECKPOINT = "megaseg_generalist"  # the weights megaseg ships (checkpoints/)
LABELS_LAYER = "megaseg labels"
UNCERTAINTY_LAYER = "megaseg uncertainty"


def _avoid_triton_after_opengl() -> None:
    """Keep triton out of a napari process on a machine without CUDA.

    torchvision (imported by timm, imported by megaseg.models) imports torch._dynamo, which
    imports triton when it is installed. Loading triton's bundled LLVM into a process where
    Mesa's OpenGL driver (which links its own LLVM) is already loaded segfaults: measured
    with napari 0.9 / PyQt5 under Xvfb (llvmpipe), triton 3.8. triton only serves
    torch.compile on GPUs, so without CUDA it is never needed here; with CUDA, or when triton
    was imported before the viewer (then the order is safe), nothing is changed.
    """
    import torch

    if "triton" not in sys.modules and not torch.cuda.is_available():
        sys.modules["triton"] = None  # `import triton` now raises ImportError: "not installed"


class _Progress(QObject):
    """Carries ``(done, total)`` from the worker thread to the GUI thread (queued signal)."""

    changed = Signal(int, int)


class AnnotateWidget(Container):
    """Dock widget around :class:`megaseg.annotate.VolumeSession`.

    Attributes (for scripts and tests): ``session`` (the current session), ``result`` (the
    last :class:`~megaseg.annotate.SessionResult`), ``suggested`` (the slices suggested last),
    ``empty`` (the ``(axis, slice)`` pairs marked *Nothing here*), ``worker`` (the running
    or last worker; its ``finished`` signal fires after the layers are updated).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        _avoid_triton_after_opengl()
        # Import the model stack here, in the GUI thread, not first in the worker thread.
        import megaseg.annotate  # noqa: F401
        import megaseg.checkpoint  # noqa: F401
        import megaseg.models  # noqa: F401

        self.viewer = napari_viewer
        self._image = create_widget(annotation=napari.layers.Image, label="image")
        self._labels = create_widget(annotation=napari.layers.Labels, label="labelled slices")
        self._axis = ComboBox(label="slicing axis", choices=[0, 1, 2], value=0)
        self._method = ComboBox(
            label="method", choices=["guided", "model", "interpolate"], value="guided"
        )
        self._method.tooltip = (
            "guided: interpolation between your slices, corrected by the model; model: every "
            "slice from the model alone; interpolate: no model (instant)"
        )
        self._within = LineEdit(label="structure's slices", value="")
        self._within.tooltip = (
            "first-last slice (along the axis) where the structures lie, e.g. 40-75: the "
            "suggested slices stay there; empty: the session guesses from its own labels"
        )
        self._checkpoint = LineEdit(label="checkpoint", value=DEFAULT_CHECKPOINT)
        self._checkpoint.tooltip = "a .safetensors file, or the name of a model megaseg ships"
        self._run = PushButton(text="Segment")
        self._copy = PushButton(text="Copy prediction here")
        self._copy.tooltip = "copy the predicted labels of the current slice into the labels layer"
        self._nothing = PushButton(text="Nothing here")
        self._nothing.tooltip = (
            "label the current slice as background (the structures are absent there); "
            "press again to take it back"
        )
        self._progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self._status = Label(value="Paint a few slices, then press Segment.")
        self._status.native.setWordWrap(True)  # long messages wrap instead of widening the dock
        self.native.setMaximumWidth(420)
        self.extend(
            [
                self._image,
                self._labels,
                self._axis,
                self._method,
                self._within,
                self._checkpoint,
                self._run,
                self._copy,
                self._nothing,
                self._progress,
                self._status,
            ]
        )
        self._signal = _Progress()
        self._signal.changed.connect(self._on_progress)
        self._run.changed.connect(self.run)
        self._copy.changed.connect(self.copy_prediction)
        self._nothing.changed.connect(self.mark_empty)
        self._segmenters: dict[str, object] = {}
        self.session = None
        self._session_key = None
        self.result = None
        self.suggested: list[int] = []
        self.empty: set[tuple[int, int]] = set()
        self.worker = None
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.reset_choices)
        self.reset_choices()
        if self.viewer.dims.ndim == 3 and self.viewer.dims.not_displayed:
            self._axis.value = int(self.viewer.dims.not_displayed[0])

    # ------------------------------------------------------------------ actions

    def run(self, *_):
        """Start segmenting in a worker thread; returns the worker (None if refused)."""
        if self.worker is not None and self.worker.is_running:
            self._status.value = "Already running."
            return None
        image, labels = self._image.value, self._labels.value
        if image is None or labels is None:
            self._status.value = "Choose an image layer and a labels layer."
            return None
        # A copy of the paint: the user may keep painting while the worker reads it.
        data, painted = np.asarray(image.data), np.array(labels.data, copy=True)
        if data.ndim != 3 or painted.shape != data.shape:
            self._status.value = (
                f"Need a 3D image and a labels layer of the same shape; got {data.shape} "
                f"and {painted.shape}."
            )
            return None
        if not painted.any():
            self._status.value = f"Paint at least one slice of '{labels.name}' first."
            return None
        axis, checkpoint = int(self._axis.value), self._checkpoint.value.strip()
        stack = np.moveaxis(painted, axis, 0).reshape(painted.shape[axis], -1)
        painted_slices = [int(i) for i in np.flatnonzero(stack.any(axis=1))]
        self.empty -= {(axis, i) for i in painted_slices}  # painted after all
        empty = sorted(i for a, i in self.empty if a == axis and i < painted.shape[axis])
        try:
            within = _slice_range(self._within.value, data.shape[axis])
        except ValueError as e:
            self._status.value = f"structure's slices: {e}"
            return None
        self._run.enabled = False
        self._status.value = "Segmenting..."
        self._progress.value = 0
        voxel = tuple(float(v) for v in image.scale[-3:])  # the layer's voxel sizes
        self.worker = self._work(
            data, painted, painted_slices, empty, axis, checkpoint, within, image.name, voxel
        )
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(lambda: setattr(self._run, "enabled", True))
        self.worker.start()
        return self.worker

    @thread_worker
    def _work(self, data, painted, painted_slices, empty, axis, checkpoint, within, name, voxel):
        from megaseg import Segmenter
        from megaseg.annotate import VolumeSession

        start = time.perf_counter()
        # here: hashing a big volume takes a moment
        key = (_fingerprint(data), axis, checkpoint, voxel)
        if checkpoint not in self._segmenters:
            self._segmenters[checkpoint] = Segmenter.from_checkpoint(checkpoint)
        stale = self._session_key is not None and self._session_key[0] != key[0]
        if stale:  # another scan: the marks were made on the one before
            empty = []
        if self.session is None or self._session_key != key:
            self.session = VolumeSession(
                self._segmenters[checkpoint],
                data,
                axis,
                affine=np.diag([*voxel, 1.0]),  # its voxel sizes: how far one slice reaches
                progress=False,
            )
            self._session_key = key
        session = self.session
        session.method = self._method.value  # part of the result's cache key
        for i in set(session.labelled) - set(painted_slices) - set(empty):  # erased: un-label
            session.remove(i)
        session.add_volume(painted, painted_slices)
        for i in empty:  # marked "Nothing here": the structures are absent there
            session.add(i, np.zeros(session.slice_shape, np.int64))
        result = session.segment(callback=self._signal.changed.emit)
        suggested = session.suggest(3, within=within)
        return result, suggested, time.perf_counter() - start, name, stale

    def copy_prediction(self, *_):
        """Copy the predicted labels of the viewer's current slice into the labels layer."""
        labels = self._labels.value
        if self.result is None or labels is None:
            self._status.value = "Segment first."
            return
        axis = self.session.axis
        index = int(self.viewer.dims.current_step[axis])
        target = np.moveaxis(labels.data, axis, 0)  # a view: writes go to the layer's data
        target[index] = np.take(self.result.labels, index, axis=axis)
        labels.refresh()
        self._status.value = f"Copied the prediction of slice {index}; correct it, then Segment."

    def mark_empty(self, *_):
        """Mark the viewer's current slice along the slicing axis as background (the
        structures are absent there), or take the mark back; applied at the next Segment."""
        labels = self._labels.value
        if labels is None or np.asarray(labels.data).ndim != 3:
            self._status.value = "Choose a 3D labels layer first."
            return
        axis = int(self._axis.value)
        index = int(self.viewer.dims.current_step[axis])
        if np.take(labels.data, index, axis=axis).any():
            self._status.value = f"Slice {index} is painted: erase it first to mark it empty."
            return
        if (axis, index) in self.empty:
            self.empty.discard((axis, index))
            self._status.value = f"Slice {index} is no longer marked empty; press Segment."
        else:
            self.empty.add((axis, index))
            self._status.value = f"Slice {index} marked: nothing here. Press Segment."

    # ------------------------------------------------------------------ callbacks (GUI thread)

    def _on_progress(self, done: int, total: int):
        self._progress.max = max(1, total)
        self._progress.value = done

    def _on_done(self, value):
        result, suggested, seconds, name, stale = value
        self.result, self.suggested = result, suggested
        if stale:
            self.empty.clear()
        image = self._image.value
        place = {}
        if image is not None:
            place = {"scale": image.scale, "translate": image.translate}
        if LABELS_LAYER in self.viewer.layers:
            self.viewer.layers[LABELS_LAYER].data = result.labels
        else:
            self.viewer.add_labels(result.labels, name=LABELS_LAYER, opacity=0.5, **place)
            self.viewer.reset_view()
        if UNCERTAINTY_LAYER in self.viewer.layers:
            self.viewer.layers[UNCERTAINTY_LAYER].data = result.uncertainty
        else:
            self.viewer.add_image(
                result.uncertainty,
                name=UNCERTAINTY_LAYER,
                colormap="magma",
                blending="additive",
                contrast_limits=(0.0, 1.0),
                opacity=0.6,
                visible=False,
                **place,
            )
        if self._labels.value is not None:  # keep the user's paint layer on top and selected
            self.viewer.layers.selection.active = self._labels.value
        axis = self.session.axis
        if suggested:
            self.viewer.dims.set_current_step(axis, suggested[0])
        self._progress.max = max(1, self._progress.max)
        self._progress.value = self._progress.max
        self._status.value = (
            f"{name}: {len(result.labelled)} labelled slices, {result.predicted} predicted in "
            f"{seconds:.1f} s. Label next: {', '.join(map(str, suggested)) or '-'} "
            f"(axis {axis}; now showing {suggested[0] if suggested else '-'})."
        )

    def _on_error(self, error: Exception):
        self._status.value = f"Error: {error}"
        napari.utils.notifications.show_error(f"megaseg: {error}")


def _slice_range(text: str, depth: int) -> tuple[int, int] | None:
    """``"first-last"`` (slice numbers as napari shows them, both included) -> ``(first,
    last + 1)`` for :meth:`VolumeSession.suggest`'s ``within``; empty -> None. Raises
    ValueError saying what is wrong."""
    text = text.strip()
    if not text:
        return None
    parts = text.replace(":", "-").split("-")
    try:
        first, last = (int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"expected the first and last slice as 'first-last', e.g. 40-75, got {text!r}"
        ) from None
    if not 0 <= first <= last < depth:
        raise ValueError(f"{first}-{last} is not a range of slices 0..{depth - 1} along this axis")
    return first, last + 1


def _fingerprint(data: np.ndarray) -> str:
    """A digest of the volume's content, shape and dtype: the layer object (its id) can stay
    while its data is replaced by another scan of the same shape. ~0.2 s per 100 MB."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.shape}{data.dtype.str}".encode())
    h.update(np.ascontiguousarray(data).data)
    return h.hexdigest()
