"""Checkpoint I/O: safetensors + JSON card, raw state dicts, and refusal of pickled objects."""

from __future__ import annotations

import json

import pytest
import torch

from megaseg import create_model, load_checkpoint, save_checkpoint
from megaseg.checkpoint import card_path, load_state_dict_file

TINY = {"encoder_widths": [8, 8, 8, 8]}
CARD = {"model": {"name": "universeg_v1", "kwargs": TINY}, "resolution": 32}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("universeg_v1", **TINY)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_and_card_round_trip(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", model, CARD)
    assert card_path(path).is_file()
    loaded, card = load_checkpoint(path)
    assert _same_weights(loaded, model)
    assert card["resolution"] == 32 and card["format_version"] == 1
    assert card["model"] == {"name": "universeg_v1", "kwargs": TINY}


def test_save_leaves_no_temporary_files(model, tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", model, CARD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_save_refuses_other_suffixes(model, tmp_path):
    with pytest.raises(ValueError, match=r"written as \.safetensors"):
        save_checkpoint(tmp_path / "m.pt", model, CARD)


def test_raw_state_dict_is_accepted(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    loaded, _ = load_checkpoint(tmp_path / "raw.pt", model=create_model("universeg_v1", **TINY))
    assert _same_weights(loaded, model)


def test_lightning_style_state_dict_wrapper_is_accepted(model, tmp_path):
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    state, card = load_state_dict_file(tmp_path / "wrapped.pt")
    assert card is None and state.keys() == model.state_dict().keys()


class _Payload:
    """A custom class: unpickling it could run arbitrary code."""


def test_pickled_custom_object_is_refused(tmp_path):
    torch.save({"weights": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: refused, the file holds pickled objects"):
        load_state_dict_file(tmp_path / "evil.pt")


def test_non_tensor_content_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"expected a dict of tensors"):
        load_state_dict_file(tmp_path / "list.pt")


def test_corrupt_safetensors_is_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        load_state_dict_file(tmp_path / "bad.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint file"):
        load_state_dict_file(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_model(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", model, CARD)
    card_path(path).write_text(json.dumps({"model": {"name": "universeg_v1", "kwargs": {}}}))
    with pytest.raises(ValueError, match=r"weights do not fit the model"):
        load_checkpoint(path)
