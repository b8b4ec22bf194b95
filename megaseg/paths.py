"""Where megaseg writes when a command is given no output path: one folder, ignored by git.

``$MEGASEG_WORK`` if set, else ``./megaseg_work``; demo, show-episodes, evaluate and the
notebooks put their default outputs under it, so that running the README's commands in a
clone leaves no untracked files beside the code.
"""

from __future__ import annotations

import os
from pathlib import Path


def work_dir(*parts: str) -> Path:
    """``$MEGASEG_WORK`` (default ``megaseg_work``) joined with ``parts``; not created here."""
    return Path(os.environ.get("MEGASEG_WORK", "megaseg_work")).joinpath(*parts)
