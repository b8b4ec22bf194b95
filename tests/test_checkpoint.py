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


# ---------------------------------------------------------------------- card vs weights checks

CHECKS_SCRIPT = """
import resource, sys
# Address-space cap: 14 GB (a 20000-feature v1) could not even be reserved.
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
from megaseg.checkpoint import CheckpointError, load_checkpoint
try:
    load_checkpoint(sys.argv[1])
except CheckpointError as e:
    print("REFUSED", e)
"""


def _write_card(path, card) -> None:
    card_path(path).write_text(card if isinstance(card, str) else json.dumps(card))


@pytest.mark.parametrize("width", [20000, 100000])
def test_card_asking_for_huge_widths_fails_fast(model, tmp_path, width):
    import time

    from megaseg.checkpoint import CheckpointError

    path = save_checkpoint(tmp_path / "m.safetensors", model, CARD)
    _write_card(
        path, {"model": {"name": "universeg_v1", "kwargs": {"encoder_widths": [width] * 4}}}
    )
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"weights do not fit the model") as err:
        load_checkpoint(path)
    # Typically ~0.05 s (the model is built on the meta device); the bound leaves room for a
    # busy machine. Building it for real would take minutes and 14 (20000) to 360 GB (100000).
    assert time.perf_counter() - start < 5.0
    assert str(path) in str(err.value) and f"model ({width}," in str(err.value)


def test_huge_card_is_refused_under_a_memory_cap(model, tmp_path):
    import subprocess
    import sys

    path = save_checkpoint(tmp_path / "m.safetensors", model, CARD)
    _write_card(
        path, {"model": {"name": "universeg_v1", "kwargs": {"encoder_widths": [20000] * 4}}}
    )
    out = subprocess.run(
        [sys.executable, "-c", CHECKS_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("REFUSED"), out.stdout
    assert str(path) in out.stdout and "model (20000," in out.stdout


@pytest.mark.parametrize(
    ("card", "reason"),
    [
        ({"model": None}, r"'model' must be an object"),
        ({"model": {"name": "universeg_v1", "kwargs": "wide"}}, r"model\.kwargs must be an object"),
        ({"model": {"name": 3}}, r"model\.name must be a string"),
        ({"model": {"name": "nope"}}, r"cannot build model 'nope'.*unknown model"),
        (
            {"model": {"name": "universeg_v1", "kwargs": {"encoder_widths": [-8, 8, 8, 8]}}},
            r"cannot build model 'universeg_v1'.*negative",
        ),
        (
            {"model": {"name": "universeg_v1", "kwargs": {"colour": True}}},
            r"cannot build model 'universeg_v1'.*colour",
        ),
        ({**CARD, "resolution": 2**20}, r"resolution must be an integer from 1 to 1024"),
        ({**CARD, "resolution": "big"}, r"resolution must be an integer"),
        ({"model": CARD["model"], "preprocessing": {"size": -4}}, r"resolution must be an integer"),
        ("{not json", r"the checkpoint card is not valid JSON"),
        ("[1, 2]", r"the checkpoint card must be a JSON object, got list"),
    ],
)
def test_bad_card_is_one_clear_error_naming_the_card(model, tmp_path, card, reason):
    from megaseg.checkpoint import CheckpointError

    path = save_checkpoint(tmp_path / "m.safetensors", model, CARD)
    _write_card(path, card)
    with pytest.raises(CheckpointError, match=reason) as err:
        load_checkpoint(path)
    assert str(card_path(path)) in str(err.value)


def test_header_claiming_more_data_than_the_file_holds_is_refused(tmp_path):
    import struct

    from megaseg.checkpoint import CheckpointError

    # A safetensors header declaring a 100000x3x3x3 float tensor, followed by 8 bytes.
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [100000, 3, 3, 3], "data_offsets": [0, 100000 * 27 * 4]}}
    ).encode()
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"crafted\.safetensors: not a readable safetensors"):
        load_checkpoint(path)


def test_shape_check_reads_the_header_only(model, tmp_path, monkeypatch):
    import megaseg.checkpoint as ckpt

    path = save_checkpoint(tmp_path / "m.safetensors", model, CARD)
    _write_card(path, {"model": {"name": "universeg_v1", "kwargs": {"encoder_widths": [9] * 4}}})

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("tensors were read before the card was checked")

    monkeypatch.setattr(ckpt, "load_file", no_tensor_reads)
    with pytest.raises(ckpt.CheckpointError, match=r"shape: .*file \(8,\), model \(9,\)"):
        load_checkpoint(path)


def test_nonfinite_weights_are_refused_naming_file_and_tensors(model, tmp_path):
    from megaseg.checkpoint import CheckpointError

    with torch.no_grad():
        model.out_conv.conv.weight.fill_(float("nan"))
        model.enc_blocks[0].cross.cross_conv.bias[0] = float("inf")
    path = save_checkpoint(tmp_path / "nan.safetensors", model, CARD)
    with pytest.raises(
        CheckpointError, match=r"nan\.safetensors: 2 tensor\(s\) hold NaN or inf"
    ) as e:
        load_checkpoint(path)
    assert "out_conv.conv.weight (8 of 8)" in str(e.value)
    assert "enc_blocks.0.cross.cross_conv.bias (1 of 8)" in str(e.value)
    assert "allow_nonfinite=True" in str(e.value)
    with pytest.warns(UserWarning, match=r"hold NaN or inf .*allow_nonfinite=True"):
        loaded, _ = load_checkpoint(path, allow_nonfinite=True)
    assert torch.isnan(loaded.out_conv.conv.weight).all()


def test_nonfinite_raw_state_dict_is_refused_too(model, tmp_path):
    from megaseg.checkpoint import CheckpointError

    state = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan\.pt: 44 tensor\(s\) hold NaN"):
        load_checkpoint(tmp_path / "nan.pt", model=create_model("universeg_v1", **TINY))


INFLATE_SCRIPT = """
import resource, sys
from megaseg.checkpoint import CheckpointError, load_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_checkpoint(sys.argv[1])
except CheckpointError as e:
    print("REFUSED", e)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""

FORGE_SCRIPT = """
import io, sys, zipfile, torch
# v1's first weight name, with a shape v1 does not have: 256 MB of zeros, ~250 KB deflated
buf = io.BytesIO()
torch.save({"enc_blocks.0.cross.cross_conv.weight": torch.zeros(64 * 2**20)}, buf)
with zipfile.ZipFile(buf) as src, zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        dst.writestr(info.filename, src.read(info.filename))
"""


def test_a_deflated_torch_file_is_refused_before_it_inflates(tmp_path):
    """The file is ~250 KB; loading its tensor would allocate 256 MB. Its shapes are read on
    the meta device and refused first, so the load's peak memory stays far below that."""
    import subprocess
    import sys

    path = tmp_path / "forged.pt"
    subprocess.run([sys.executable, "-c", FORGE_SCRIPT, str(path)], check=True, timeout=120)
    assert path.stat().st_size < 2**20
    run = subprocess.run([sys.executable, "-c", INFLATE_SCRIPT, str(path)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert "REFUSED" in run.stdout and "weights do not fit the model" in run.stdout, run.stderr
    growth_mb = int(run.stdout.split("GROWTH_KB")[1]) / 1024
    assert growth_mb < 64, f"the load grew the peak memory by {growth_mb:.0f} MB"
