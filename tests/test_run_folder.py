"""A run folder (``trainer.default_root_dir``) holds one fit; ``--ckpt_path last`` resumes that
fit's own checkpoint; a checkpoint save killed halfway leaves the previous complete file.

Fits are tiny (a 8-feature network at 32 px, a few ci_tiny steps). A fit that must be running
while another starts, or that must be killed, is a subprocess; the others run in-process.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from megaseg.cli import main as megaseg_main

REPO = Path(__file__).resolve().parents[1]
CI_TINY = str(REPO / "configs" / "ci_tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def fit_args(root: Path, steps: int, width: int = 8, *more: str) -> list[str]:
    return ["fit", "--config", CI_TINY, "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--data.batch_size", "2", "--data.resolution", "32",
            "--model.model_kwargs", f'{{"encoder_widths": [{width}, {width}, {width}, {width}]}}',
            *more]  # fmt: skip


def checkpoints_every(tmp_path: Path, steps: int, *callbacks: str) -> str:
    """A config layer: a ``ModelCheckpoint`` every ``steps`` steps (+ more callbacks)."""
    path = tmp_path / f"every{steps}.yaml"
    extra = "".join(f"\n    - class_path: {c}" for c in callbacks)
    path.write_text(f"""
trainer:
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{save_last: true, save_top_k: 0, every_n_train_steps: {steps}}}{extra}
""")
    return str(path)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step fit: ROOT with checkpoints/last.ckpt and export/final.safetensors."""
    root = tmp_path_factory.mktemp("run") / "root"
    assert megaseg_main(fit_args(root, 4)) == 0
    return root


class SecondFitAtStart(pl.Callback):
    """Starts ``megaseg fit`` into the same folder while this fit is training."""

    def __init__(self, root: str):
        self.root = root

    def on_train_start(self, trainer, pl_module) -> None:
        SECOND.append(megaseg_main(fit_args(Path(self.root), 4)))


SECOND: list[int] = []


def test_a_fit_is_refused_while_another_fit_trains_in_its_folder(tmp_path, capsys):
    """In one process for speed: the first fit's callback starts the second one."""
    root = tmp_path / "root"
    config = tmp_path / "second.yaml"
    config.write_text(f"""
trainer:
  callbacks:
    - class_path: test_run_folder.SecondFitAtStart
      init_args: {{root: {str(root)!r}}}
""")
    SECOND.clear()
    assert megaseg_main(fit_args(root, 2, 8, "--config", str(config))) == 0
    assert SECOND == [2]
    err = capsys.readouterr().err
    assert f"{root}: another megaseg fit is running in this folder (PID {os.getpid()}" in err


