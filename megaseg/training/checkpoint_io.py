"""Lightning ``.ckpt`` files written in place, atomically, and read back with a named error.

Lightning's own ``TorchCheckpointIO`` saves through an fsspec transaction: the checkpoint goes
to a temporary file in ``$TMPDIR`` and is then moved; when ``$TMPDIR`` is another filesystem
(a tmpfs, a node-local disk) the move is a copy that truncates the target first, so a kill in
that window leaves ``last.ckpt`` at 0 bytes, and the temporary stays in ``$TMPDIR``.
:class:`AtomicCheckpointIO` writes the temporary beside the checkpoint (megaseg's marked name,
see :func:`megaseg.paths.atomic_write`), which fsyncs it and renames it over the target: a kill
leaves the previous complete file, and the next save into the folder removes the temporary.
``megaseg fit|validate|test|predict`` use it unless the config names another ``CheckpointIO``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from megaseg.paths import atomic_write


class IncompleteCheckpoint(ValueError):
    """A ``.ckpt`` that is empty, truncated or not a torch checkpoint; names the file."""


def check_complete(path: str | os.PathLike) -> None:
    """Raise :class:`IncompleteCheckpoint` unless ``path`` is a whole ``torch.save`` archive
    (its zip directory, written last, is readable), without reading the tensors."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise IncompleteCheckpoint(
            f"{path}: empty (0 bytes): a save of this checkpoint was interrupted, so it holds "
            "no state to resume from"
        )
    if not zipfile.is_zipfile(path):
        raise IncompleteCheckpoint(
            f"{path}: not a complete checkpoint ({size} bytes, no zip directory at its end): "
            "truncated by an interrupted save or copy, or not a torch checkpoint"
        )


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic in the checkpoint's own folder and whose
    loads of a local file name it when it is incomplete. Remote (``s3://``) paths are left
    to Lightning."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)  # atomic_write fsyncs it before the rename

        atomic_write(Path(path), write, suffix=".ckpt")

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        if _is_local(path) and Path(path).is_file():
            check_complete(path)
        return super().load_checkpoint(path, *args, **kwargs)
