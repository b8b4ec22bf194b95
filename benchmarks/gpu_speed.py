"""GPU rows: training throughput and memory, inference latency and memory, fast path.

    python benchmarks/gpu_speed.py [--repeats 10] [--no-compile] [--out gpu_speed.md]

Training: one optimizer step (forward + backward + Adam) of UniverSeg v1 at B=8, S=64,
128x128, for the shipped 32-feature width and the published 64-feature one: fp32, bf16
autocast, and bf16 autocast + ``torch.compile`` (64 features). Inference: one query at
128x128 with S = 1, 16, 64, fp32 and bf16 autocast. Each row: the median of ``--repeats``
timed runs after warm-up, every run ended by ``torch.cuda.synchronize``; memory is
``torch.cuda.max_memory_allocated`` over the row (the allocator's peak, not nvidia-smi's).
Without CUDA it prints that and exits 0.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py (the script's folder is on sys.path)
from train_speed import median_seconds, sync, train_step_fn

from megaseg import create_model


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` (which synchronizes) over ``repeats`` runs after ``warmup``
    calls (train_speed's ``median_seconds`` makes the last one)."""
    for _ in range(warmup - 1):
        fn()
    return median_seconds({"fn": fn}, repeats)["fn"]


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def train_rows(
    repeats: int, compile_: bool, device=None, B: int = 8, S: int = 64, R: int = 128
) -> Iterator[tuple[str, str, str]]:
    device = device or torch.device("cuda")
    variants = [(32, "fp32"), (32, "bf16"), (64, "fp32"), (64, "bf16")]
    if compile_:
        variants.append((64, "bf16 + torch.compile"))
    for width, v in variants:
        torch.manual_seed(0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = create_model("universeg_v1", encoder_widths=[width] * 4).to(device).train()
        if "compile" in v:
            model.compile()
        fn = train_step_fn(model, B, S, R, device, fast=True, bf16="bf16" in v)
        sec = timed(fn, repeats, warmup=3 if "compile" in v else 2)
        yield (f"train step, {width} features, B={B} S={S} {R}x{R}, {v}",
               f"{B / sec:.1f} ex/s ({sec * 1e3:.1f} ms/step)", f"{peak_gib():.2f}")  # fmt: skip


def inference_fn(model, S: int, device, bf16: bool):
    """One forward of ``model`` on one 128x128 query with ``S`` supports, synchronized."""
    g = torch.Generator().manual_seed(0)
    q = torch.rand(1, 1, 128, 128, generator=g).to(device)
    si = torch.rand(1, S, 1, 128, 128, generator=g).to(device)
    sl = (torch.rand(1, S, 1, 128, 128, generator=g) > 0.5).float().to(device)

    def fn() -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, bf16):
            model(q, si, sl, fast=True)
        sync(device)

    return fn


def inference_rows(repeats: int, device=None, sizes=(1, 16, 64)) -> Iterator[tuple[str, str, str]]:
    device = device or torch.device("cuda")
    for width in (32, 64):
        torch.manual_seed(0)
        model = create_model("universeg_v1", encoder_widths=[width] * 4).to(device).eval()
        for S in sizes:
            for bf16 in (False, True):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                sec = timed(inference_fn(model, S, device, bf16), repeats, warmup=3)
                yield (f"inference, {width} features, 1 query 128x128, S={S}, "
                       f"{'bf16' if bf16 else 'fp32'}",
                       f"{sec * 1e3:.2f} ms", f"{peak_gib():.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_speed: no CUDA device: nothing measured")
        return
    torch.backends.cudnn.benchmark = True
    header = [
        f"GPU: {torch.cuda.get_device_name()}; host CPU: {cpu_name()}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, Python "
        f"{platform.python_version()}; cudnn.benchmark on; median of {args.repeats}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| case | speed | peak GiB |",
        "|---|---:|---:|",
    ]
    emit_lines(header, args.out, "w")
    # Row by row, so that a run stopped by a time limit (the compile row is the slow one) keeps
    # what it measured.
    for rows in (lambda: inference_rows(args.repeats),
                 lambda: train_rows(args.repeats, not args.no_compile)):  # fmt: skip
        for a, b, c in rows():
            emit_lines([f"| {a} | {b} | {c} |"], args.out, "a")


def emit_lines(lines: list[str], out: Path | None, mode: str) -> None:
    print("\n".join(lines), flush=True)
    if out:
        with out.open(mode) as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
