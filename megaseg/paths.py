"""Where and how megaseg writes files; no torch here, so any module can use it.

Where, when a command is given no output path: one folder, ignored by git, ``$MEGASEG_WORK``
if set, else ``./megaseg_work``; demo, show-episodes, evaluate and the notebooks put their
default outputs under it, so that running the README's commands in a clone leaves no untracked
files beside the code; downloads go to :func:`cache_dir`. How: :func:`atomic_write`, so an interrupted write leaves no half file,
and the temporary a killed writer left behind is recognised as megaseg's (its name holds
:data:`TEMP_MARK`, the host and the PID) and removed by the next write into that folder.
:func:`pid_lock` keeps two processes out of one output folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ENV_CACHE = "MEGASEG_CACHE"  # where downloads are cached, see cache_dir
TEMP_MARK = ".megaseg-tmp."
# ".<target name>.megaseg-tmp.<pid>.<host tag>.<random><suffix>", see _temp_prefix
_TEMP_NAME = re.compile(r"^\..*" + re.escape(TEMP_MARK) + r"(\d+)\.([0-9a-f]{8})\.")
_cleaned: set[str] = set()  # folders whose stale temporaries this process already removed


def work_dir(*parts: str) -> Path:
    """``$MEGASEG_WORK`` (default ``megaseg_work``) joined with ``parts``; not created here."""
    return Path(os.environ.get("MEGASEG_WORK", "megaseg_work")).joinpath(*parts)


def checkout_work_dir(*parts: str) -> Path:
    """Like :func:`work_dir`, but a relative default is taken in the source checkout megaseg
    runs from (the folder holding ``pyproject.toml`` beside ``megaseg/``), not in the working
    folder: a notebook's kernel runs in ``notebooks/``, and its outputs belong in the
    checkout's ``megaseg_work/`` as the README says. Outside a checkout (an installed
    megaseg), the working folder's."""
    env = os.environ.get("MEGASEG_WORK")
    if env:
        return Path(env).joinpath(*parts)
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "megaseg" / "__init__.py").is_file():
        return (root / "megaseg_work").joinpath(*parts)
    return work_dir(*parts)


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it onto ``path``.

    ``write`` gets the temporary's path (a string) and writes the whole file there. ``suffix``
    ends the temporary name (a writer that picks the format from the extension, e.g. nibabel,
    needs ``.nii.gz``). The temporary is fsynced before the rename and the folder after it, so
    a power loss leaves the old file or the new one, never a torn one. A failed write leaves
    ``path`` untouched and no temporary. The file gets the mode a plain ``open()`` would give
    (0666 less the umask), not mkstemp's 0600, so that collaborators on a shared server can
    read what megaseg wrote. The one atomic write of megaseg and data_prep.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        # after write(): a writer may have replaced the temporary with a new file of its own
        os.chmod(tmp, 0o666 & ~current_umask())
        fsync_path(tmp)  # the rename must not land before the data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_json(path: Path, data) -> None:
    """:func:`atomic_write` of ``data`` as sorted, indented UTF-8 JSON and a final newline (the
    same bytes for the same data: what the corpus checksums rely on)."""
    text = json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.encode()))


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder: makes a rename or a new file in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_dir(*parts: str) -> Path:
    """megaseg's download cache, ``$MEGASEG_CACHE`` (``~`` expanded), else
    ``~/.cache/megaseg``, joined with ``parts``; not created here. Official weights go to its
    top, package-shipped datasets to ``cache_dir("packages")``."""
    env = os.environ.get(ENV_CACHE)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "megaseg"
    return base.joinpath(*parts)


def current_umask() -> int:
    """The process's umask. Read from /proc where there is one: ``os.umask`` can only read it by
    setting it, which for a moment would change the mode of files other threads create."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_all(items: Sequence[tuple[Path, Callable[[str], None], str]]) -> None:
    """:func:`atomic_write` of several ``(path, write, suffix)`` at once: every temporary is
    written before any is renamed, so a failed write (an exception) replaces none of the paths.
    The renames follow each other at once, last item first; only a kill between two of them can
    leave a mix of old and new files."""

    def chain(i: int) -> None:
        if i == len(items):
            return
        path, write, suffix = items[i]

        def write_then_rest(tmp: str) -> None:
            write(tmp)
            chain(i + 1)  # the next files are written (and renamed) before this one is renamed

        atomic_write(path, write_then_rest, suffix=suffix)

    chain(0)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _host_tag() -> str:
    """8 hex digits naming this machine: a PID means something only on its own host."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(path: Path) -> str:
    # The target's name is cut so that a long one still leaves room for the mark (255 bytes).
    return f".{path.name[:64]}{TEMP_MARK}{os.getpid()}.{_host_tag()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def clean_stale_temps(folder: Path, force: bool = False) -> list[Path]:
    """Remove the temporaries of :func:`atomic_write` in ``folder`` whose writer is dead.

    Only files named with :data:`TEMP_MARK` by a process of this host that no longer runs
    (a write killed before its rename) are removed; anything else, or a temporary of another
    host or of a live process, is left alone. Done once per folder and process unless
    ``force``. Returns the removed paths.
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _cleaned and not force:
        return []
    _cleaned.add(key)
    removed, host = [], _host_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match[2] != host or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match[1])
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process cleaned it first
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


class LockHeld(RuntimeError):
    """Another live process holds the lock file; ``holder`` is the PID written in it."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path}: held by PID {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def pid_lock(
    path: Path,
    busy: Callable[[str], Exception] | None = None,
    refused: Callable[[str], Exception] = ValueError,
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created), which holds the holder's PID.

    The OS releases the lock when its holder dies, so a killed process's lock is taken over
    without any check of the PID. When a live process holds it, raises ``busy(pid)`` (default
    :class:`LockHeld`); when ``path`` is a link or a folder (not a lock file megaseg wrote),
    ``refused(message)``. Exceptions of the ``with`` body pass through unchanged.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise refused(f"{path}: not a lock file megaseg wrote (a link or a folder); move it")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise (busy(holder) if busy else LockHeld(path, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def slug(text: str, max_len: int = 80) -> str:
    """``text`` as part of a file name: each run of characters other than ASCII letters,
    digits, ``.``, ``_`` and ``-`` becomes one ``_``, and at most ``max_len`` characters are
    kept (a name may have 255 bytes; a prefix and a suffix need room). The one slug of
    megaseg's output names (report PNGs; the corpus build's shard and staging folders)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:max_len]
