"""Which output files megaseg wrote, so that it replaces only those.

A command that writes a result a user may also keep under the same name (a label map, an
evaluation's ``summary.csv``) records, in the file's folder, the sha256 of each file it wrote:
``FOLDER/.megaseg-outputs.json``, ``{"format": 1, "files": {NAME: {"sha256": ..., "by": ...}}}``.
Before replacing ``NAME`` it checks that the file there still has the recorded sha256: a file
megaseg never wrote, or one a user changed since (a correction saved with nibabel keeps every
header field megaseg set, but not the bytes), is refused unless the caller passes an explicit
``overwrite``. Without the record (deleted, unreadable, or a folder written before it existed)
every existing file counts as the user's: refusing is the safe side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from megaseg.paths import atomic_write, sha256_file

RECORD = ".megaseg-outputs.json"
RECORD_FORMAT = 1


def _read(folder: Path) -> dict[str, dict]:
    try:
        data = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(v, dict)}


def record(paths: Iterable[str | os.PathLike], by: str) -> None:
    """Add the files ``paths`` (just written by ``by``, e.g. ``"megaseg evaluate"``) to their
    folders' records, with their current sha256."""
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        p = Path(p)
        by_folder.setdefault(p.parent, []).append(p)
    for folder, files in by_folder.items():
        entries = _read(folder)
        for p in files:
            entries[p.name] = {"sha256": sha256_file(p), "by": by}
        text = json.dumps({"format": RECORD_FORMAT, "files": entries}, indent=1, sort_keys=True)
        atomic_write(folder / RECORD, lambda tmp, text=text: Path(tmp).write_text(text + "\n"))


def written_by_megaseg(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file whose bytes are what megaseg recorded writing."""
    path = Path(path)
    entry = _read(path.parent).get(path.name)
    if entry is None or path.is_symlink() or not path.is_file():
        return False
    return sha256_file(path) == entry.get("sha256")


def check_replaceable(path: str | os.PathLike, overwrite: bool, hint: str) -> None:
    """FileExistsError naming ``path`` unless it is absent, megaseg's own (unchanged), or
    ``overwrite``; ``hint`` says how to proceed (e.g. "pass overwrite=True")."""
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()) or written_by_megaseg(path):
        return
    raise FileExistsError(
        f"{path}: exists and was not written by megaseg, or was changed since (no matching "
        f"sha256 in {path.parent / RECORD}); it is not replaced: move it away, choose another "
        f"path, or {hint}"
    )
