"""Deprecated: ``megaseg show-episodes`` lives in :mod:`megaseg.cli.show_episodes`;
these names stay here for one release."""

from megaseg.deprecation import moved

__getattr__ = moved(
    __name__,
    {
        n: f"megaseg.cli.show_episodes:{n}"
        for n in ("corpus_episodes", "main", "overlay", "render", "synthetic_episodes")
    },
)
