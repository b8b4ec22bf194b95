"""The README's timings come from ``benchmarks/readme_timings.py``: its record must be of the
default checkpoint megaseg ships now, and the README must quote the record's numbers."""

from __future__ import annotations

import json
from pathlib import Path

from megaseg.models.registry import DEFAULT_SHIPPED, pretrained_path, shipped_weights
from megaseg.paths import sha256_file

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "docs" / "results" / "readme_timings.json"


def test_the_timings_were_measured_with_the_default_checkpoint():
    record = json.loads(RECORD.read_text())
    assert record["checkpoint"] == DEFAULT_SHIPPED
    current = sha256_file(pretrained_path(*shipped_weights()[DEFAULT_SHIPPED]))
    assert record["checkpoint_sha256"] == current, (
        "the default checkpoint changed since benchmarks/readme_timings.py measured the "
        "README's timings: rerun it and update the README"
    )


def test_the_readme_quotes_the_measured_timings():
    record = json.loads(RECORD.read_text())
    readme = " ".join((REPO / "README.md").read_text().split())
    session = record["volume_session"]
    assert f"{session['first_s']:.1f} s for the first `segment()`" in readme
    assert f"{session['after_add_s']:.1f} s for `add()` + `segment()`" in readme
    for name, seconds in record["notebooks_s"].items():
        assert f"{Path(name).stem} {seconds:.0f} s" in readme, name
    assert "benchmarks/readme_timings.py" in readme
