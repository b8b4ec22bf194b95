"""Work spread over workers: a local process pool or a Dask cluster, through one executor loop.

``megaseg prep build`` and ``megaseg evaluate`` take ``--scheduler ADDRESS`` (or
``$MEGASEG_SCHEDULER``). ADDRESS is one of:

- ``tcp://host:8786`` (or ``host:8786``): a running Dask scheduler, e.g. ``dask scheduler``
  on a head node or one that ``dask-jobqueue`` / ``dask-kubernetes`` started;
- a scheduler file (``.json``, written by ``dask scheduler --scheduler-file F``);
- ``local:N``: a ``LocalCluster`` of N worker processes (1 thread each) on this machine,
  closed when the command ends.

Each unit of work (a case, an evaluation draw) is one Dask task, submitted through
``Client.get_executor()``, a ``concurrent.futures.Executor``: :func:`as_finished` runs the
local process pool and the cluster alike. Workers must run the same megaseg and see the same
files at the same absolute paths as the client (a shared filesystem): they read the inputs
and write their outputs themselves. A worker that dies mid-task is replaced and its task
rerun by Dask on another worker, up to the scheduler's ``distributed.scheduler.allowed-failures``
(``local:N`` sets 1, i.e. a task may kill two workers; start a scheduler with
``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=1`` for the same); Dask's ``retries=`` does
not apply there (it reruns tasks that *raised*, and megaseg's tasks turn errors into results).

dask is imported only by :func:`connect`: without a scheduler, nothing here imports it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Executor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEDULER_ENV = "MEGASEG_SCHEDULER"
LOCAL_PREFIX = "local:"
# A task that kills this many + 1 workers is given up (``local:N``; a remote scheduler's own
# setting applies to it): a case that kills its worker twice is skipped, as in the local pool.
ALLOWED_FAILURES = 1

SCHEDULER_HELP = (
    "run the work on a Dask cluster: tcp://HOST:PORT of a running `dask scheduler`, its "
    "--scheduler-file JSON, or local:N (N worker processes on this machine); default "
    f"${SCHEDULER_ENV}, else no cluster. Workers must have this megaseg installed and see the "
    "inputs and outputs at the same absolute paths (a shared filesystem)"
)


class SchedulerError(RuntimeError):
    """The Dask scheduler cannot be reached, was lost, or its workers cannot run megaseg.

    The message names the address; the commands exit 2 on it.
    """


def scheduler_address(given: str | None) -> str | None:
    """``--scheduler`` if given, else ``$MEGASEG_SCHEDULER``, else None (no cluster)."""
    address = given if given is not None else os.environ.get(SCHEDULER_ENV, "")
    return address.strip() or None


def as_finished(
    executor: Executor,
    fn: Callable,
    items: Iterable,
    *shared: Any,
    survive: tuple[type[BaseException], ...] = (),
) -> Iterator[tuple[Any, Any]]:
    """Run ``fn(*shared, item)`` for every item on ``executor``; yield ``(item, result)`` as
    each one finishes (not in order).

    An exception of a type in ``survive`` (a worker that died: the pool's
    ``BrokenProcessPool``, Dask's ``KilledWorker``) is yielded in place of the result, also
    for items that could not be submitted; other exceptions propagate. Closing the generator
    cancels what has not started.
    """
    items = list(items)
    futures = {}
    try:
        for n, item in enumerate(items):
            try:
                futures[executor.submit(fn, *shared, item)] = item
            except survive as err:
                for rest in items[n:]:
                    yield rest, err
                break
        for future in as_completed(futures):
            try:
                result = future.result()
            except survive as err:
                result = err
            yield futures[future], result
    finally:
        for future in futures:
            future.cancel()


@dataclass
class Cluster:
    """A connected Dask client: ``executor`` runs tasks, :meth:`share` sends data once."""

    address: str
    client: Any
    executor: Executor
    worker_died: type[BaseException]  # what a task that killed too many workers raises

    def share(self, value: Any) -> Any:
        """``value`` copied once to every worker; pass the returned handle as a task argument
        and the task receives ``value`` (a model, a dataset: not sent again with each task)."""
        return self.client.scatter(value, broadcast=True, hash=False)


def _versions() -> dict[str, str]:
    """What must match between the client and a worker (run on each worker)."""
    import megaseg

    return {"megaseg": megaseg.__version__, "python": ".".join(map(str, sys.version_info[:2]))}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def connect(address: str, say: Callable[[str], None] = _say) -> Iterator[Cluster]:
    """Connect to (or, for ``local:N``, start) a Dask cluster; close it on the way out.

    Says the scheduler, its workers and the dashboard's address. Raises
    :class:`SchedulerError` naming ``address`` when it cannot be reached, when its workers
    cannot import this megaseg, or when the connection is lost inside the block.
    """
    try:
        import dask
        from distributed import Client, KilledWorker, LocalCluster
    except ImportError as err:
        raise SchedulerError(
            f'--scheduler {address}: Dask is not installed ({err}); pip install "megaseg[cluster]"'
        ) from None
    with contextlib.ExitStack() as stack:
        local = None
        if address.startswith(LOCAL_PREFIX):
            n = address[len(LOCAL_PREFIX) :]
            if not n.isdigit() or int(n) < 1:
                raise SchedulerError(f"--scheduler {address}: expected local:N with N >= 1")
            try:
                with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
                    # any free port on this machine only: several clusters do not clash, and
                    # the dashboard is not served to the network
                    local = LocalCluster(
                        n_workers=int(n), threads_per_worker=1, dashboard_address="127.0.0.1:0"
                    )
            except Exception as err:  # e.g. a worker process that failed to start
                raise SchedulerError(
                    f"--scheduler {address}: could not start the local Dask cluster "
                    f"({type(err).__name__}: {err})"
                ) from None
            stack.callback(local.close)
        try:
            if local is not None:
                client = Client(local)
            elif address.endswith(".json") and Path(address).is_file():
                client = Client(scheduler_file=address)
            else:
                client = Client(address)
        except (OSError, TimeoutError, ValueError) as err:
            raise SchedulerError(
                f"--scheduler {address}: cannot reach the Dask scheduler ({err}); is it "
                "running, and is the address the one `dask scheduler` printed?"
            ) from None
        stack.callback(client.close)
        _check_workers(address, client)
        workers = client.scheduler_info().get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        say(
            f"megaseg: Dask scheduler {client.scheduler.address}: {len(workers)} workers, "
            f"{threads} threads" + ("" if workers else " (tasks wait until workers join)")
        )
        say(f"megaseg: Dask dashboard {client.dashboard_link}")
        cluster = Cluster(address, client, client.get_executor(pure=False), KilledWorker)
        try:
            yield cluster
        except (CancelledError, OSError, TimeoutError) as err:
            if client.status == "running":
                raise
            raise SchedulerError(
                f"--scheduler {address}: lost the connection to the Dask scheduler "
                f"({type(err).__name__}); rerun the command (a build keeps the cases that "
                "finished and resumes from them)"
            ) from None


def _check_workers(address: str, client) -> None:
    """SchedulerError when a connected worker cannot import megaseg or runs another version."""
    mine = _versions()
    try:
        theirs = client.run(_versions)
    except Exception as err:  # the worker's import error, sent back by Dask
        raise SchedulerError(
            f"--scheduler {address}: a worker cannot run megaseg ({type(err).__name__}: "
            f"{err}); install this megaseg on every worker"
        ) from None
    for worker, versions in sorted(theirs.items()):
        if versions != mine:
            raise SchedulerError(
                f"--scheduler {address}: worker {worker} runs {versions}, this client "
                f"{mine}; install the same megaseg on every worker"
            )
