"""How many CPU cores megaseg may use: the one place that counts them (``megaseg fit``'s thread
plan, :mod:`megaseg.training.threads`; the demo's idle-core threads). Light: no torch at import."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextmanager
def idle_threads() -> Iterator[int]:
    """Within the block, as many torch threads as there are idle cores (:func:`available_cores`
    less the 1-minute load average; at least 1, at most torch's current count), put back
    afterwards. On a shared, busy CPU threads that wait for each other make small networks
    several times slower than one (``megaseg demo``)."""
    import torch

    before = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    torch.set_num_threads(max(1, min(before, round(available_cores() - load))))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
