"""Deprecated: ``megaseg evaluate`` lives in :mod:`megaseg.cli.evaluate`;
these names stay here for one release."""

from megaseg.deprecation import moved

__getattr__ = moved(__name__, {n: f"megaseg.cli.evaluate:{n}" for n in ("PROG", "main", "parser")})