@pytest.mark.slow
def test_a_second_live_fit_into_the_same_folder_is_refused(tmp_path, capsys):
    """The same with a real fit in another process (slow: ~30-60 s on a busy 2-core CPU)."""
    root = tmp_path / "root"
    live = subprocess.Popen([sys.executable, "-m", "megaseg.cli", *fit_args(root, 100000)],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline and live.poll() is None:
            if list(root.glob("lightning_logs/version_*/config.yaml")):  # inside trainer.fit
                break
            time.sleep(0.1)
        assert live.poll() is None, live.stderr.read().decode()[-3000:]
        assert megaseg_main(fit_args(root, 4)) == 2
        err = capsys.readouterr().err
        assert f"{root}: another megaseg fit is running in this folder (PID {live.pid}" in err
        assert not (root / "export" / "final.safetensors").exists()  # nothing of the second run
    finally:
        live.kill()
        live.wait()


def test_a_new_fit_into_a_finished_runs_folder_is_refused(finished_run, capsys):
    final = finished_run / "export" / "final.safetensors"
    before = sha(final)
    assert megaseg_main(fit_args(finished_run, 4, 16)) == 2
    err = capsys.readouterr().err
    assert f"{finished_run}: holds the outputs of an earlier fit (checkpoints/last.ckpt" in err
    assert "--ckpt_path last" in err and "--trainer.default_root_dir" in err
    assert sha(final) == before
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_resuming_last_with_another_network_is_a_named_error(finished_run, capsys):
    """The run's last.ckpt holds an 8-feature network; the config asks for 16 features."""
    assert megaseg_main(fit_args(finished_run, 6, 16, "--ckpt_path", "last")) == 2
    err = capsys.readouterr().err
    ckpt = (finished_run / "checkpoints" / "last.ckpt").resolve()
    assert f"{ckpt}: a checkpoint of another network than this run's config builds" in err
    assert "shape: net." in err  # which tensors differ, not a size-mismatch traceback


def test_ckpt_path_last_never_picks_another_runs_last_checkpoint(finished_run, tmp_path, capsys):
    """A folder filled before runs were kept apart: last.ckpt (this run) and a newer
    last-v1.ckpt of another network. Lightning would resume the newest; megaseg refuses."""
    root = tmp_path / "mixed"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(
        (finished_run / "checkpoints" / "last.ckpt").read_bytes()
    )
    assert megaseg_main(fit_args(tmp_path / "other", 2, 16)) == 0
    (root / "checkpoints" / "last-v1.ckpt").write_bytes(
        (tmp_path / "other" / "checkpoints" / "last.ckpt").read_bytes()
    )
    assert megaseg_main(fit_args(root, 6, 8, "--ckpt_path", "last")) == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last: 2 last checkpoints" in err and "last-v1.ckpt" in err
    assert "pass the one to resume with --ckpt_path PATH" in err


@pytest.mark.parametrize("given", ["last", "path"])
@pytest.mark.parametrize("keep", [0, 1000], ids=["empty", "truncated"])
def test_an_incomplete_checkpoint_is_a_named_error(finished_run, tmp_path, capsys, keep, given):
    root = tmp_path / "root"
    (root / "checkpoints").mkdir(parents=True)
    last = root / "checkpoints" / "last.ckpt"
    last.write_bytes((finished_run / "checkpoints" / "last.ckpt").read_bytes()[:keep])
    ckpt_path = "last" if given == "last" else str(last)
    assert megaseg_main(fit_args(root, 6, 8, "--ckpt_path", ckpt_path)) == 2
    err = capsys.readouterr().err
    assert f"{last.resolve() if given == 'last' else last}: " in err
    assert ("empty (0 bytes)" if keep == 0 else "not a complete checkpoint") in err
    assert "EOFError" not in err


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_save_keeps_the_previous_file_and_leaves_nothing(tmp_path):
    """The process dies (SIGXFSZ) after 4 KB of its second checkpoint: last.ckpt is still the
    first, complete; nothing stays in $TMPDIR; the resumed run removes the killed save's
    temporary from the checkpoint folder. Slow: two fits in subprocesses (~30 s)."""
    root, tmpdir = tmp_path / "root", tmp_path / "tmpdir"
    tmpdir.mkdir()
    config = checkpoints_every(tmp_path, 2, "kill_during_save.DieDuringSave")
    env = {**ENV, "TMPDIR": str(tmpdir),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), ENV.get("PYTHONPATH", "")])}  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-c", "import kill_during_save as k; k.main()", str(root),
         *fit_args(root, 8, 8, "--config", config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    assert step_of(last) == 2  # the first save, whole
    assert sorted(os.listdir(tmpdir)) == []
    # the killed save's partial file, beside its target under megaseg's temporary mark
    assert [p.name for p in (root / "checkpoints").iterdir() if ".megaseg-tmp." in p.name]

    resumed = subprocess.run(
        [sys.executable, "-m", "megaseg.cli", *fit_args(root, 4, 8, "--config",
         checkpoints_every(tmp_path, 2), "--ckpt_path", "last")],
        cwd=REPO, env={**ENV, "TMPDIR": str(tmpdir)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_of(last) == 4
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
    assert sorted(os.listdir(tmpdir)) == []
