"""``torch.compile`` with support sizes drawn log-uniformly vs. from power-of-two buckets (#21).

    python benchmarks/compile_buckets.py [--device cpu|cuda] [--resolution 16] [--width 4]
        [--batch 1] [--support 2 8] [--steps 6] [--out table.md]

One training step = forward + Dice/CE loss + backward + Adam on a UniverSeg v1 network with
``--width`` features, ``--batch`` episodes of ``--resolution`` px. A run draws ``--steps``
support sizes in ``[lo, hi]`` (``--support``) the way the data module does: log-uniformly
(``support_size_log``, the #13 recipe) or uniformly among the powers of two
(``support_size_buckets``), the same sequence for each mode:

* eager: no compilation;
* compiled: ``net.compile()`` as ``model.compile: true`` does (dynamic shapes decided by torch:
  a second size makes it recompile with S symbolic);
* compiled, static: ``net.compile(dynamic=False)``: one graph per support size, up to torch's
  recompile limit, after which it runs eagerly.

Reported per (draw, mode): graphs compiled (``torch._dynamo`` counters), time of the first pass
(compilation included) and of a second pass over the same sizes (steady state), in ms per
step. The CPU defaults are tiny so the table finishes in about 4.5 minutes on 2 quiet cores
(the CPU compiler takes seconds per graph whatever the size); on a GPU use
e.g. ``--device cuda --resolution 128 --width 32 --batch 16 --support 2 64``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name, emit  # benchmarks/machine.py (the script's folder is on sys.path)

from megaseg import create_model
from megaseg.data.tasks import support_buckets


def draw_sizes(kind: str, lo: int, hi: int, n: int, seed: int = 0) -> list[int]:
    """``n`` support sizes as :class:`~megaseg.data.tasks.EpisodeSampler` draws them."""
    rng = np.random.default_rng(seed)
    if kind == "buckets":
        buckets = support_buckets(lo, hi)
        return [buckets[int(rng.integers(len(buckets)))] for _ in range(n)]
    return [
        min(hi, max(lo, int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))))) for _ in range(n)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(mode: str, sizes: list[int], args, device: torch.device) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    net = create_model("universeg_v1", encoder_widths=[args.width] * 4).to(device)
    if mode == "compiled":
        net.compile()
    elif mode == "compiled, static":
        net.compile(dynamic=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    B, R = args.batch, args.resolution
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step(S: int) -> None:
        q = torch.rand(B, 1, R, R, device=device)
        si = torch.rand(B, S, 1, R, R, device=device)
        sl = (torch.rand(B, S, 1, R, R, device=device) > 0.5).float()
        y = (q > 0.5).float()
        with autocast:
            logits = net(q, si, sl)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    passes = []
    for _ in range(2):
        sync(device)
        t = time.perf_counter()
        for S in sizes:
            step(S)
        sync(device)
        passes.append(1000 * (time.perf_counter() - t) / len(sizes))
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return {"graphs": graphs, "first": passes[0], "steady": passes[1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--support", type=int, nargs=2, default=(2, 8), metavar=("LO", "HI"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--modes", nargs="+", default=["eager", "compiled", "compiled, static"])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    lo, hi = args.support
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    rows = []
    for kind in ("log-uniform", "buckets"):
        sizes = draw_sizes(kind, lo, hi, args.steps)
        for mode in args.modes:
            print(f"{kind} / {mode} ...", flush=True)
            r = run(mode, sizes, args, device)
            rows.append(
                f"| {kind} ({len(set(sizes))} sizes, mean S {np.mean(sizes):.1f}) | {mode} | "
                f"{r['graphs']} | {r['first']:.0f} | {r['steady']:.0f} |"
            )
            print(rows[-1], flush=True)  # kept in a log when a time limit stops the script
    table = "\n".join(
        [
            f"torch.compile and support-size draws: UniverSeg v1 width {args.width}, "
            f"{args.resolution} px, B={args.batch}, S in [{lo}, {hi}], {args.steps} training "
            f"steps per pass; {machine}; torch {torch.__version__}",
            "",
            "| S draw | mode | graphs compiled | ms/step, first pass (compiling) | "
            "ms/step, second pass |",
            "|---|---|---:|---:|---:|",
            *rows,
        ]
    )
    emit(table, args.out)


if __name__ == "__main__":
    main()
