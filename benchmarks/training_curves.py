"""Training curves of ``megaseg fit`` runs from their ``metrics.csv``: a PNG and a small table.

    python benchmarks/training_curves.py NAME=METRICS.csv [NAME=METRICS.csv ...] \\
        --png docs/results/curves.png [--csv docs/results/curves.csv] [--smooth 5]

Per run: the training loss (logged every ``log_every_n_steps``; a running mean over
``--smooth`` logged points in the plot), the learning rate, episodes per second
(:class:`megaseg.training.EpisodeThroughput`) and, when ``DeviceStatsMonitor`` ran on a GPU,
the allocator's peak memory. ``--csv`` writes one row per logged step with those columns;
the summary printed at the end gives steps, median episodes/s and peak GiB per run.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

PEAK = "allocated_bytes.all.peak"


def read_run(path: Path) -> dict[int, dict[str, float]]:
    """``step -> {"loss", "lr", "episodes_per_s", "peak_gib", "val_dice"}`` (whatever was logged)."""
    steps: dict[int, dict[str, float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            out = steps.setdefault(int(row["step"]), {})
            for key, name in (("train/loss", "loss"), ("perf/episodes_per_s", "episodes_per_s"),
                              ("val/synthetic/dice", "val_dice")):  # fmt: skip
                if row.get(key):
                    out[name] = float(row[key])
            lr = [v for k, v in row.items() if k.startswith("lr-") and v]
            if lr:
                out["lr"] = float(lr[0])
            peaks = [float(v) for k, v in row.items() if k.endswith(PEAK) and v]
            if peaks:
                out["peak_gib"] = max(peaks) / 2**30
    return steps


def running_mean(values: list[float], n: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - n + 1) : i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", metavar="NAME=METRICS.csv")
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--smooth", type=int, default=5)
    args = parser.parse_args()
    runs = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected NAME=METRICS.csv")
        runs[name] = read_run(Path(path))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, steps in runs.items():
        loss = sorted((s, v["loss"]) for s, v in steps.items() if "loss" in v)
        if loss:
            xs, ys = zip(*loss, strict=True)
            axes[0].plot(xs, running_mean(list(ys), args.smooth), label=name)
        lr = sorted((s, v["lr"]) for s, v in steps.items() if "lr" in v)
        if lr:
            axes[1].plot(*zip(*lr, strict=True), label=name)
        eps = sorted((s, v["episodes_per_s"]) for s, v in steps.items() if "episodes_per_s" in v)
        if eps:
            axes[2].plot(*zip(*eps, strict=True), label=name)
    titles = (f"training loss (running mean of {args.smooth} logged steps)", "learning rate",
              "training episodes / s")  # fmt: skip
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=100)
    print(f"wrote {args.png}")

    cols = ("loss", "lr", "episodes_per_s", "peak_gib", "val_dice")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("run", "step", *cols))
            for name, steps in runs.items():
                for s in sorted(steps):
                    w.writerow((name, s, *(f"{steps[s][c]:.6g}" if c in steps[s] else ""
                                           for c in cols)))  # fmt: skip
        print(f"wrote {args.csv}")
    for name, steps in runs.items():
        eps = [v["episodes_per_s"] for v in steps.values() if "episodes_per_s" in v]
        peak = [v["peak_gib"] for v in steps.values() if "peak_gib" in v]
        print(f"{name}: {max(steps)} steps; episodes/s median {statistics.median(eps):.1f}"
              if eps else f"{name}: {max(steps)} steps", end="")  # fmt: skip
        print(f"; peak {max(peak):.2f} GiB" if peak else "")


if __name__ == "__main__":
    main()
