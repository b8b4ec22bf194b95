"""benchmarks/annotate_loop.py: the fills without a model it reports next to the session."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megaseg.interpolate import itk_available, nearest_fill

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their siblings (machine.py, ...)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def loop():
    return _load("annotate_loop")


@pytest.fixture(scope="module")
def cone():
    """``(X, Y, Z)`` = (24, 24, 12) labels: a disc whose radius grows along axis 1, value 1."""
    xx, zz = np.mgrid[:24, :12]
    labels = np.zeros((24, 24, 12), np.uint8)
    for y in range(4, 20):
        labels[:, y][(xx - 12) ** 2 + (zz - 6) ** 2 <= (1 + y / 4) ** 2] = 1
    return labels


def test_baselines_score_the_fills_of_the_chosen_slices(loop, cone):
    chosen = [11, 5, 17]
    dice = loop.baseline_dice(cone, 1, chosen, ["nearest"])["nearest"]
    assert len(dice) == 3
    # n = 1: the structure only on slice 11 (nothing is filled beyond the labelled slices)
    one = np.zeros_like(cone)
    one[:, 11] = cone[:, 11]
    assert dice[0] == pytest.approx(loop.volume_dice(one, cone))
    # n = 3: the same as nearest_fill itself, slices moved to axis 0 and back
    stack = nearest_fill({i: cone[:, i] for i in chosen}, cone.shape[1])
    assert dice[2] == pytest.approx(loop.volume_dice(np.moveaxis(stack, 0, 1), cone))
    assert dice[0] < dice[1] < dice[2] < 1
    every = list(range(cone.shape[1]))
    assert loop.baseline_dice(cone, 1, every, ["nearest"])["nearest"][-1] == 1.0


@pytest.mark.slow  # ITK loads its wrappers on first use: ~15-25 s
@pytest.mark.skipif(not itk_available(), reason="pip install 'megaseg[interpolation]'")
def test_itk_baseline_interpolates_between_the_chosen_slices():
    """In a child process, as tests/test_interpolate.py runs ITK. Its exit status is not
    checked here: with this script's imports (torch, the megaseg session) ITK's teardown at
    interpreter exit was seen to abort on a corrupted heap in 2 of 3 runs, after the results
    were printed (tests/test_interpolate.py checks the exit status with ITK alone)."""
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        import numpy as np
        sys.path.insert(0, {str(BENCHMARKS)!r})
        spec = importlib.util.spec_from_file_location("loop", {str(BENCHMARKS / "annotate_loop.py")!r})
        loop = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loop)
        xx, zz = np.mgrid[:24, :12]
        cone = np.zeros((24, 24, 12), np.uint8)
        for y in range(4, 20):
            cone[:, y][(xx - 12) ** 2 + (zz - 6) ** 2 <= (1 + y / 4) ** 2] = 1
        dice = loop.baseline_dice(cone, 1, [4, 19, 11], ["nearest", "ITK"])
        assert 0 < dice["ITK"][0] < dice["ITK"][2] <= 1, dice
        # a growing disc: contour interpolation is at least about as good as copying
        assert dice["ITK"][2] >= dice["nearest"][2] - 0.02, dice
        print("baselines ok", dice)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert "baselines ok" in run.stdout, run.stderr[-2000:]


def test_baselines_without_itk_say_so(loop, monkeypatch, capsys):
    monkeypatch.setattr(loop, "itk_available", lambda: False)
    assert loop.baselines_available() == ["nearest"]
    assert "ITK is not installed" in capsys.readouterr().out


def test_report_puts_the_fills_next_to_every_strategy(loop, tmp_path):
    def run(seed, base):
        return {
            "seed": seed, "dice": [base, base + 0.1], "s": [0.1, 0.1], "slices": [3, 5],
            "baselines": {"nearest": [base - 0.2, base - 0.1], "ITK": [base - 0.2, base]},
        }  # fmt: skip

    raw = {
        "meta": {
            "what": "test volume",
            "name": "loop",
            "slices": 12,
            "axis": 1,
            "checkpoint": "x",
            "max_support": 2,
            "ensemble": 3,
            "seeds": [0, 1],
            "max_slices": 2,
            "loop_s": 1.0,
            "title": "t",
            "machine": "m",
            "command": "c",
        },  # fmt: skip
        "loop": {s: [run(0, 0.5), run(1, 0.7)] for s in loop.STRATEGIES},
        "ablation": [(2, 2, 1, 0.6, 0.1), (2, "nearest", "-", 0.5, 0.01)],
        "timing": None,
    }
    loop.report(json.loads(json.dumps(raw)), tmp_path)
    md = (tmp_path / "loop.md").read_text()
    assert "## The same slices filled without the model" in md
    assert "| 2 | " + " | ".join(["0.700 / 0.500 / 0.600"] * 4) + " |" in md
    assert "| 2 | nearest | - | 0.500 | 0.0 |" in md
    assert (tmp_path / "loop.png").stat().st_size > 0
    # results recorded before the baselines existed still make a report, without that table
    for runs in raw["loop"].values():
        for r in runs:
            del r["baselines"]
    loop.report(raw, tmp_path)
    assert "without the model" not in (tmp_path / "loop.md").read_text()


def test_speed_benchmark_sets_the_default_stride_only_inside():
    from megaseg.annotate import VolumeSession

    speed = _load("annotate_speed")
    default = VolumeSession.__init__.__kwdefaults__["stride"]
    with speed.default_stride(1):
        assert VolumeSession.__init__.__kwdefaults__["stride"] == 1
    assert VolumeSession.__init__.__kwdefaults__["stride"] == default == 3


def test_annotate_volumes_pairs_each_strategy_with_even_spacing_per_structure():
    """The which-slice-next comparison is paired per structure, over n = 2.. (n = 1 is the
    same middle slice for every strategy), with the count of structures ahead."""
    volumes = _load("annotate_volumes")
    curves = {  # structure -> strategy -> Dice after 1, 2, 3 labelled slices
        "a": {"even": [0.1, 0.5, 0.7], "suggest": [0.1, 0.6, 0.8]},
        "b": {"even": [0.9, 0.5, 0.7], "suggest": [0.1, 0.4, 0.6]},
    }
    loops = [
        {"structure": s, "strategy": st, "dice": d}
        for s, by in curves.items()
        for st, d in by.items()
    ]
    (line,) = volumes._against_even(loops, ["a", "b"], ["even", "suggest"])[2:]
    # differences over n = 2..3: +0.1 on a, -0.1 on b; the interval spans both
    assert line.startswith("- suggest - even: +0.000 [-0.100, +0.100], ahead on 1 of 2")


def test_annotate_together_labels_every_section_on_each_slice_it_picks():
    """benchmarks/annotate_together.py: k slices per section, spread over that section's
    extent, each carrying every section present on it (as a user labels the spine)."""
    together = _load("annotate_together")
    labels = np.zeros((8, 8, 30), np.uint8)
    labels[2:6, 2:6, 0:12] = 4  # lumbar below
    labels[2:6, 2:6, 11:25] = 3  # thoracic (slice 11 holds both in the real scan's way)
    labels[1:3, 1:3, 11] = 4
    labels[2:6, 2:6, 25:30] = 2  # cervical above
    labels[0, 0, :] = 7  # another structure: never part of the sections' labels
    given = together.labelled_together(labels, 2)
    assert len(given) == 6 and all(lab[0, 0] == 0 for lab in given.values())
    for i, lab in given.items():
        np.testing.assert_array_equal(lab[1:, 1:], labels[1:, 1:, i])


def test_suggest_headroom_compares_each_pick_with_the_best_slice_of_its_state():
    """benchmarks/suggest_headroom.py: from even spacing's first n slices, each strategy's
    next slice against the best candidate (the oracle) and a random one (the candidates'
    mean within the extent)."""
    headroom = _load("suggest_headroom")
    assert headroom.even_state(0, 20, 3) == [10, 15, 4]  # equal gaps: the later first
    assert headroom.candidates([1, 2, 3, 4, 5, 6, 7], 3, [6]) == [1, 4, 6, 7]
    picks = {"even": 3, "suggest-within": 5, "suggest": 30}
    records = [
        {"n": 2, "extent": [0, 9], "now": 0.5, "picks": picks,
         "dice": {"3": 0.6, "5": 0.7, "8": 0.72, "30": 0.4}},
        {"n": 2, "extent": [0, 9], "now": 0.7, "picks": picks,
         "dice": {"3": 0.8, "5": 0.9, "8": 0.8, "30": 0.7}},
    ]  # fmt: skip
    (row,) = headroom.summarize(records)
    assert row["states"] == 2 and row["now"] == pytest.approx(0.6)
    assert row["even"] == pytest.approx(0.7) and row["suggest-within"] == pytest.approx(0.8)
    assert row["suggest"] == pytest.approx(0.55)  # slice 30: outside the extent, still scored
    assert row["best"] == pytest.approx(0.81)
    assert row["random"] == pytest.approx(np.mean([np.mean([0.6, 0.7, 0.72]), 0.5 + 1.0 / 3]))
    assert row["within_best"] == 1  # 0.7 is 0.02 short of 0.72; 0.9 is the best
