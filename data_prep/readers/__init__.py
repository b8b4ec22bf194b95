"""Readers: find the cases of a dataset on disk and load them as checked arrays.

``get_reader(spec.reader).cases(root, spec) -> list[Case]``, then ``.load(case) ->
LoadedCase`` per case (raises :class:`CaseError` for a case to skip and count).
"""

from __future__ import annotations

from .base import Case, CaseError, DatasetError, LoadedCase, Reader
from .folder import FolderReader
from .io import load_case
from .msd import MSDReader
from .nnunet import NnUNetReader
from .package import PackageReader

READERS: dict[str, Reader] = {
    "nnunet": NnUNetReader(),
    "msd": MSDReader(),
    "folder": FolderReader(),
    "folder2d": FolderReader(),  # the same reader; the name says the files are 2D images
    "package": PackageReader(),  # files inside an unpacked wheel / .deb (specs/packaged.py)
}


def get_reader(name: str) -> Reader:
    """The reader registered as ``name``; KeyError listing the known names otherwise."""
    try:
        return READERS[name]
    except KeyError:
        raise KeyError(f"unknown reader {name!r}; known: {sorted(READERS)}") from None


__all__ = [
    "READERS",
    "Case",
    "CaseError",
    "DatasetError",
    "FolderReader",
    "LoadedCase",
    "MSDReader",
    "NnUNetReader",
    "PackageReader",
    "Reader",
    "get_reader",
    "load_case",
]
