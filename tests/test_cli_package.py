"""The commands live in one package, megaseg/cli/ (issue #25): one module per command behind
the lazy dispatcher; the old import paths still work for one release, with a warning."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaseg import cli

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(REPO)}

# old import path -> (new module, a name that moved with it)
MOVED = {
    "data_prep.__main__": ("megaseg.cli.prep", "resolve_dataset"),
    "megaseg.evaluate_cli": ("megaseg.cli.evaluate", "parser"),
    "megaseg.show_episodes": ("megaseg.cli.show_episodes", "render"),
    "megaseg.training.cli": ("megaseg.cli.train", "lightning_main"),
    "megaseg.demo": ("megaseg.training.fallback", "train_synthetic_model"),
}


def test_every_command_is_a_module_of_the_cli_package():
    from megaseg.cli.prep import EXTERNAL

    targets = [t for t, _ in cli.SUBCOMMANDS.values()] + [t for t, _ in EXTERNAL.values()]
    assert {t.split(":")[0] for t in targets} == {
        "megaseg.cli.prep", "megaseg.cli.evaluate", "megaseg.cli.demo",
        "megaseg.cli.show_episodes", "megaseg.cli.prep_synth", "megaseg.cli.prep_fetch",
    }  # fmt: skip
    files = {p.stem for p in (REPO / "megaseg" / "cli").glob("*.py")}
    assert {t.split(":")[0].rpartition(".")[2] for t in targets} | {"train"} <= files


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_import_path_warns_and_gives_the_same_object(old):
    new, name = MOVED[old]
    with pytest.warns(DeprecationWarning, match=f"{name} moved to {new}.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_the_new_homes_import_without_a_deprecation_warning():
    modules = ["megaseg.cli", "megaseg.cli.prep", "megaseg.cli.prep_synth", "megaseg.cli.prep_fetch",
               "megaseg.cli.evaluate", "megaseg.cli.demo", "megaseg.cli.show_episodes",
               "megaseg.demo", "megaseg.cpu"]  # fmt: skip
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_no_module_of_the_package_imports_an_old_path():
    """megaseg and data_prep import the commands from their new homes (the aliases are for
    users' code)."""
    old_modules = set(MOVED) - {"megaseg.demo"}  # megaseg.demo stays: only two names left it
    found = []
    for package in ("megaseg", "data_prep"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    hits = [a.name for a in node.names if a.name in old_modules]
                elif isinstance(node, ast.ImportFrom) and node.module == "megaseg.demo":
                    hits = [
                        a.name for a in node.names if a.name in ("main", "train_synthetic_model")
                    ]
                elif isinstance(node, ast.ImportFrom):
                    hits = [node.module] if node.module in old_modules else []
                else:
                    continue
                found += [f"{path.relative_to(REPO)}:{node.lineno} {h}" for h in hits]
    assert not found


@pytest.mark.parametrize(
    "argv", [["prep"], ["prep", "synth"], ["prep", "fetch"], ["evaluate"], ["show-episodes"]]
)
def test_command_help_does_not_import_torch(argv):
    code = (
        "import sys\nfrom megaseg.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
        "except SystemExit as e:\n    code = e.code\nassert code == 0, code\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv, "--help"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"usage: megaseg {' '.join(argv)}" in proc.stdout


@pytest.mark.parametrize("module", ["data_prep", "megaseg.cli"])
def test_python_dash_m_forms_still_run(module, tmp_path):
    """``python -m data_prep`` and ``python -m megaseg.cli``, as scripts and tests run them,
    from any folder (the fit help then finds the checkout's configs/)."""
    args = ["prep", "--help"] if module == "megaseg.cli" else ["--help"]
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "usage: megaseg prep" in proc.stdout
    if module == "megaseg.cli":
        proc = subprocess.run([sys.executable, "-m", module, "fit", "--help"], cwd=tmp_path,
                              env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "ci_tiny.yaml" in proc.stdout


def test_cores_are_counted_in_one_place(monkeypatch):
    """The fit's thread plan and the demo's idle-core threads use one core count."""
    import torch

    from megaseg import cpu
    from megaseg.training import threads

    assert threads.available_cores is cpu.available_cores
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "available_cores", lambda: 1)
    torch.set_num_threads(2)
    try:
        with cpu.idle_threads() as n:
            assert n == 1 == torch.get_num_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_no_library_module_imports_a_command():
    """Commands import the library, never the other way round (the old entry-point modules,
    now aliases that run or serve a command, are the exception)."""
    aliases = {REPO / f"{m.replace('.', '/')}.py" for m in MOVED if m != "megaseg.demo"}
    found = []
    for package in ("megaseg", "data_prep"):
        for path in (REPO / package).rglob("*.py"):
            if (REPO / "megaseg" / "cli") in path.parents or path in aliases:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                )  # fmt: skip
                found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                          if n == "megaseg.cli" or n.startswith("megaseg.cli.")]  # fmt: skip
    assert not found
