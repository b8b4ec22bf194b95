"""The napari dock widget, in a real (headless) napari viewer: pytest-qt + napari's own
``make_napari_viewer`` fixture. napari needs an OpenGL context: on a headless Linux machine
pytest-xvfb runs the tests inside Xvfb (installed by .ci/run).

Locally these tests skip when napari or a display is missing; in CI (``CI`` set) they fail
instead, because .ci/run installs ``.[dev]``, which includes napari, and Xvfb."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

if os.environ.get("CI"):
    import napari  # noqa: F401  # CI must run these tests, never skip them
else:
    pytest.importorskip("napari")
    pytest.importorskip("pytestqt")
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        pytest.skip("no X display (install Xvfb and pytest-xvfb)", allow_module_level=True)

pytest.importorskip("nilearn")

from megaseg.napari._widget import LABELS_LAYER, UNCERTAINTY_LAYER, AnnotateWidget  # noqa: E402

TIMEOUT_MS = 120_000  # segmenting 32 small slices takes a few seconds; a busy CI machine more


@pytest.fixture(scope="module")
def mni():
    """MNI152 T1 and its tissue labels at 6 mm, ``(33, 39, 32)``."""
    from megaseg.examples import mni152_volume

    t1, labels, _ = mni152_volume()
    return t1[::6, ::6, ::6].copy(), labels[::6, ::6, ::6].copy()


def _viewer_with_paint(make_napari_viewer, mni, slices):
    t1, labels = mni
    viewer = make_napari_viewer()
    viewer.add_image(t1, name="t1")
    painted = np.zeros_like(labels, dtype=np.int32)
    for i in slices:
        painted[i] = labels[i]  # slicing along axis 0, napari's default slider
    viewer.add_labels(painted, name="paint")
    return viewer


def _segment(qtbot, widget):
    worker = widget.run()
    assert worker is not None, widget._status.value
    with qtbot.waitSignal(worker.finished, timeout=TIMEOUT_MS):
        pass
    assert "Error" not in widget._status.value, widget._status.value


def test_widget_segments_and_adds_layers(make_napari_viewer, qtbot, mni):
    _, labels = mni
    viewer = _viewer_with_paint(make_napari_viewer, mni, [10, 20])
    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    # It found the layers by type, and the axis napari slides along.
    assert widget._image.value is viewer.layers["t1"]
    assert widget._labels.value is viewer.layers["paint"]
    assert widget._axis.value == 0

    _segment(qtbot, widget)
    out = viewer.layers[LABELS_LAYER]
    unc = viewer.layers[UNCERTAINTY_LAYER]
    assert out.data.shape == labels.shape and unc.data.shape == labels.shape
    np.testing.assert_array_equal(out.data[10], labels[10])  # painted slices kept
    assert set(np.unique(out.data)) == {0, 1, 2}
    assert widget.result.labelled == (10, 20)
    assert widget._progress.value == widget._progress.max
    # The viewer moved to the first suggested slice, which was not a painted one.
    first = widget.suggested[0]
    assert first not in (10, 20)
    assert viewer.dims.current_step[0] == first

    # The user corrects the suggested slice (from the model's guess) and runs again.
    widget.copy_prediction()
    paint = viewer.layers["paint"]
    np.testing.assert_array_equal(paint.data[first], out.data[first])
    paint.data[first] = labels[first]
    paint.refresh()
    before = out.data.copy()
    _segment(qtbot, widget)
    assert widget.result.labelled == tuple(sorted((10, 20, first)))
    assert 0 < widget.result.predicted < labels.shape[0] - 2
    np.testing.assert_array_equal(viewer.layers[LABELS_LAYER].data[first], labels[first])
    assert not np.array_equal(viewer.layers[LABELS_LAYER].data, before)


def test_suggestions_stay_in_the_structure_slices_the_user_gives(make_napari_viewer, qtbot, mni):
    viewer = _viewer_with_paint(make_napari_viewer, mni, [12, 16])
    widget = AnnotateWidget(viewer)
    widget._within.value = "13-15"  # between the painted slices: the three free ones
    _segment(qtbot, widget)
    assert sorted(widget.suggested) == [13, 14, 15]
    assert viewer.dims.current_step[0] == widget.suggested[0]


def test_a_slice_marked_nothing_here_is_labelled_background(make_napari_viewer, qtbot, mni):
    """A slice without the structures cannot be painted; *Nothing here* labels it all
    background: the session keeps it empty and never suggests it; pressed again, or painted
    over, the mark goes."""
    viewer = _viewer_with_paint(make_napari_viewer, mni, [12, 16])
    widget = AnnotateWidget(viewer)
    _segment(qtbot, widget)
    target = 14  # the session labels brain there; the user says there is nothing
    assert widget.result.labels[target].any()
    viewer.dims.set_current_step(0, target)
    widget.mark_empty()
    assert widget.empty == {(0, target)} and "nothing here" in widget._status.value
    _segment(qtbot, widget)
    assert target in widget.result.labelled
    assert not widget.result.labels[target].any()
    assert target not in widget.suggested
    viewer.dims.set_current_step(0, target)  # Segment moved the viewer to its suggestion
    widget.mark_empty()  # again: taken back, un-labelled at the next Segment
    assert widget.empty == set()
    _segment(qtbot, widget)
    assert widget.result.labelled == (12, 16)
    viewer.dims.set_current_step(0, target)
    widget.mark_empty()
    viewer.layers["paint"].data[target] = mni[1][target]  # painted after all: a painted slice
    _segment(qtbot, widget)
    assert widget.empty == set() and widget.result.labels[target].any()
    viewer.dims.set_current_step(0, 12)
    widget.mark_empty()  # a painted slice cannot be marked
    assert widget.empty == set() and "is painted" in widget._status.value


@pytest.mark.parametrize(
    ("text", "reason"), [("ten to 18", "expected the first and last slice"), ("20-90", "0..32")]
)
def test_a_bad_structure_range_is_refused_with_the_reason(make_napari_viewer, mni, text, reason):
    viewer = _viewer_with_paint(make_napari_viewer, mni, [12, 16])
    widget = AnnotateWidget(viewer)
    widget._within.value = text
    assert widget.run() is None
    assert "structure's slices" in widget._status.value and reason in widget._status.value
    assert LABELS_LAYER not in viewer.layers


def test_widget_refuses_mismatched_layers(make_napari_viewer, mni):
    t1, _ = mni
    viewer = make_napari_viewer()
    viewer.add_image(t1, name="t1")
    viewer.add_labels(np.zeros((4, 5, 6), np.int32), name="paint")
    widget = AnnotateWidget(viewer)
    assert widget.run() is None
    assert "same shape" in widget._status.value
    viewer.layers.remove("paint")
    viewer.add_labels(np.zeros(t1.shape, np.int32), name="empty")
    assert widget._labels.value is viewer.layers["empty"]
    assert widget.run() is None
    assert "Paint at least one slice" in widget._status.value
    assert LABELS_LAYER not in viewer.layers


def test_plugin_manifest_registers_the_widget(make_napari_viewer):
    """The npe2 manifest is installed with megaseg and opens the widget from the plugin menu."""
    import npe2

    manifest = npe2.PluginManager.instance().get_manifest("megaseg")
    assert [w.display_name for w in manifest.contributions.widgets] == ["Annotate volume (megaseg)"]
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("megaseg", "Annotate volume (megaseg)")
    assert isinstance(widget, AnnotateWidget)


def test_another_scan_in_the_same_layer_gets_a_new_session(make_napari_viewer, qtbot, mni):
    """The image layer's data replaced by another scan of the same shape: the next Segment
    segments that scan (as a fresh session would), not the cached session of the first one,
    and drops the slices marked *Nothing here* on the first."""
    from megaseg.annotate import VolumeSession

    t1, _ = mni
    viewer = _viewer_with_paint(make_napari_viewer, mni, [10, 20])
    widget = AnnotateWidget(viewer)
    _segment(qtbot, widget)
    first = widget.session
    viewer.dims.set_current_step(0, 15)
    widget.mark_empty()  # made on the first scan: dropped with it
    other = np.ascontiguousarray(np.flip(t1, axis=1))  # same shape, another image
    viewer.layers["t1"].data = other
    assert widget.run() is not None
    # not _segment's waitSignal: a cached result can finish before the wait starts
    qtbot.waitUntil(lambda: widget._run.enabled, timeout=TIMEOUT_MS)
    assert "Error" not in widget._status.value, widget._status.value
    assert widget.session is not first
    fresh = VolumeSession(first.segmenter, other, axis=0, progress=False)
    fresh.add_volume(viewer.layers["paint"].data)
    np.testing.assert_array_equal(widget.result.labels, fresh.segment().labels)
    assert widget.result.labelled == (10, 20) and widget.empty == set()


def test_the_session_gets_the_image_layers_voxel_sizes(make_napari_viewer, qtbot, mni):
    """One painted slice, no spacing known: the session follows the structures no further
    along the slider axis than their in-plane width, in slices of the layer's scale (here
    3 units thick, pixels 1: a third of their width; the brain goes on beyond that)."""
    from megaseg.interpolate import in_plane_extent

    t1, labels = mni
    mid = labels.shape[0] // 2
    painted = np.zeros_like(labels, dtype=np.int32)
    painted[mid] = labels[mid]
    viewer = make_napari_viewer()
    viewer.add_image(t1, name="t1", scale=(3, 1, 1))
    viewer.add_labels(painted, name="paint", scale=(3, 1, 1))
    widget = AnnotateWidget(viewer)
    _segment(qtbot, widget)
    reach = max(in_plane_extent(labels[mid] == v, (1 / 3, 1 / 3)) for v in (1, 2))
    brain = np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1))
    assert brain[0] < mid - reach and brain[-1] > mid + reach
    out = viewer.layers[LABELS_LAYER].data
    rows = np.flatnonzero(out.reshape(len(out), -1).any(axis=1))
    assert mid - reach <= rows[0] < mid and mid < rows[-1] <= mid + reach
