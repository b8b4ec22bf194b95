"""One definition per meaning (issue #25 item 4): the Dice with its stated empty-mask rule, the
label-map dtype, the overlay drawing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaseg.metrics import batch_dice, mask_dice
from megaseg.overlay import overlay_rgb


def _masks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1, H, W)`` bool prediction and truth, with the four empty / non-empty cases."""
    g = torch.Generator().manual_seed(seed)
    pred, truth = (
        torch.rand(6, 1, 12, 12, generator=g) > 0.6,
        torch.rand(6, 1, 12, 12, generator=g) > 0.5,
    )
    pred[0], truth[0] = False, False  # both empty
    pred[1] = False  # nothing found
    truth[2] = False  # nothing to find
    return pred, truth


def test_the_empty_mask_rule_is_stated_once_and_a_caller_can_choose_another():
    empty = np.zeros((4, 4), bool)
    some = np.eye(4, dtype=bool)
    assert mask_dice(empty, empty) == 1.0 and mask_dice(empty, empty, empty=0.0) == 0.0
    assert mask_dice(some, empty) == 0.0 == mask_dice(empty, some)
    assert mask_dice(some, some) == 1.0 and mask_dice(some, np.ones((4, 4))) == pytest.approx(0.4)
    pred, truth = _masks()
    scores = batch_dice(pred, truth)
    assert scores[0] == 1.0 and scores[1] == 0.0 and scores[2] == 0.0
    assert batch_dice(pred, truth, empty=float("nan"))[0].isnan()
    for b in range(len(pred)):  # the numpy and tensor forms agree
        assert scores[b].item() == pytest.approx(mask_dice(pred[b].numpy(), truth[b].numpy()))


def test_the_training_and_evaluation_dice_are_monais_numbers():
    """Where MONAI's compute_dice was used (training metrics: ignore_empty=False; evaluation:
    truth never empty), the one Dice gives the same values, bit for bit."""
    from monai.metrics import compute_dice

    from megaseg.evaluation.protocol import dice
    from megaseg.training.module import episode_metrics

    pred, truth = _masks(1)
    monai = compute_dice(pred.float(), truth.float(), include_background=True,
                         ignore_empty=False)[:, 0]  # fmt: skip
    logits = torch.where(pred, 2.0, -2.0)
    assert torch.equal(episode_metrics(logits, truth.float())[0], monai)
    keep = truth.flatten(1).any(1)
    probs = torch.where(pred, 0.9, 0.1)
    expected = compute_dice(pred.float()[keep], truth.float()[keep], include_background=True)
    assert torch.equal(dice(probs[keep], truth[keep]), expected[:, 0].double())


def test_label_maps_have_one_dtype_rule():
    from megaseg import annotate, inference

    assert annotate._label_dtype is inference._label_dtype
    cases = {(): "uint8", (1, 2): "uint8", (255,): "uint8", (256,): "int16", (-1, 3): "int16",
             (40000,): "int32", (-40000,): "int32", (2**31,): "int64"}  # fmt: skip
    for values, dtype in cases.items():
        assert inference._label_dtype(values) == np.dtype(dtype), values


def test_the_overlay_blends_each_mask_over_the_grey_image():
    image = np.array([[0.0, 0.5], [1.0, 2.0]])
    mask = np.array([[1.0, 0.5], [0.0, 1.0]])
    out = overlay_rgb(image, [(mask, (1.0, 0.0, 0.0))], alpha=0.5)
    assert out.shape == (2, 2, 3) and out.min() >= 0 and out.max() <= 1
    assert np.allclose(out[0, 0], [0.5, 0.0, 0.0])  # half red over black
    assert np.allclose(out[0, 1], [0.625, 0.375, 0.375])  # a soft mask: a quarter red
    assert np.allclose(out[1, 0], [1.0, 1.0, 1.0])  # no mask: the grey value
    assert np.allclose(out[1, 1], [1.0, 0.5, 0.5])  # the image clipped to the window first
    grey = overlay_rgb(np.array([[10.0, 30.0]]), window=(10.0, 30.0))
    assert np.allclose(grey[0, :, 0], [0.0, 1.0])


def test_show_episodes_draws_with_the_one_overlay():
    from megaseg.cli.show_episodes import overlay

    g = torch.Generator().manual_seed(0)
    image, label = torch.rand(8, 8, generator=g), torch.rand(8, 8, generator=g)
    old = (1 - 0.5 * label[..., None].numpy()) * image[..., None].numpy().repeat(3, -1) + (
        0.5 * label[..., None].numpy() * np.array([1.0, 0.15, 0.1])
    )  # the formula show-episodes drew with before
    assert np.allclose(overlay(image, label), old, atol=1e-6)


def test_output_names_have_one_slug(tmp_path):
    from megaseg.evaluation.report import plot_dice_vs_n
    from megaseg.paths import slug

    assert slug("WBC / CV 2") == "WBC_CV_2" and slug("a.b-c_d") == "a.b-c_d"
    assert len(slug("x" * 300)) == 80 and len(slug("x" * 300, max_len=200)) == 200
    row = {"dataset": "my data/set", "method": "megaseg", "N": 1, "dice": 0.5, "ci_low": 0.4,
           "ci_high": 0.6, "within_subject": False, "overlap": False}  # fmt: skip
    (path,) = [p for p in plot_dice_vs_n([row], tmp_path) if "my" in p.name]
    assert path.name == f"dice_vs_n_{slug('my data/set')}.png" and path.is_file()
