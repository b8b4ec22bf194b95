"""Moved: synthetic tasks v2 are :mod:`megaseg.data.synthetic.v2` (issue #25). Every name of
that module is served here for one release, with a DeprecationWarning."""

from megaseg.deprecation import moved

__getattr__ = moved(__name__, {}, rest="megaseg.data.synthetic.v2")
