"""``python -m data_prep ...``: the same as ``megaseg prep ...`` (megaseg/cli/prep.py).

Importing this module for its functions is deprecated: they live in :mod:`megaseg.cli.prep`.
"""

import sys

from megaseg.deprecation import moved

__getattr__ = moved(
    __name__,
    {
        n: f"megaseg.cli.prep:{n}"
        for n in ("BUILD_HELP", "EXTERNAL", "MAX_RESOLUTION", "cmd_build", "cmd_hash",
                  "cmd_info", "cmd_verify", "main", "parser", "resolve_dataset",
                  "task_count_text")
    },
)  # fmt: skip

if __name__ == "__main__":
    from megaseg.cli.prep import main
    from megaseg.pipes import run_command

    sys.exit(run_command(main))
