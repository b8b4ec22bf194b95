"""The corpus build on Dask against the local process pool: per-case overhead and cases/s.

    python benchmarks/cluster_speed.py [--tiny 20 60] [--cases 6] [--size 256] [--repeats 3]

The Dask runs use a real cluster on this machine (``tests/dask_cluster.py``: a ``dask
scheduler`` and ``dask worker`` processes over localhost TCP, one thread each), warmed up by a
first build so that the workers' imports are not counted; the client is this process.

1. Overhead per case: builds of ``--tiny`` many tiny cases (16^3 volumes at 16 px: almost no
   work each) with the 2-process pool and with 2 Dask workers. The slope between the two sizes
   (seconds per extra case) cancels start-up and consolidation; Dask's slope minus the pool's
   is the Dask path's overhead per case, in wall-clock ms and in CPU ms (every process
   involved: client, pool or scheduler and workers; from ``psutil``).
2. Throughput: ``--cases`` CT-like volumes of ``--size``^3 voxels (``corpus_speed.py``'s) at
   64/128/256, in this process (1 worker), with the 2-process pool, on 1 and 2 Dask workers;
   cases/s of the whole build and the share of it the client spends consolidating.
3. A paper estimate of a 20,000-volume build on 1 machine and on 10 nodes, from the measured
   per-case cost (assumptions printed with it).

Wall-clock numbers depend on what else runs: the table states the load average before and
after. Prints a markdown table; ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from corpus_speed import write_volumes  # benchmarks/ is on sys.path (the script's folder)
from machine import cpu_name, emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from dask_cluster import DaskCluster  # noqa: E402  (tests/dask_cluster.py)

VOLUMES = 20_000
DATASETS = 53  # MegaMedical's count
CLUSTER_PIDS: set[int] = set()  # the Dask processes: not counted in the pool's CPU time


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """CPU seconds of this process and of ``processes`` (with their reaped children)."""
    total = time.process_time()
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def timed_build(root: Path, out: Path, resolutions, cluster=None, workers=1) -> dict:
    """One build of the dataset at ``root``: wall seconds, CPU seconds, and the seconds the
    client spent consolidating, of which rendering the dataset's card and preview (a cost per
    dataset, not per case)."""
    import data_prep.card as card
    import data_prep.store_writer as sw
    from data_prep.pipeline import build_corpus, job_from_spec
    from data_prep.specs import spec_from_path

    originals = {(sw, "consolidate_dataset"): [], (card, "write_preview"): [],
                 (card, "write_card"): []}  # fmt: skip

    def timer(module, name):
        function, spent = getattr(module, name), originals[(module, name)]

        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent.append((time.perf_counter() - t0, time.process_time() - c0))

        return function, timed

    def tree():
        if cluster is not None:
            return cluster.processes()
        own = psutil.Process().children(recursive=True)  # the pool's forkserver and workers
        return [p for p in own if p.pid not in CLUSTER_PIDS]

    job = job_from_spec(spec_from_path(root), root)
    saved = {}
    for module, name in originals:
        saved[(module, name)], timed = timer(module, name)
        setattr(module, name, timed)
    try:
        cpu0, t0 = cpu_seconds(tree()), time.perf_counter()
        summary = build_corpus(
            [job], out, workers=workers, resolutions=resolutions, progress=False,
            scheduler=cluster.address if cluster else None,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        time.sleep(0.5)  # let the pool's workers be reaped, so their CPU is counted
        cpu = cpu_seconds(tree()) - cpu0
    finally:
        for (module, name), function in saved.items():
            setattr(module, name, function)
    assert summary.ok and not any(summary.skipped.values()), summary.text()
    rendering = [t for t, _ in originals[(card, "write_preview")] + originals[(card, "write_card")]]
    consolidation = originals[(sw, "consolidate_dataset")]
    return {"wall": wall, "cpu": cpu, "consolidate": sum(t for t, _ in consolidation),
            "consolidate_cpu": sum(c for _, c in consolidation), "rendering": sum(rendering),
            "cases": len(job.cases)}  # fmt: skip


def slope(rows: list[dict], key: str) -> float:
    """Seconds per extra case between the smaller and the larger build."""
    small, large = rows
    return (large[key] - small[key]) / (large["cases"] - small["cases"])


def overhead(tmp: Path, sizes: list[int], repeats: int, cluster2) -> tuple[list, dict]:
    roots = {n: write_volumes(tmp / f"tiny{n}" / "Dataset501_Tiny", n, 16) for n in sizes}
    runs = {"pool": [], "dask": []}
    for r in range(repeats):  # interleaved, so that a change of load hits both
        for path in runs:
            rows = [
                timed_build(
                    roots[n],
                    tmp / f"o_{path}_{n}_{r}",
                    (16,),
                    cluster=cluster2 if path == "dask" else None,
                    workers=2,
                )  # fmt: skip
                for n in sizes
            ]
            runs[path].append({k: 1000 * slope(rows, k) for k in ("wall", "cpu")})
    med = {
        path: {k: float(np.median([x[k] for x in v])) for k in ("wall", "cpu")}
        for path, v in runs.items()
    }

    def spread(path: str, key: str) -> str:
        values = [x[key] for x in runs[path]]
        return f"{med[path][key]:.1f} ms {key} [{min(values):.1f}, {max(values):.1f}]"

    out = []
    for path, label in (("pool", "process pool, 2 workers"), ("dask", "Dask, 2 workers")):
        out.append((
            f"cost per extra tiny case, {label} (median [min, max] of {repeats})",
            f"{spread(path, 'wall')}; {spread(path, 'cpu')}",
        ))  # fmt: skip
    diffs = {k: [d[k] - q[k] for d, q in zip(runs["dask"], runs["pool"], strict=True)]
             for k in ("wall", "cpu")}  # fmt: skip
    out.append((
        "**Dask overhead per case** (Dask minus pool, per interleaved repeat)",
        "**" + "; ".join(f"{np.median(v):+.1f} ms {k} [{min(v):+.1f}, {max(v):+.1f}]"
                         for k, v in diffs.items()) + "**",
    ))  # fmt: skip
    return out, {k: float(np.median(v)) for k, v in diffs.items()}


def throughput(tmp: Path, n: int, size: int, cluster1, cluster2) -> tuple[list, dict]:
    root = write_volumes(tmp / "big" / "Dataset500_Bench", n, size)
    res = (64, 128, 256)
    configs = [
        ("this process (1 worker)", {}),
        ("process pool, 2 workers", {"workers": 2}),
        ("Dask, 1 worker", {"cluster": cluster1}),
        ("Dask, 2 workers", {"cluster": cluster2}),
    ]
    rows, measured = [], {}
    for label, kw in configs:
        m = timed_build(root, tmp / f"big_{label.split(',')[0][:4]}_{len(measured)}", res, **kw)
        measured[label] = m
        rows.append((
            f"build {n} cases {size}^3 -> 64/128/256, {label}",
            f"{n / m['wall']:.2f} cases/s ({m['wall']:.1f} s; {m['cpu'] / n:.2f} CPU s/case; "
            f"consolidation {m['consolidate']:.1f} s)",
        ))  # fmt: skip
    return rows, measured


def estimate(measured: dict, dask_overhead_ms: float, n: int) -> list[tuple[str, str]]:
    """20,000 volumes from the 1-worker run's CPU seconds per case (CPU, not wall: the machine
    is shared), plus Dask's measured CPU overhead per case (0 if the measurement is below 0),
    and its consolidation (wall: it fsyncs), which stays serial on the client."""
    dask_overhead_ms = max(0.0, dask_overhead_ms)
    one = measured["this process (1 worker)"]
    per_case = (one["cpu"] - one["consolidate_cpu"]) / n  # s of one core per case
    copy = (one["consolidate"] - one["rendering"]) / n  # s per case, on the client, at the end
    fixed = DATASETS * one["rendering"]  # card and preview per dataset
    out = [(
        "measured per case (1 worker): CPU without consolidation; consolidation's copy",
        f"{per_case:.2f} CPU s; {1000 * copy:.0f} ms (+ {one['rendering']:.1f} s per dataset "
        "for its card and preview)",
    )]  # fmt: skip
    serial = VOLUMES * copy + fixed
    for cores in (2, 32):
        local = VOLUMES * per_case / cores + serial
        nodes = VOLUMES * (per_case + dask_overhead_ms / 1000) / (10 * cores) + serial
        out.append((
            f"paper estimate: {VOLUMES:,} such volumes in {DATASETS} datasets, nodes of "
            f"{cores} cores (1 worker each)",
            f"1 machine {local / 3600:.1f} h; 10 nodes on Dask {nodes / 3600:.1f} h (both "
            f"incl. {serial / 3600:.2f} h of serial consolidation on the client)",
        ))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", type=int, nargs=2, default=[20, 60])
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with DaskCluster(tmp / "dask1", workers=1) as c1, DaskCluster(tmp / "dask2") as c2:
            CLUSTER_PIDS.update(p.pid for c in (c1, c2) for p in c.processes())
            # not timed: the first case of each path imports torch / MONAI and starts the
            # pool's forkserver or the Dask workers' pipeline
            warm = write_volumes(tmp / "warm" / "Dataset502_Warm", 2, 16)
            for n, kw in enumerate([{}, {"workers": 2}, {"cluster": c1}, {"cluster": c2}]):
                timed_build(warm, tmp / f"warm_{n}", (16,), **kw)
            rows, dask_overhead = overhead(tmp, args.tiny, args.repeats, c2)
            more, measured = throughput(tmp, args.cases, args.size, c1, c2)
        rows += more
        rows += estimate(measured, dask_overhead["cpu"], args.cases)
    load1 = os.getloadavg()[0]
    table = "\n".join([
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch threads 1 per worker; Dask on "
        f"localhost TCP (1 scheduler + worker processes); load average {load0:.1f} before, "
        f"{load1:.1f} after",
        "",
        "| measurement | result |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in rows],
    ])  # fmt: skip
    emit(table, args.out)


if __name__ == "__main__":
    main()
