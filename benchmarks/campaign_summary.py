"""The summary table of benchmarks/gpu_campaign.sh: per run, episodes/s, GPU busy %, peak memory
and the loss at the start and end, from the run's metrics.csv and its nvidia-smi dmon log.

    python benchmarks/campaign_summary.py --runs w32 w32c --metrics /tmp/runs --dmon /tmp

* episodes/s: mean of ``perf/episodes_per_s`` (megaseg.training.EpisodeThroughput) over the
  logged steps after the first (which holds start-up);
* GPU busy %: mean of dmon's ``sm`` column (the share of time a kernel ran) over the run;
  with ``--parallel 1`` the runs shared the GPU and each row shows the same GPU's busy time;
* peak memory: the largest ``*peak*`` allocated-bytes value DeviceStatsMonitor logged (GiB);
* loss: mean ``train/loss`` over the first and the last fifth of the logged steps.
A value that is not in the logs is printed as "not measured".
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def latest_metrics(root: Path) -> list[dict] | None:
    files = sorted(root.glob("lightning_logs/*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], name: str) -> list[float]:
    out = []
    for r in rows:
        v = r.get(name, "")
        if v not in ("", None):
            out.append(float(v))
    return out


def sm_busy(path: Path) -> float | None:
    """Mean ``sm`` % of an ``nvidia-smi dmon -s um`` log, None without readings."""
    if not path.is_file():
        return None
    index, values = None, []
    for line in path.read_text().splitlines():
        parts = line.split()
        if line.startswith("#") and "sm" in parts:
            index = parts.index("sm") - 1  # '#' is its own field in the header
        elif index is not None and not line.startswith("#") and len(parts) > index:
            if parts[index].replace(".", "", 1).isdigit():
                values.append(float(parts[index]))
    return sum(values) / len(values) if values else None


def fmt(value, spec: str) -> str:
    return (
        "not measured"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--metrics", type=Path, required=True, help="folder of <run>/lightning_logs")
    p.add_argument("--dmon", type=Path, required=True, help="folder of dmon_<run>.txt")
    p.add_argument("--parallel", default="0")
    args = p.parse_args()
    print(
        "| run | steps | episodes/s | GPU busy % (sm) | peak memory GiB | loss first 1/5 | loss last 1/5 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        rows = latest_metrics(args.metrics / run)
        if rows is None:
            print(f"| {run} | no metrics.csv | | | | | |")
            continue
        rate = column(rows, "perf/episodes_per_s")[1:]
        loss = column(rows, "train/loss")
        steps = max((int(float(r["step"])) for r in rows if r.get("step")), default=0)
        peaks = [
            v for name in rows[0] if "peak" in name and "allocated_bytes" in name
            for v in column(rows, name)
        ]  # fmt: skip
        fifth = max(1, len(loss) // 5)
        print(
            f"| {run} | {steps} | {fmt(sum(rate) / len(rate) if rate else None, '.1f')} | "
            f"{fmt(sm_busy(args.dmon / f'dmon_{run}.txt'), '.0f')} | "
            f"{fmt(max(peaks) / 2**30 if peaks else None, '.1f')} | "
            f"{fmt(sum(loss[:fifth]) / fifth if loss else None, '.3f')} | "
            f"{fmt(sum(loss[-fifth:]) / fifth if loss else None, '.3f')} |"
        )
    if args.parallel == "1":
        print("(runs shared the GPU: its busy % is the sum of their work)")


if __name__ == "__main__":
    main()
