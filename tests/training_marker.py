"""A callback for the stop tests of ``megaseg fit`` (not a test file): it writes
``ROOT/training`` (its content: this process's PID) after the first training batch, so that a
test knows when to send its signal. Tests put ``tests/`` on ``PYTHONPATH`` to use it."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl


class MarkTraining(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        marker = Path(trainer.default_root_dir) / "training"
        if not marker.exists():
            marker.write_text(f"{os.getpid()}\n")
