"""The card's preprocessing is fields the code reads (issue #25): export writes modality,
window, resolution and normalization; the Segmenter (and VolumeSession through it) windows
images by them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megaseg.checkpoint import CheckpointError, read_card, save_checkpoint
from megaseg.inference import Segmenter
from megaseg.models import create_model
from megaseg.preprocess import CT_WINDOW, MR_PERCENTILES, card_fields

REPO = Path(__file__).resolve().parents[1]
TINY = {"encoder_widths": [8, 8, 8, 8]}
RES = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("universeg_v1", **TINY)


def _hu_image(seed: int = 0) -> np.ndarray:
    """A CT-like slice in Hounsfield units: air, soft tissue and bone."""
    rng = np.random.default_rng(seed)
    img = np.full((40, 40), -1000.0)
    img[8:32, 8:32] = 40 + 30 * rng.standard_normal((24, 24))
    img[16:22, 16:22] = 900.0
    return img


def _support_input(model, card: dict | None, **support_kwargs) -> torch.Tensor:
    """The support images the network is given for one raw HU image, under ``card``."""
    seg = Segmenter(model, RES, "cpu", card=card)
    label = np.zeros((40, 40), np.uint8)
    label[16:22, 16:22] = 1
    seg.set_support([_hu_image()], [label], **support_kwargs)
    return seg._support.images


def test_export_writes_the_fields_the_segmenter_reads():
    from megaseg.training import InContextSegModule, build_card

    card = build_card(InContextSegModule("universeg_v1", TINY, resolution=RES, support_size=3))
    pre = card["preprocessing"]
    assert pre["resolution"] == RES and pre["modality"] is None and pre["window"] is None
    assert pre["normalization"]["ct_window"] == list(CT_WINDOW)
    assert pre["normalization"]["mr_percentiles"] == list(MR_PERCENTILES)
    assert pre["normalization"]["range"] == [0.0, 1.0]
    json.dumps(card)  # a JSON card
    seg = Segmenter(create_model("universeg_v1", **TINY), RES, "cpu", card=card)
    assert seg.ct_window == CT_WINDOW and seg.default_modality is None


def test_a_cards_modality_and_window_change_what_the_model_sees(model):
    """The same raw HU image: a card that says CT with a soft-tissue window gives the network
    a different input than a card without them (min-max) -- and the same as passing them."""
    plain = _support_input(model, {"preprocessing": card_fields(RES)}, modality="other")
    ct_card = {"preprocessing": card_fields(RES, modality="CT", window=(-100.0, 200.0))}
    by_card = _support_input(model, ct_card)
    assert not torch.allclose(plain, by_card, atol=0.05)
    explicit = _support_input(model, None, modality="CT", window=(-100.0, 200.0))
    assert torch.equal(by_card, explicit)
    # soft tissue (40 HU) sits mid-window under the card, near the bottom under min-max
    centre = by_card[0, 0, 12, 12].item()
    assert 0.3 < centre < 0.7 and plain[0, 0, 12, 12].item() < 0.6


def test_the_cards_ct_window_is_the_window_of_ct_images(model):
    default = _support_input(model, {"preprocessing": card_fields(RES)}, modality="CT")
    wide_card = {"preprocessing": card_fields(RES)}
    wide_card["preprocessing"]["normalization"]["ct_window"] = [-1000.0, 2000.0]
    wide = _support_input(model, wide_card, modality="CT")
    assert not torch.allclose(default, wide, atol=0.05)
    assert torch.equal(default, _support_input(model, None, modality="CT"))  # no card: CT_WINDOW
    # HU-like values without a modality: guessed as CT (a warning), then the card's CT window
    with pytest.warns(UserWarning, match="look like CT Hounsfield units"):
        guessed = _support_input(model, wide_card)
    assert torch.equal(guessed, wide)


def test_volume_sessions_window_through_the_same_path(model):
    from megaseg.annotate import VolumeSession

    volume = np.stack([_hu_image(i) for i in range(6)], axis=-1)  # (X, Y, Z) in HU
    card = {"preprocessing": card_fields(RES, modality="CT", window=(-100.0, 200.0))}
    session = VolumeSession(Segmenter(model, RES, "cpu", card=card), volume)
    assert (session.modality, session.window) == ("CT", (-100.0, 200.0))
    expected = np.clip((volume[..., 2] + 100.0) / 300.0, 0, 1)
    assert np.allclose(session.image(2), expected, atol=1e-6)


def test_a_card_asking_for_preprocessing_this_code_does_not_do_is_refused(model, tmp_path):
    for key, value, match in [
        ("mr_percentiles", [1.0, 99.0], r"normalization.mr_percentiles is \[1.0, 99.0\]"),
        ("range", [-1.0, 1.0], r"normalization.range"),
        ("ct_window", [300, 100], r"normalization.ct_window must be \[low, high\]"),
    ]:
        card = {
            "model": {"name": "universeg_v1", "kwargs": TINY},
            "preprocessing": card_fields(RES),
        }
        card["preprocessing"]["normalization"][key] = value
        path = save_checkpoint(tmp_path / f"{key}.safetensors", model, card)
        with pytest.raises(CheckpointError, match=match) as err:
            Segmenter.from_checkpoint(path, "cpu")
        assert str(path.with_suffix(".json")) in str(err.value)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "checkpoints").glob("*.json")))
def test_shipped_cards_carry_the_fields(name):
    """The shipped checkpoints' cards hold the machine-read fields (their weights unchanged:
    the sha256 pins of tests/test_readme_timings.py and checkpoints/README.md)."""
    card = read_card(REPO / "checkpoints" / f"{name}.safetensors")
    pre = card["preprocessing"]
    fields = card_fields(card["resolution"])
    assert {k: pre[k] for k in fields} == fields


def test_the_official_weights_card_carries_the_fields():
    """The card megaseg writes for the official UniverSeg weights reads back like an export's."""
    from megaseg.checkpoint import card_preprocessing
    from megaseg.hub import OFFICIAL_RESOLUTION, official_card

    card = official_card("weights.pt")
    assert card["preprocessing"] == card_fields(OFFICIAL_RESOLUTION)
    assert card_preprocessing(card, "weights.pt") == card["preprocessing"]
