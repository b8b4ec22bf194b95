"""How a fit starts and stops as a job scheduler drives it: ``--ckpt_path last`` before any
checkpoint exists, SIGTERM at a time limit (a checkpoint is saved, no traceback), and a
kill -9 (the data-loader workers die with the fit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaseg.cli import main as megaseg_main

REPO = Path(__file__).resolve().parents[1]
CI_TINY = str(REPO / "configs" / "ci_tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}  # fmt: skip


def fit_args(root: Path, steps: int, *more: str) -> list[str]:
    return ["fit", "--config", CI_TINY, "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--data.batch_size", "2", "--data.resolution", "32",
            "--model.model_kwargs", '{"encoder_widths": [8, 8, 8, 8]}', *more]  # fmt: skip


def test_ckpt_path_last_without_a_checkpoint_says_it_starts_a_new_run(tmp_path, capsys):
    root = tmp_path / "root"
    assert megaseg_main(fit_args(root, 2, "--ckpt_path", "last")) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    folder = os.path.realpath(root / "checkpoints")
    said = f"--ckpt_path last: no checkpoint in {folder} yet; starting a new run from step 0"
    assert said in text, text
    assert "save_last" not in text  # Lightning's hint, wrong for a config that sets it
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2


def test_validate_with_ckpt_path_last_and_no_checkpoint_is_refused(tmp_path, capsys):
    args = fit_args(tmp_path / "root", 2, "--ckpt_path", "last")
    assert megaseg_main(["validate", *args[1:]]) == 2
    err = capsys.readouterr().err
    assert "megaseg validate: --ckpt_path last: no checkpoint in" in err
    assert "Traceback" not in err


def _start_fit(root: Path, *more: str) -> subprocess.Popen:
    """A long fit in its own process group (as a scheduler's job), with the marker callback."""
    marker = root.parent / "marker.yaml"
    marker.write_text("trainer:\n  callbacks:\n"
                      "    - class_path: training_marker.MarkTraining\n"
                      "    - class_path: pytorch_lightning.callbacks.ModelCheckpoint\n"
                      "      init_args: {save_last: true, save_top_k: 0, every_n_train_steps: 100000}\n")  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "megaseg.cli", *fit_args(root, 100000, "--config", str(marker),
                                                        *more)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _wait_training(proc: subprocess.Popen, root: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (root / "training").exists():
        if proc.poll() is not None:
            pytest.fail(f"the fit ended before training: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the fit did not start training in time")
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.slow
def test_sigterm_saves_a_last_checkpoint_and_exits_with_a_message(tmp_path):
    """SIGTERM to the whole process group, as a scheduler's time limit sends it (the data-loader
    worker gets it too). Slow: a fit in a subprocess (~20 s)."""
    root = tmp_path / "root"
    proc = _start_fit(root, "--data.num_workers", "1")
    _wait_training(proc, root)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    assert f"megaseg fit: stopped by SIGTERM; saved {last}" in err
    assert "--ckpt_path last" in err
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] >= 1


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_data_loader_workers_die_with_a_killed_fit(tmp_path):
    """kill -9 of the fit: its worker is gone within 2 s. Slow: a fit in a subprocess."""
    root = tmp_path / "root"
    proc = _start_fit(root, "--data.num_workers", "1")
    try:
        _wait_training(proc, root)
        workers = _children(proc.pid)
        assert workers, "the fit has no data-loader worker"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(2)
        assert [w for w in workers if _alive(w)] == []
    finally:
        proc.stdout.close()
        proc.stderr.close()
        for w in _children(proc.pid) if proc.poll() is None else []:
            os.kill(w, signal.SIGKILL)


def test_the_progress_bar_counts_steps_and_is_throttled_in_a_log(tmp_path, capsys):
    args = fit_args(tmp_path / "root", 40, "--trainer.enable_progress_bar", "true")
    assert megaseg_main(args) == 0
    out = capsys.readouterr()  # captured: not a terminal, as a job's log file
    err = out.out + out.err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("steps:")]
    assert "Epoch" not in err and "/-2" not in err
    assert any("40/40" in line for line in lines)
    assert len(lines) <= 30, len(lines)  # one redraw every 5% of the run, not one per step
