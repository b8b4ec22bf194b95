"""Progress bars that suit where their output goes.

In a terminal a tqdm bar redraws itself in place; in a log file (a batch job's stderr
redirected) every redraw is a new line, tens of kilobytes of them for one run. So off a
terminal the bars are throttled to one line every :data:`LOG_INTERVAL_S` seconds.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 60.0


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stderr, where tqdm writes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def progress_options() -> dict:
    """Extra keyword arguments of a ``tqdm(...)`` call: none in a terminal, else a line at
    most every :data:`LOG_INTERVAL_S` seconds."""
    if is_terminal():
        return {}
    return {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S * 2}
