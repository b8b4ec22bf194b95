"""Where a clone is used from: the notebooks' default output folder is the checkout's
megaseg_work/ whatever the working folder, and `import megaseg` from the folder that holds the
clone finds the package (not the clone as an empty namespace package) when the checkout is on
sys.path, as `pip install -e . --config-settings editable_mode=compat` (the README's) puts it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megaseg.paths import checkout_work_dir

REPO = Path(__file__).resolve().parents[1]


def test_notebook_outputs_go_to_the_checkouts_work_folder_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGASEG_WORK", raising=False)
    monkeypatch.chdir(tmp_path)  # e.g. notebooks/, where a kernel runs
    assert checkout_work_dir("notebooks") == REPO / "megaseg_work" / "notebooks"
    monkeypatch.setenv("MEGASEG_WORK", str(tmp_path / "w"))
    assert checkout_work_dir("notebooks") == tmp_path / "w" / "notebooks"


def test_import_from_the_folder_holding_the_clone_finds_the_package(tmp_path):
    (tmp_path / "megaseg").symlink_to(REPO)  # ~/megaseg, the clone, seen from ~
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # what the compat-mode .pth file adds
    out = subprocess.run([sys.executable, "-c", "import megaseg; print(megaseg.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(os.path.join("megaseg", "__init__.py")), out.stdout


def test_readme_installs_in_the_editable_mode_that_imports_from_any_folder():
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[dev]" --config-settings editable_mode=compat' in readme
