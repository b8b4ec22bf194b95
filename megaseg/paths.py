"""Where and how megaseg writes files; no torch here, so any module can use it.

Where, when a command is given no output path: one folder, ignored by git, ``$MEGASEG_WORK``
if set, else ``./megaseg_work``; demo, show-episodes, evaluate and the notebooks put their
default outputs under it, so that running the README's commands in a clone leaves no untracked
files beside the code. How: :func:`atomic_write`, so an interrupted write leaves no half file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def work_dir(*parts: str) -> Path:
    """``$MEGASEG_WORK`` (default ``megaseg_work``) joined with ``parts``; not created here."""
    return Path(os.environ.get("MEGASEG_WORK", "megaseg_work")).joinpath(*parts)


def atomic_write(path: Path, write, suffix: str = ".tmp") -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it onto ``path``.

    ``suffix`` ends the temporary name (a writer that picks the format from the extension,
    e.g. nibabel, needs ``.nii.gz``). A failed write leaves ``path`` untouched and no temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
