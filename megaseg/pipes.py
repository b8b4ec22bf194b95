"""Commands whose output is piped into a reader that stops early (``megaseg --help | head``).

The reader closing the pipe makes the next write (or the flush at exit) raise BrokenPipeError;
a command-line tool should then stop quietly, as ``cat`` does, not print a traceback.
Restoring the default SIGPIPE action would do that too, but would also kill a training or
cluster process on any broken socket, so the error is caught around the command instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# 128 + SIGPIPE: what a shell reports for a process the closed pipe stopped
EXIT_BROKEN_PIPE = 141


def run_command(main: Callable[[], int | None]) -> int:
    """``main()``'s exit code; ``EXIT_BROKEN_PIPE``, with no traceback, when stdout's reader
    went away. Stdout is then pointed at /dev/null so that the interpreter's own flush at exit
    does not fail a second time."""
    try:
        try:
            code = main()
        except SystemExit:  # argparse's --help: its text may still be buffered
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # a write still buffered fails here, inside the guard
        return code or 0
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (e.g. replaced in a test)
            pass
        finally:
            os.close(devnull)
        return EXIT_BROKEN_PIPE
