"""Sanity suite: fixed tasks, Dice through Segmenter, and the ensemble-never-empties check.

Stub in-context "networks" with known behaviour make the expected scores certain without a
trained checkpoint: an intensity matcher (solves discs, fooled by same-intensity distractors)
and a support-mean predictor (predicts where the support's labels were, wherever the query's
object is).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from megaseg.evaluation import sanity
from megaseg.evaluation.sanity import POOL, QUERIES, TASKS, run_sanity, sanity_png, sanity_tasks
from megaseg.inference import Segmenter


class IntensityMatcher(nn.Module):
    """Foreground where the query's (smoothed) intensity is nearer the support's mean
    foreground intensity than its mean background intensity."""

    def forward(self, query, support_images, support_labels, support_term=None):
        w = support_labels.clamp(0, 1)
        fg = (support_images * w).sum((1, 2, 3, 4)) / w.sum((1, 2, 3, 4)).clamp_min(1e-6)
        bg = (support_images * (1 - w)).sum((1, 2, 3, 4)) / (1 - w).sum((1, 2, 3, 4))
        q = nn.functional.avg_pool2d(query, 3, 1, 1)
        fg, bg = fg[:, None, None, None], bg[:, None, None, None]
        return 40 * ((q - bg).abs() - (q - fg).abs())


class SupportMean(nn.Module):
    """Ignores the query: the mean support label, made confident (logit 20 * (mean - 0.5))."""

    def forward(self, query, support_images, support_labels, support_term=None):
        mean = support_labels.mean(1)
        return (20 * (mean - 0.5)).expand(query.shape[0], -1, -1, -1)


class LeftHalf(nn.Module):
    """Ignores the task: logit +10 on the left half of the image, -30 on the right. Averaged
    with its mirror images (flip TTA) that is p ~ 0.49998 < 0.5 everywhere: an empty mask."""

    def forward(self, query, support_images, support_labels, support_term=None):
        left = torch.arange(query.shape[-1]) < query.shape[-1] // 2
        return torch.where(left, 10.0, -30.0).expand(query.shape)


@pytest.fixture(scope="module")
def tasks():
    return sanity_tasks(size=64)


def test_tasks_are_fixed_and_well_formed(tasks):
    again = sanity_tasks(size=64)
    assert [t.name for t in tasks] == list(TASKS)
    for t, u in zip(tasks, again, strict=True):
        assert t.images.shape == t.labels.shape == (POOL + QUERIES, 64, 64)
        assert torch.equal(t.images, u.images) and torch.equal(t.labels, u.labels)
        assert 0 <= t.images.min() and t.images.max() <= 1
        area = t.labels.flatten(1).float().mean(1)
        assert (area > 0.002).all() and (area < 0.5).all(), t.name  # an object on a background
    moving = next(t for t in tasks if t.name == "moving_disc")
    area = moving.labels.flatten(1).float().mean(1)
    assert area.max() > 4 * area.min()  # the object really changes size between examples


def test_intensity_matcher_solves_discs_but_not_distractors(tasks):
    seg = Segmenter(IntensityMatcher(), resolution=64, device="cpu")
    chosen = [t for t in tasks if t.name in ("bright_disc", "dark_disc") or "blob" in t.name]
    result = run_sanity(seg, ns=(1, 4), ensembles=(), tasks=chosen)
    for n in (1, 4):
        assert result.dice[("bright_disc", n, 1)] > 0.85
        assert result.dice[("dark_disc", n, 1)] > 0.85
        # Intensity alone also labels the three bright distractors (not the bright ones
        # beside a dark blob): telling them apart needs shape.
        assert result.dice[("bright_blob_distractors", n, 1)] < 0.8
        assert result.dice[("dark_blob_distractors", n, 1)] > 0.85
    assert result.predictions[("bright_disc", 4, 1)].shape == (QUERIES, 64, 64)
    table = result.markdown()
    assert "| bright_disc |" in table and "N=4" in table and "**mean**" in table


def test_ensemble_check_flags_members_that_cancel_out(tasks):
    """Four N=1 members each confidently predict their own support disc; the moving disc is
    elsewhere in each, so the averaged probability stays below 0.5: the check must fail."""
    seg = Segmenter(SupportMean(), resolution=64, device="cpu")
    moving = [t for t in tasks if t.name == "moving_disc"]
    result = run_sanity(seg, ns=(1,), ensembles=(4,), tasks=moving)
    key = ("moving_disc", 1, 4)
    assert result.confident[key] == QUERIES
    assert result.violations[key] > 0 and not result.ensemble_ok()
    assert "FAIL" in result.markdown()


def test_ensemble_check_passes_for_a_consistent_predictor(tasks):
    seg = Segmenter(IntensityMatcher(), resolution=64, device="cpu")
    chosen = [t for t in tasks if t.name == "bright_disc"]
    result = run_sanity(seg, ns=(1,), ensembles=(4,), tasks=chosen)
    assert result.confident[("bright_disc", 1, 4)] == QUERIES
    assert result.ensemble_ok() and "PASS" in result.markdown()


def test_bad_support_sizes_raise():
    seg = Segmenter(SupportMean(), resolution=64, device="cpu")
    with pytest.raises(ValueError, match="ns"):
        run_sanity(seg, ns=(0,), tasks=[])
    with pytest.raises(ValueError, match="ns"):
        run_sanity(seg, ns=(POOL + 1,), tasks=[])
    with pytest.raises(ValueError, match="unknown sanity task"):
        sanity._example("nope", 0, 32)


def test_png_grid(tmp_path, tasks):
    seg = Segmenter(IntensityMatcher(), resolution=64, device="cpu")
    chosen = tasks[:2]
    result = run_sanity(seg, ns=(2,), ensembles=(), tasks=chosen)
    out = sanity_png(tmp_path / "grid.png", result, chosen)
    assert out.stat().st_size > 1000
    assert np.array(__import__("PIL.Image").Image.open(out)).ndim == 3


def test_flips_reach_every_prediction_plain_ensemble_and_members(tasks):
    seg = Segmenter(LeftHalf(), resolution=64, device="cpu")
    chosen = [t for t in tasks if t.name == "bright_disc"]
    plain = run_sanity(seg, ns=(1,), ensembles=(4,), tasks=chosen)
    flipped = run_sanity(seg, ns=(1,), ensembles=(4,), tasks=chosen, flips=True)
    one, ens = ("bright_disc", 1, 1), ("bright_disc", 1, 4)
    assert plain.dice[one] > 0 and plain.dice[ens] > 0 and plain.confident[ens] == QUERIES
    assert flipped.dice[one] == 0 and flipped.dice[ens] == 0 and flipped.confident[ens] == 0
    assert not flipped.predictions[one].any()
    assert flipped.flips and "Flip TTA" in flipped.markdown()
    assert not plain.flips and "Flip TTA" not in plain.markdown()
