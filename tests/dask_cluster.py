"""A real Dask cluster on localhost, for tests and benchmarks: a ``dask scheduler`` process and
``dask worker`` processes (each a nanny and its worker process), over TCP on free ports.

    with DaskCluster(tmp_path, workers=2) as cluster:
        cluster.address          # tcp://127.0.0.1:PORT
        cluster.worker_pids()    # the worker processes that run tasks (the nannies' children)

The processes run from their own folder (not the client's working directory, as on a real
cluster), with ``tests/`` importable (picklable test loaders live there), one thread each,
and the scheduler's ``allowed-failures`` at 1 (megaseg's advice: a task that kills two
workers is given up). On exit every process started here, and every child of theirs, gets
SIGTERM, then SIGKILL; :attr:`DaskCluster.left_behind` lists any that survived even that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180  # s: a busy 2-core machine starts 3 Python processes importing distributed


class DaskCluster:
    def __init__(self, folder: Path, workers: int = 2, env: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.workers = workers
        self.env = (
            os.environ
            | {
                "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
                "OMP_NUM_THREADS": "1",
                "PYTHONWARNINGS": "ignore",
                "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
            }
            | (env or {})
        )
        self.scheduler: subprocess.Popen | None = None
        self.nannies: list[subprocess.Popen] = []
        self.address = ""
        self.left_behind: list[str] = []

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=self.folder, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        return proc

    def __enter__(self) -> DaskCluster:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._start_all()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_all(self) -> None:
        scheduler_file = self.folder / "scheduler.json"
        self.scheduler = self._start(
            ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
            "scheduler",
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not scheduler_file.is_file():
            self._check_alive(self.scheduler, "scheduler", deadline)
            time.sleep(0.1)
        self.address = json.loads(scheduler_file.read_text())["address"]
        for i in range(self.workers):
            self.nannies.append(self._start(
                ["distributed.cli.dask_worker", self.address, "--nthreads", "1",
                 "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{i}",
                 "--local-directory", str(self.folder / f"w{i}")],
                f"worker{i}",
            ))  # fmt: skip
        self.wait_for_workers(deadline)

    def wait_for_workers(self, deadline: float | None = None) -> None:
        """Until every nanny has a live worker process registered with the scheduler."""
        from distributed import Client

        deadline = deadline or time.monotonic() + START_TIMEOUT
        with Client(self.address, timeout=30) as client:
            while len(client.scheduler_info()["workers"]) < self.workers:
                for i, nanny in enumerate(self.nannies):
                    self._check_alive(nanny, f"worker{i}", deadline)
                time.sleep(0.2)

    def _check_alive(self, proc: subprocess.Popen, name: str, deadline: float) -> None:
        log = (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]
        if proc.poll() is not None:
            raise RuntimeError(f"dask {name} exited with {proc.returncode}:\n{log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"dask {name} not ready after {START_TIMEOUT} s:\n{log}")

    def worker_pids(self) -> set[int]:
        """PIDs of the worker processes alive now: the nannies' children that multiprocessing
        spawned (not their resource trackers)."""
        pids = set()
        for nanny in self.nannies:
            try:
                children = psutil.Process(nanny.pid).children(recursive=True)
                pids |= {p.pid for p in children if "spawn_main" in " ".join(p.cmdline())}
            except psutil.NoSuchProcess:
                pass
        return pids

    def processes(self) -> list[psutil.Process]:
        """Every process started here, with all their descendants."""
        out = []
        for proc in filter(None, [self.scheduler, *self.nannies]):
            try:
                p = psutil.Process(proc.pid)
                out += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return out

    def __exit__(self, *exc) -> None:
        alive = self.processes()
        for stop, timeout in ((psutil.Process.terminate, 15), (psutil.Process.kill, 10)):
            for p in alive:
                try:
                    stop(p)
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(alive, timeout=timeout)
        self.left_behind = [f"{p.pid} {' '.join(p.cmdline())[-80:]}" for p in alive]
        for proc in filter(None, [self.scheduler, *self.nannies]):
            if proc.poll() is None:
                proc.wait(timeout=5)  # reap our direct children (no zombie left)
