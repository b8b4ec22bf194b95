"""Naive (published) vs fast forward path of UniverSeg v1: work and measured time, same weights.

    python benchmarks/model_speed.py [--threads 2] [--repeats 3] [--out benchmarks/results/model_speed.md]

Rows: one query at 128x128 with S = 1, 16, 64 (inference, fp32), and one training step
(forward + backward) at B=8, S=8, 64x64. Naive and fast runs are interleaved so that load
from other processes hits both alike; the median of the repeats is reported.

Memory-bound work over the (S, 64, 128, 128) support maps is a large part of the time on a CPU,
and with glibc's default malloc every such tensor is a fresh ``mmap``: its pages are faulted in
(and zeroed) again at every forward. The header line records the machine's load and any
``MALLOC_*`` settings; ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` (or jemalloc /
tcmalloc via ``LD_PRELOAD``) keeps freed pages for reuse, see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_name, emit  # benchmarks/machine.py (the script's folder is on sys.path)
from torch.utils.flop_counter import FlopCounterMode

from megaseg import create_model


def gmacs(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("universeg_v1").eval()
    load_before = os.getloadavg()[0]

    rows = []
    for S in (1, 16, 64):
        q = torch.rand(1, 1, 128, 128)
        si, sl = torch.rand(1, S, 1, 128, 128), (torch.rand(1, S, 1, 128, 128) > 0.5).float()

        def run(fast: bool, q=q, si=si, sl=sl):
            with torch.inference_mode():
                model(q, si, sl, fast=fast)

        fns = {"naive": lambda: run(False), "fast": lambda: run(True)}
        work = {k: gmacs(f) for k, f in fns.items()}
        ms = measure(fns, args.repeats)
        rows.append((f"inference, 1 query 128x128, S={S}", work, ms))

    model.train()
    q = torch.rand(8, 1, 64, 64)
    si, sl = torch.rand(8, 8, 1, 64, 64), (torch.rand(8, 8, 1, 64, 64) > 0.5).float()

    def step(fast: bool):
        model.zero_grad(set_to_none=True)
        model(q, si, sl, fast=fast).square().mean().backward()

    fns = {"naive": lambda: step(False), "fast": lambda: step(True)}
    work = {k: gmacs(f) for k, f in fns.items()}
    rows.append(("training step fwd+bwd, B=8 S=8 64x64", work, measure(fns, args.repeats)))

    lines = [
        f"CPU: {cpu_name()}; torch {torch.__version__}; {args.threads} threads; fp32; "
        f"median of {args.repeats} interleaved runs; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; allocator: "
        + (
            " ".join(
                f"{k}={v}"
                for k, v in sorted(os.environ.items())
                if k.startswith("MALLOC_") or k == "LD_PRELOAD"
            )
            or "glibc default"
        ),  # fmt: skip
        "",
        "| case | naive GMAC | fast GMAC | work ratio | naive ms | fast ms | time ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, work, ms in rows:
        lines.append(
            f"| {name} | {work['naive']:.1f} | {work['fast']:.1f} | "
            f"{work['fast'] / work['naive']:.2f} | {ms['naive']:.0f} | {ms['fast']:.0f} | "
            f"{ms['fast'] / ms['naive']:.2f} |"
        )
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
