"""Output into a pipe whose reader stopped (``| head``) ends quietly, and show-episodes on a
corpus too small for the asked support names --support in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A corpus of one 2D dataset with 4 subjects: tasks of a few train examples."""
    from fixtures_data import write_folder2d

    from data_prep.pipeline import build_corpus, job_from_spec
    from data_prep.specs.adhoc import spec_from_path

    tmp = tmp_path_factory.mktemp("small_corpus")
    raw = write_folder2d(tmp / "raw", n_cases=4)
    summary = build_corpus([job_from_spec(spec_from_path(raw), raw)], tmp / "corpus",
                           resolutions=(32,), progress=False)  # fmt: skip
    assert summary.ok, summary.text()
    return tmp / "corpus"


def _into_a_closed_pipe(args: list[str]) -> subprocess.CompletedProcess:
    """Run ``python args`` with its stdout a pipe whose reader has already gone."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        return subprocess.run([sys.executable, *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=env, cwd=REPO)  # fmt: skip
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "megaseg.cli", "--help"],
        ["-m", "megaseg.cli", "evaluate", "--help"],
        ["-m", "megaseg.cli", "fit", "--help"],
        ["-m", "megaseg.cli", "prep", "--help"],
    ],
)
def test_help_into_a_closed_pipe_has_no_traceback(args):
    proc = _into_a_closed_pipe(args)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 141)  # argparse itself ignores a failed write of its help


def test_prep_info_into_a_closed_pipe_has_no_traceback(small_corpus):
    proc = _into_a_closed_pipe(["-m", "megaseg.cli", "prep", "info", str(small_corpus)])
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
    # into a pipe that is read, the same command still works
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "megaseg.cli", "prep", "info", str(small_corpus)],
                        capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert ok.returncode == 0 and ok.stdout


def test_show_episodes_on_a_small_corpus_names_support_in_one_line(small_corpus, tmp_path, capsys):
    from megaseg.cli import main

    code = main(["show-episodes", "--corpus", str(small_corpus), "--support", "50",
                 "--out", str(tmp_path / "e.png")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert "no task has 51 examples in split 'train' (a query and --support 50)" in err
    largest = int(err.rsplit("the largest has ", 1)[1].split(":")[0])
    assert f"pass --support {largest - 1} or less" in err
    assert main(["show-episodes", "--corpus", str(small_corpus), "--support", str(largest - 1),
                 "--episodes", "1", "--size", "32", "--out", str(tmp_path / "e.png")]) == 0  # fmt: skip


def _help_of(argv: list[str], capsys) -> str:
    from megaseg.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["prep", "build"], ["square sizes every slice is stored at", "(default: [64, 128, 256])",
                             "seed of the subject splits (default: 0)", "(default 1; not with"]),
        (["prep", "synth"], ["synthetic tasks to write (default: 1000)", "(default: [128])",
                             "processes writing tasks in parallel (default: 1)"]),
        (["prep", "verify"], ["reported as a possible leak (default: 0.98)"]),
        (["demo"], ["slicing plane of the support and query slices (default axial)"]),
        (["evaluate"], ["--checkpoint CHECKPOINT"]),
    ],
)  # fmt: skip
def test_help_describes_every_option_with_its_default(argv, expected, capsys):
    text = " ".join(_help_of(argv, capsys).split())
    for words in expected:
        assert words in text, words
    assert "(default: None)" not in text  # e.g. a required option, or one whose help says it


def test_every_prep_and_demo_option_has_a_description():
    import argparse

    from megaseg.cli.demo import _parser
    from megaseg.cli.prep import parser

    subs = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = [_parser(), *(p for name, p in subs.choices.items() if name != "synth")]
    missing = [(p.prog, a.dest) for p in parsers for a in p._actions if not a.help]
    assert missing == []
