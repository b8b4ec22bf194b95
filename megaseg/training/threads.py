"""How a training run shares the CPU cores between torch's intra-op threads and data workers.

On a 2-core machine torch's default (one intra-op thread per core) plus one DataLoader worker
asks for 3 busy threads on 2 cores, and threads that wait for each other spin: on a shared
machine ``configs/cpu_small.yaml`` ran 6x slower per step than with one intra-op thread (0.39
vs 2.51 it/s, benchmarks/fit_threads.py, benchmarks/RESULTS.md). So on a CPU run the command
picks ``threads + workers <= cores`` unless the user chose (``OMP_NUM_THREADS``,
``--cpu_threads``, ``--data.num_workers``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megaseg.cpu import available_cores


@dataclass(frozen=True)
class CpuPlan:
    """Per training process: ``threads`` intra-op threads (None: leave torch's setting) and
    ``workers`` DataLoader workers, on ``cores`` cores shared by ``processes`` processes."""

    threads: int | None
    workers: int
    cores: int
    processes: int = 1
    threads_from: str = "automatic"  # or "--cpu_threads", "OMP_NUM_THREADS=..."
    workers_from: str = "automatic"  # or "data.num_workers"

    def describe(self, current_threads: int) -> str:
        """One line for the run's first lines of output."""
        n = current_threads if self.threads is None else self.threads
        threads = f"{n} intra-op thread{'s' * (n != 1)}"
        if self.threads_from != "automatic":
            threads += f" ({self.threads_from})"
        workers = f"{self.workers} data-loader worker{'s' * (self.workers != 1)}"
        if self.workers_from != "automatic":
            workers += f" ({self.workers_from})"
        per = f" per process x {self.processes}" if self.processes > 1 else ""
        return (
            f"megaseg: CPU run, {threads} + {workers}{per} on {self.cores} cores; "
            "set OMP_NUM_THREADS, --cpu_threads N or --data.num_workers N to override"
        )


def auto_workers(cores_per_process: int) -> int:
    """Data workers when none are configured: one from 2 cores on (episode sampling then
    overlaps the network's step), about a quarter of the cores on bigger machines, at most 4."""
    if cores_per_process < 2:
        return 0
    return min(4, max(1, cores_per_process // 4))


def plan_cpu(
    workers: int | None,
    cpu_threads: int | None = None,
    processes: int = 1,
    cores: int | None = None,
    environ: dict | None = None,
) -> CpuPlan:
    """Threads and workers of a CPU run.

    ``workers``: ``data.num_workers`` as configured (None: choose); ``cpu_threads``: the
    ``--cpu_threads`` option (None: choose, unless ``OMP_NUM_THREADS`` is set, which wins and
    is left to torch); ``processes``: training processes on this machine (DDP on CPU).
    """
    environ = os.environ if environ is None else environ
    cores = available_cores() if cores is None else cores
    per_process = max(1, cores // max(1, processes))
    workers_from = "automatic" if workers is None else "data.num_workers"
    if workers is None:
        workers = auto_workers(per_process)
    if cpu_threads is not None:
        if cpu_threads < 1:
            raise ValueError(f"--cpu_threads must be >= 1, got {cpu_threads}")
        threads, threads_from = cpu_threads, "--cpu_threads"
    elif environ.get("OMP_NUM_THREADS"):
        threads, threads_from = None, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    else:
        threads, threads_from = max(1, per_process - workers), "automatic"
    return CpuPlan(threads, workers, cores, processes, threads_from, workers_from)
