"""Declarative dataset specs: the catalog of public datasets, ad-hoc specs, known overlaps."""

from __future__ import annotations

from .adhoc import spec_from_path
from .base import DatasetSpec, FolderLayout
from .catalog import CATALOG, get_spec, list_specs
from .overlaps import KNOWN_OVERLAPS, Overlap, overlaps_among

__all__ = [
    "CATALOG",
    "KNOWN_OVERLAPS",
    "DatasetSpec",
    "FolderLayout",
    "Overlap",
    "get_spec",
    "list_specs",
    "overlaps_among",
    "spec_from_path",
]
