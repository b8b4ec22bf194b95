"""benchmarks/generalist_ablation.py: its result cache is tied to the weights it was made from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generalist_ablation.py"


@pytest.fixture
def ablation(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("generalist_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "EVAL_DIR", tmp_path / "ablation")
    return module


def test_a_cached_name_refuses_other_weights(ablation, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b")
    ablation.check_weights("arm", str(a))  # first use: records a's sha256
    record = json.loads((ablation.EVAL_DIR / "arm" / "weights.json").read_text())
    assert record["path"] == str(a) and len(record["sha256"]) == 64
    ablation.check_weights("arm", str(a))  # the same file again: fine
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(b"weights a")
    ablation.check_weights("arm", str(copy))  # same bytes elsewhere: fine
    with pytest.raises(SystemExit, match=r"arm was made from .*a\.safetensors.*Delete that folder"):
        ablation.check_weights("arm", str(b))

    legacy = ablation.EVAL_DIR / "old" / "eval"
    legacy.mkdir(parents=True)
    (legacy / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match="do not record their weights"):
        ablation.check_weights("old", str(a))
    with pytest.raises(SystemExit, match=r"new=.*missing\.safetensors: no such weights file"):
        ablation.check_weights("new", str(tmp_path / "missing.safetensors"))
    assert not (ablation.EVAL_DIR / "new").exists()  # nothing written for a bad argument
