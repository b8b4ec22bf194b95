"""One-release aliases for names that moved (issue #25's restructure).

A module whose names moved ends with ``__getattr__ = moved(__name__, {...})``: the old import
path keeps working, with a :class:`DeprecationWarning` that names the new home; megaseg itself
always imports from the new home. No imports here beyond the standard library, so any module
can use it.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old_module: str, names: dict[str, str | tuple[str, Any]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``names``, each the old name -> ``"new.module:name"``
    (looked up on first use, so the old module imports nothing new), or ``(new path, object)``
    for an adapter that keeps an old calling convention."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        target = names[name]
        where, value = target if isinstance(target, tuple) else (target, None)
        warnings.warn(
            f"{old_module}.{name} moved to {where.replace(':', '.')}; import it from there "
            "(the old path goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        if value is not None:
            return value
        module, _, attr = where.partition(":")
        return getattr(importlib.import_module(module), attr)

    return __getattr__
