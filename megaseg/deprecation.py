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


def moved(
    old_module: str, names: dict[str, str | tuple[str, Any]], rest: str | None = None
) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``names``, each the old name -> ``"new.module:name"``
    (looked up on first use, so the old module imports nothing new), or ``(new path, object)``
    for an adapter that keeps an old calling convention. ``rest``: a module whose other names
    are all served under their own name (a module that moved as a whole)."""

    def __getattr__(name: str, _depth: int = 0) -> Any:
        # _depth: frames between the user's attribute access and here (a package __getattr__
        # that calls this one passes 1), so the warning points at the user's line
        if name in names:
            target = names[name]
            where, value = target if isinstance(target, tuple) else (target, None)
        elif rest is not None and not name.startswith("__"):
            where, value = f"{rest}:{name}", None
        else:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        if value is None:
            module, _, attr = where.partition(":")
            try:
                value = getattr(importlib.import_module(module), attr)
            except AttributeError:
                raise AttributeError(f"module {old_module!r} has no attribute {name!r}") from None
        warnings.warn(
            f"{old_module}.{name} moved to {where.replace(':', '.')}; import it from there "
            "(the old path goes in the next release)",
            DeprecationWarning,
            stacklevel=2 + _depth,
        )
        return value

    return __getattr__
