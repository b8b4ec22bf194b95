"""``megaseg fit`` iterations per second on a CPU: intra-op threads vs data-loader workers.

    python benchmarks/fit_threads.py [--config configs/cpu_small.yaml] [--steps 40]
                                     [--repeats 1] [--out FILE]

Runs the real command (``python -m megaseg.cli fit``) for ``--steps`` training steps per
setting, without validation or checkpoints, and reads its speed from the run's metrics.csv
(``perf/episodes_per_s``, which leaves out the first batch; it/s = episodes/s / batch size):

- "old default": what megaseg did before choosing: torch's default intra-op threads (one per
  core) plus the config's data worker (``--cpu_threads <cores> --data.num_workers 1``);
- "automatic": what ``megaseg fit`` now chooses (no override, ``OMP_NUM_THREADS`` unset);
- "OMP_NUM_THREADS=1": the old README tip (one thread, one worker);
- "all threads, no worker": every core to torch, episodes made in the main process;
- "one thread, no worker": one core busy (what the data worker is worth).

Settings are run in turn, ``--repeats`` rounds; the 1-minute load average before each run is
in the table: on a shared machine other jobs' load is part of the result.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, emit  # benchmarks/machine.py (the script's folder is on sys.path)

from megaseg.cpu import available_cores

REPO = Path(__file__).resolve().parents[1]
LOG_EVERY = 5


def settings(cores: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (extra CLI arguments, extra environment)."""
    return {
        "old default": (["--cpu_threads", str(cores), "--data.num_workers", "1"], {}),
        "automatic": ([], {}),
        "OMP_NUM_THREADS=1": (["--data.num_workers", "1"], {"OMP_NUM_THREADS": "1"}),
        "all threads, no worker": (["--cpu_threads", str(cores), "--data.num_workers", "0"], {}),
        "one thread, no worker": (["--cpu_threads", "1", "--data.num_workers", "0"], {}),
    }


def its_per_second(metrics: Path, batch_size: int) -> float:
    """Steps per second over the logged windows (time-weighted: total steps / total time)."""
    seconds = steps = 0.0
    with metrics.open() as f:
        for row in csv.DictReader(f):
            if row.get("perf/episodes_per_s"):
                seconds += LOG_EVERY * batch_size / float(row["perf/episodes_per_s"])
                steps += LOG_EVERY
    if not steps:
        raise RuntimeError(f"{metrics}: no perf/episodes_per_s rows")
    return steps / seconds


def run_fit(config: str, steps: int, extra: list[str], env: dict[str, str], root: Path):
    """One fit; returns (it/s, the run's thread line, load average before, wall seconds)."""
    args = [sys.executable, "-m", "megaseg.cli", "fit", "--config", config,
            "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.log_every_n_steps", str(LOG_EVERY), "--trainer.enable_progress_bar",
            "false", *extra]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env={**base, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"fit failed ({' '.join(extra)}):\n{proc.stderr[-3000:]}")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("megaseg: CPU run")), "")
    metrics = next(root.glob("lightning_logs/version_*/metrics.csv"))
    return its_per_second(metrics, batch_size_of(config, extra)), line, load, wall


def batch_size_of(config: str, extra: list[str]) -> int:
    import yaml

    if "--data.batch_size" in extra:
        return int(extra[extra.index("--data.batch_size") + 1])
    return int(yaml.safe_load(Path(config).read_text())["data"]["batch_size"])


def describe(line: str) -> str:
    """The "1 intra-op thread + 1 data-loader worker" part of the run's first line."""
    return line.removeprefix("megaseg: CPU run, ").split(" on ")[0] or "?"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu_small.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    cores = available_cores()
    results: dict[str, list[tuple[float, str, float, float]]] = {}
    for _ in range(args.repeats):
        for name, (extra, env) in settings(cores).items():
            with tempfile.TemporaryDirectory(prefix="fit_threads_") as root:
                results.setdefault(name, []).append(
                    run_fit(args.config, args.steps, extra, env, Path(root))
                )
    lines = [
        f"CPU: {cpu_name()}, {cores} cores available; `megaseg fit --config "
        f"{Path(args.config).name}`, {args.steps} steps per run, no validation; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| setting | threads + workers | it/s (median) | runs | load average before |",
        "|---|---|---:|---:|---|",
    ]
    for name, runs in results.items():
        speed = statistics.median(r[0] for r in runs)
        loads = ", ".join(f"{r[2]:.2f}" for r in runs)
        lines.append(f"| {name} | {describe(runs[0][1])} | {speed:.2f} | {len(runs)} | {loads} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
