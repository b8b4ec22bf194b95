"""``megaseg fit`` that dies while it writes a checkpoint, for the kill tests of checkpoint saves.

    PYTHONPATH=tests python -c "import kill_during_save as k; k.main()" ROOT fit --config ...

with ``kill_during_save.DieDuringSave`` among the config's callbacks. When the ``at_save``-th
checkpoint save begins, the next file opened for writing under ``ROOT/checkpoints`` or
``$TMPDIR`` (wherever the saver puts the bytes) gets a 4 KB file-size limit: the kernel kills the process with
SIGXFSZ halfway through that file, as a preemption would. Not a test file (no ``test_``).
"""

from __future__ import annotations

import os
import resource
import signal
import sys

import pytorch_lightning as pl

_state = {"armed": False, "watch": ()}


class DieDuringSave(pl.Callback):
    """Arms the limit when the ``at_save``-th checkpoint is being saved."""

    def __init__(self, at_save: int = 2):
        self.at_save, self.saves = at_save, 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        if self.saves == self.at_save:
            _state["armed"] = True


def _writing(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR))


def _hook(event: str, args: tuple) -> None:
    if event != "open" or not _state["armed"]:
        return
    path, mode, flags = args
    if not isinstance(path, str | bytes | os.PathLike) or not _writing(mode, flags):
        return
    if os.path.realpath(os.fsdecode(path)).startswith(_state["watch"]):
        _state["armed"] = False
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))


def main() -> None:
    root, argv = sys.argv[1], sys.argv[2:]
    tmpdir = os.environ.get("TMPDIR", "/tmp")
    checkpoints = os.path.join(os.path.realpath(root), "checkpoints")
    _state["watch"] = (checkpoints + os.sep, os.path.realpath(tmpdir) + os.sep)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: EFBIG instead of a kill
    sys.addaudithook(_hook)
    from megaseg.cli import main as megaseg_main

    sys.exit(megaseg_main(argv))
