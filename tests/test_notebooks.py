"""The notebooks in notebooks/ run top to bottom (so they cannot rot), on a CPU, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("nilearn")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["few_shot_inference.ipynb", "evaluate.ipynb"])
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    """Executed in ``tmp_path`` (the kernel's working folder, its outputs and the executed copy),
    so nothing lands in notebooks/."""
    before = sorted(NOTEBOOKS.rglob("*"))
    monkeypatch.setenv("MEGASEG_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MEGASEG_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("MEGASEG_TRAIN_SECONDS", "8")  # the synthetic fallback, when it is needed
    monkeypatch.delenv("MEGASEG_CHECKPOINT", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the test processes (see conftest.py)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{name} is committed with outputs; clear them"
    )
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()  # raises CellExecutionError, with the failing cell, on any error
    finally:
        nbformat.write(nb, tmp_path / name)  # the executed copy, to look at
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs
        if "image/png" in o.get("data", {})
    ]  # fmt: skip
    assert images, f"{name} displayed no figure"
    assert any((tmp_path / "out").iterdir())
    assert sorted(NOTEBOOKS.rglob("*")) == before, "the notebook wrote into notebooks/"
