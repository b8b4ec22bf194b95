"""Cross-attention variants vs v1: measured time and peak memory next to the cost model.

    python benchmarks/attention_cost.py [--threads 2] [--repeats 3] [--sizes 16 64] [--out FILE]

One query at 128x128, inference (``torch.inference_mode``), fast path, float32, CPU. Each
(variant, S) runs in a fresh child process, so that one run's allocations cannot hide
another's peak:

* peak memory, two ways: (1) the allocator's view, exact for tensors: ``torch.profiler`` with
  ``profile_memory=True`` records every allocation and free, and the peak of their running
  sum over one forward is the largest amount of tensor memory alive at once (inputs and
  weights, allocated before, are not counted); (2) the OS's view, for reference: the growth of
  the process's peak RSS (``ru_maxrss``) over its first forward, which adds allocator slack
  and one-time buffers (thread pools, kernel caches).
* time: one warm-up forward, then the best (minimum) of ``--repeats`` forwards: on a shared
  machine the minimum is the run least disturbed by other processes.

The model (``megaseg.models.attention.network_cost``): time = conv MACs / R_conv + attention
MACs / R_attn + memory-bound traffic / R_mem, with R_conv, R_attn and R_mem the throughputs of
one 3x3 conv (64 -> 64, 16 x 128x128), one ``scaled_dot_product_attention`` (4096 query and
16384 key tokens, 4 heads of 16) and the network's memory-bound ops once each on a
16 x 64 x 128x128 support-sized tensor (in-place add, mean over the support, in-place
LeakyReLU, 2x max-pool, 2x bilinear upsampling, concatenation; the elements they read and write counted as
the model counts them), measured in the same child, each repeat interleaved with a forward so
that all see the same load; memory = the model's peak support-sized elements x 4 bytes.
The machine is shared: other processes' load shows up in every time measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_name, emit  # benchmarks/machine.py (the script's folder is on sys.path)

from megaseg.models.blocks import MaxPool2x2

VARIANTS = ("universeg_v1", "universeg_attn_hybrid", "universeg_attn_full")
SIZE = 128


def best_ms(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Minimum wall time of each function; one warm-up each, then the functions interleaved."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: min(t) for name, t in times.items()}


def calibration() -> tuple[dict[str, callable], dict[str, int]]:
    """A plain 3x3 conv, one SDPA call and the memory-bound op mix; their MACs (elements moved
    for the op mix)."""
    x, w = torch.rand(16, 64, SIZE, SIZE), torch.rand(64, 64, 3, 3)
    u, half = torch.rand(1, 64, SIZE, SIZE), torch.rand(16, 64, SIZE // 2, SIZE // 2)
    q, k = torch.rand(1, 4, 4096, 16), torch.rand(1, 4, 16384, 16)

    def conv():
        with torch.inference_mode():
            F.conv2d(x, w, padding=1)

    def attn():
        with torch.inference_mode():
            F.scaled_dot_product_attention(q, k, k)

    pool = MaxPool2x2()

    def memory_bound():  # the network's ops, as its fast path runs them in inference
        with torch.inference_mode():
            x.add_(u)  # 2 (read, write in place; the query-sized operand is ignored)
            x.mean(dim=0)  # 1
            F.leaky_relu_(x)  # 2 (in place)
            pool(x)  # 1.25 (read; a quarter written)
            F.interpolate(half, scale_factor=2, mode="bilinear", align_corners=True)  # 1.25
            torch.cat([x, x], dim=1)  # 4

    macs = {"conv": 9 * 64 * 64 * SIZE * SIZE * 16, "attn": 2 * 4096 * 16384 * 64}
    macs["mem"] = 11.5 * x.numel()
    return {"conv": conv, "attn": attn, "mem": memory_bound}, macs


def profiled_peak_bytes(fn) -> int:
    """Peak of live tensor bytes allocated during ``fn()``, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def child(name: str, S: int, repeats: int) -> dict:
    from megaseg import create_model
    from megaseg.models.attention import total_cost

    torch.manual_seed(0)
    model = create_model(name).eval()
    q = torch.rand(1, 1, SIZE, SIZE)
    si, sl = torch.rand(1, S, 1, SIZE, SIZE), (torch.rand(1, S, 1, SIZE, SIZE) > 0.5).float()

    def run():
        with torch.inference_mode():
            model(q, si, sl)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    run()
    rss_delta = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    peak = profiled_peak_bytes(run)
    calib, calib_macs = calibration()
    ms = best_ms({"model": run, **calib}, repeats)
    return {
        "name": name,
        "S": S,
        "params": sum(p.numel() for p in model.parameters()),
        "cost": total_cost(model, S, SIZE, SIZE),
        "profiler_bytes": peak,
        "rss_bytes": rss_delta,
        "ms": ms["model"],
        "rate": {k: calib_macs[k] / ms[k] / 1e6 for k in calib},  # G MAC/s, G elements/s
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats)))
        return

    load_before = os.getloadavg()[0]
    rows = []
    for S in args.sizes:
        for name in args.variants:
            cmd = [sys.executable, __file__, "--threads", str(args.threads)]
            cmd += ["--repeats", str(args.repeats), "--child", name, str(S)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done {name} S={S}", file=sys.stderr)

    mb = 2**20
    lines = [
        f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}; 1 query "
        f"{SIZE}x{SIZE}, fp32, inference, fast path; best of {args.repeats}. R_conv, R_attn "
        "(G MAC/s), R_mem (G elements/s): throughputs calibrated in the same process, "
        "interleaved with the forwards. Model ms = conv / R_conv + attn / R_attn + traffic / "
        "R_mem. Machine "
        f"shared (load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after).",
        "",
        "| variant | params | S | GMAC conv | GMAC attn | G elem traffic | R_conv, R_attn, "
        "R_mem | model ms | measured ms | ratio | model MB | profiler MB | ratio "
        "| RSS growth MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, rate = r["cost"], r["rate"]
        work = {"conv": c["conv_macs"], "attn": c["attn_macs"], "mem": c["traffic_elements"]}
        model_ms = sum(work[k] / rate[k] / 1e6 for k in work)
        model_mb = c["peak_elements"] * 4 / mb
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r['S']} | {c['conv_macs'] / 1e9:.1f} "
            f"| {c['attn_macs'] / 1e9:.1f} | {c['traffic_elements'] / 1e9:.2f} "
            f"| {rate['conv']:.0f}, {rate['attn']:.0f}, {rate['mem']:.2f} "
            f"| {model_ms:.0f} | {r['ms']:.0f} "
            f"| {r['ms'] / model_ms:.2f} | {model_mb:.0f} | {r['profiler_bytes'] / mb:.0f} "
            f"| {r['profiler_bytes'] / mb / model_mb:.2f} | {r['rss_bytes'] / mb:.0f} |"
        )
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
