"""Data-loader workers that live and die with their training process.

- A job scheduler's time limit sends SIGTERM to every process of the job: the workers ignore
  it, so that the training process alone decides how to stop (it saves a checkpoint, see
  :class:`megaseg.training.callbacks.SaveOnSigterm`) instead of seeing its workers vanish.
- When the training process dies without a word (``kill -9``, out of memory) the kernel kills
  its workers at once (Linux ``PR_SET_PDEATHSIG``); torch's own check would notice only after
  its 5 s polling interval, and a worker busy making an episode later still.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """In a worker: ignore SIGTERM, and be killed when ``parent`` dies (Linux)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no usable libc: torch's own (slower) check remains
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def worker_init_fn():
    """A ``DataLoader`` ``worker_init_fn`` (picklable) binding the workers to this process."""
    return functools.partial(_worker_init, os.getpid())


def _worker_init(parent: int, worker_id: int) -> None:
    _die_with(parent)
