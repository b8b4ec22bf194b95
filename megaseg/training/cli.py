"""Deprecated: ``megaseg fit|validate|test|predict`` lives in :mod:`megaseg.cli.train`;
these names stay here for one release."""

from megaseg.deprecation import moved

__getattr__ = moved(
    __name__,
    {
        n: f"megaseg.cli.train:{n}"
        for n in (
            "EXIT_SIGTERM",
            "MegasegCLI",
            "default_loggers",
            "lightning_main",
            "quiet_third_party_notices",
            "written_paths",
        )
    },
)
