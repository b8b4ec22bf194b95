"""megaseg.interpolate: the fills between labelled slices (no model), the guided plan and the
outward walk, on tiny synthetic stacks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megaseg.interpolate import (
    distance_prior,
    follow,
    guided_plan,
    in_plane_extent,
    itk_available,
    nearest_fill,
    taper,
)


def _disc(radius: float, centre=(16, 16), shape=(32, 32)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_nearest_fill_copies_only_between_the_outermost_slices():
    given = {5: _disc(4).astype(np.int64), 15: _disc(8).astype(np.int64) * 2}
    given[15][_disc(3)] = 1
    out = nearest_fill(given, 30)
    assert out.shape == (30, 32, 32)
    for i, lab in given.items():
        np.testing.assert_array_equal(out[i], lab)
    np.testing.assert_array_equal(out[9], given[5])  # nearer to 5
    # nearer to 15: value 1 from it (value 2 is on slice 15 alone, copied nowhere)
    np.testing.assert_array_equal(out[11], (given[15] == 1).astype(np.int64))
    # value 2 only on slice 15: nothing copied anywhere else; nothing beyond the ends
    assert not (out[:15] == 2).any() and not (out[16:] == 2).any()
    assert not out[:5].any() and not out[16:].any()


def test_distance_prior_interpolates_shapes_and_respects_absent_slices():
    given = {2: _disc(4).astype(np.int64), 10: _disc(10).astype(np.int64)}
    probs, slices = distance_prior(given, 20, 1)
    assert slices == list(range(3, 10))
    areas = (probs > 0.5).sum(axis=(1, 2))
    assert np.all(np.diff(areas) > 0)  # grows steadily from the small disc to the large one
    middle = probs[slices.index(6)] > 0.5
    assert _disc(6).sum() * 0.8 < middle.sum() < _disc(8).sum()
    # a labelled all-background slice between them: the structure is absent there
    given[6] = np.zeros((32, 32), np.int64)
    probs, slices = distance_prior(given, 20, 1)
    assert slices == []


def test_guided_plan_walks_stop_at_labelled_slices_and_after_reach():
    lab = _disc(5).astype(np.int64)
    given = {20: lab, 26: lab, 32: lab, 36: np.zeros_like(lab)}
    plan = guided_plan(given, 50, reach=1.0)[1]
    assert plan.between == [*range(21, 26), *range(27, 32)]
    walks = dict(plan.walks)
    assert walks[20] == [19, 18, 17, 16, 15, 14]  # one spacing (6 slices) below the first
    assert walks[32] == [33, 34, 35]  # stops before the slice labelled background
    assert 26 not in walks
    assert plan.limit == 6
    # where a walk stops at its limit, the model is asked one spacing further, and nowhere
    # else
    assert plan.looks == [8, None] and 8 in plan.slices and 13 not in plan.slices
    assert guided_plan(given, 50, reach=0.5)[1].walks[0][1] == [19, 18, 17]
    # where the volume ends within that one more spacing, the walk goes on to the end
    # (a structure the field of view cuts), with no look
    near = guided_plan({i - 10: m for i, m in given.items()}, 40)[1]
    assert dict(near.walks)[10] == list(range(9, -1, -1)) and near.looks == [None, None]
    assert guided_plan({10: lab, 16: lab}, 40)[1].looks == [None, 28]
    # one labelled slice: no spacing known; the walks go as far as the structure is wide
    # (11 pixels: here to the volume's ends), with no taper and no look
    lone = guided_plan({3: lab}, 8)[1]
    assert lone.walks == [(3, [2, 1, 0]), (3, [4, 5, 6, 7])]
    assert lone.limit is None and lone.looks == [None, None]


def test_guided_plan_from_one_slice_walks_as_far_as_the_structure_is_wide():
    """One labelled slice: the walks stop after the structure's largest in-plane extent, in
    slices by the pixel size over the slice spacing; each structure by its own."""
    disc = _disc(2)  # 5 x 5 pixels
    assert in_plane_extent(disc) == 5 and in_plane_extent(disc, (0.5, 0.25)) == 3
    # a header's float noise (1 mm stored as 1.0000001) adds no slice
    assert in_plane_extent(disc, (1.0000001, 1.0)) == 5 and in_plane_extent(disc, (1.01, 1)) == 6
    plan = guided_plan({20: disc.astype(np.int64)}, 40)[1]
    assert plan.walks == [(20, [19, 18, 17, 16, 15]), (20, [21, 22, 23, 24, 25])]
    # 3 mm slices of 1 mm pixels: 5 pixels reach 2 slices
    assert guided_plan({20: disc.astype(np.int64)}, 40, scale=(1 / 3, 1 / 3))[1].walks == [
        (20, [19, 18]),
        (20, [21, 22]),
    ]
    # a wide structure beside a small one on the same slice: each walks its own width
    two = disc.astype(np.int64)
    two[2:30, 2:6] = 2  # 28 x 4 pixels
    plans = guided_plan({20: two}, 40)
    assert [len(w) for _, w in plans[1].walks] == [5, 5]
    assert [len(w) for _, w in plans[2].walks] == [20, 19]  # 28 reaches the volume's ends


def test_follow_stops_where_the_mask_collapses_or_confidence_drops():
    first = _disc(6)
    sure = np.where(_disc(6), 0.95, 0.02).astype(np.float32)
    far_blob = np.where(_disc(4, centre=(4, 4)), 0.95, 0.02).astype(np.float32)
    unsure = np.where(_disc(6), 0.6, 0.3).astype(np.float32)
    probs, kept = follow(first, [sure, sure, far_blob, sure])
    assert kept == [True, True, False, False]  # the blob far from the mask is not followed
    assert not probs[3].any()  # nothing after the stop
    _, kept = follow(first, [sure, unsure, sure])
    assert kept == [True, False, False]
    # deterministic
    a, b = follow(first, [sure, unsure]), follow(first, [sure, unsure])
    for x, y in zip(a[0], b[0], strict=True):
        np.testing.assert_array_equal(x, y)


def test_taper_shrinks_to_nothing_within_the_limit():
    shapes = taper(_disc(8), 6, limit=4)
    areas = [(p > 0.5).sum() for p in shapes]
    assert areas[0] < _disc(8).sum()
    assert all(a >= b for a, b in zip(areas, areas[1:], strict=False))
    assert areas[4] == 0 and areas[5] == 0


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no labelled slice"):
        nearest_fill({}, 10)
    with pytest.raises(ValueError, match=r"slices \[12\] are outside the stack of 10"):
        nearest_fill({12: _disc(3).astype(int)}, 10)
    with pytest.raises(ValueError, match="one shape"):
        distance_prior({1: np.zeros((4, 4), int), 3: np.zeros((5, 5), int)}, 10, 1)


@pytest.mark.slow  # ITK loads its wrappers on first use: ~15 s
@pytest.mark.skipif(not itk_available(), reason="pip install 'megaseg[interpolation]'")
def test_itk_fill_in_a_process_that_exits_cleanly():
    """ITK's contour interpolation between two discs, in a child process: ITK has been seen
    to corrupt the heap at interpreter exit, which must not pass unnoticed (exit status)."""
    script = textwrap.dedent(
        """
        import numpy as np
        from megaseg.interpolate import itk_fill
        yy, xx = np.mgrid[:32, :32]
        small = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 16).astype(np.int64) * 7
        large = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 100).astype(np.int64) * 7
        out = itk_fill({2: small, 10: large}, 16)
        areas = [int((out[i] == 7).sum()) for i in range(16)]
        assert areas[0] == areas[1] == 0 and areas[11:] == [0] * 5, areas
        assert all(a <= b for a, b in zip(areas[2:11], areas[3:11])), areas
        assert set(np.unique(out)) == {0, 7}
        print("areas", areas)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "areas" in run.stdout


@pytest.mark.slow  # ITK loads its wrappers on first use: ~15 s
@pytest.mark.skipif(not itk_available(), reason="pip install 'megaseg[interpolation]'")
def test_itk_fill_leaves_the_heap_intact_on_a_real_volume():
    """The case that corrupted the heap when ITK ran its thread pool on two threads (glibc
    aborted at exit): the MNI152 tissue labels at 3 mm (benchmarks/annotate_loop.py's
    volume), five labelled slices. glibc's checks (MALLOC_CHECK_=3) make a corrupted heap
    abort the child process."""
    pytest.importorskip("nilearn")
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "benchmarks")!r})
        from annotate_loop import load_volume
        from megaseg.interpolate import itk_fill
        _, labels = load_volume(3)
        stack = np.moveaxis(labels, 2, 0)
        given = {{i: stack[i].astype(np.int64) for i in (2, 13, 15, 24, 29)}}
        out = itk_fill(given, len(stack))
        assert set(np.unique(out[3:29])) == {{0, 1, 2}}
        print("filled", int((out > 0).sum()))
        """
    )
    env = {**os.environ, "MALLOC_CHECK_": "3", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "filled" in run.stdout
