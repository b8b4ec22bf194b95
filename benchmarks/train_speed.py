"""Training throughput: one optimizer step (forward + backward + Adam), and the episode pipeline.

    python benchmarks/train_speed.py [--threads 2] [--repeats 2] [--quick] [--corpus PATH]

Rows, in training examples (queries) per second:

- CPU, UniverSeg v1 (64 features), naive (published) vs fast forward path, at S=64 128x128
  (B=1; the paper's recipe) and S=8 64x64 (B=8). Naive and fast steps are interleaved so load
  from other processes hits both alike; the median of the repeats is reported.
- GPU (only with CUDA), S=64 128x128 B=8, fast path: fp32, bf16 autocast, bf16 autocast +
  ``torch.compile``; "not measured (no GPU)" otherwise.
- Data pipeline, one process (what one DataLoader worker does): episodes per second of
  synthetic tasks (and of ``--corpus`` when given), augmentation off and on (reference
  task-level + in-task settings), S=64 128x128.

``--quick`` skips the S=64 128x128 CPU row (tens of seconds per step on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py (the script's folder is on sys.path)

from megaseg import create_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_fn(
    model, B: int, S: int, R: int, device, fast: bool, bf16: bool = False
) -> Callable[[], None]:
    """One optimizer step of ``model`` on a fixed random batch (B episodes, S supports, RxR)."""
    g = torch.Generator().manual_seed(0)
    q = torch.rand(B, 1, R, R, generator=g).to(device)
    y = (torch.rand(B, 1, R, R, generator=g) > 0.5).float().to(device)
    si = torch.rand(B, S, 1, R, R, generator=g).to(device)
    sl = (torch.rand(B, S, 1, R, R, generator=g) > 0.5).float().to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(q, si, sl, fast=fast)
        p = torch.sigmoid(logits.float())
        loss = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)  # soft Dice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)

    return step


def median_seconds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up (and compilation)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_rows(repeats: int, quick: bool) -> list[tuple[str, str]]:
    rows = []
    settings = [(8, 8, 64)] if quick else [(1, 64, 128), (8, 8, 64)]
    for B, S, R in settings:
        torch.manual_seed(0)
        model = create_model("universeg_v1").train()
        fns = {f: train_step_fn(model, B, S, R, torch.device("cpu"), fast=f == "fast")
               for f in ("naive", "fast")}  # fmt: skip
        sec = median_seconds(fns, repeats)
        speedup = sec["naive"] / sec["fast"]
        for name in ("naive", "fast"):
            rows.append((f"CPU train step, v1, B={B} S={S} {R}x{R}, {name}",
                         f"{B / sec[name]:.2f} ex/s ({sec[name]:.2f} s/step)"
                         + (f", {speedup:.2f}x" if name == "fast" else "")))  # fmt: skip
    return rows


def gpu_rows(repeats: int) -> list[tuple[str, str]]:
    label = "GPU train step, v1, B=8 S=64 128x128, fast, {}"
    variants = ("fp32", "bf16 autocast", "bf16 autocast + torch.compile")
    if not torch.cuda.is_available():
        return [(label.format(v), "not measured (no GPU)") for v in variants]
    device = torch.device("cuda")
    rows = []
    for v in variants:
        torch.manual_seed(0)
        model = create_model("universeg_v1").to(device).train()
        if "compile" in v:
            model.compile()
        fn = train_step_fn(model, 8, 64, 128, device, fast=True, bf16="bf16" in v)
        fn()  # an extra warm-up: compilation
        sec = median_seconds({"x": fn}, max(repeats, 5))["x"]
        rows.append((label.format(v) + f" ({torch.cuda.get_device_name(device)})",
                     f"{8 / sec:.1f} ex/s ({sec * 1e3:.0f} ms/step)"))  # fmt: skip
    return rows


def data_rows(repeats: int, corpus: str | None) -> list[tuple[str, str]]:
    from megaseg.data.synthetic import SyntheticConfig, SyntheticTasks
    from megaseg.data.tasks import (
        TRAIN_STREAM,
        CorpusTaskSource,
        EpisodeSampler,
        SyntheticTaskSource,
    )
    from megaseg.training.datamodule import make_augment

    sources = {
        "synthetic": SyntheticTaskSource(SyntheticTasks(1000, config=SyntheticConfig(size=128)))
    }
    if corpus:
        from megaseg.data.store import Corpus

        sources["corpus"] = CorpusTaskSource(Corpus(corpus), "train", 128)
    rows = []
    B, n = 8, max(2, repeats)
    for name, source in sources.items():
        for aug in (None, "reference"):
            sampler = EpisodeSampler(
                [source], batch_size=B, support_size=64, augment=make_augment(aug)
            )
            sampler.batch(0, TRAIN_STREAM, 0, 10**6)  # warm-up (caches, first-call costs)
            start = time.perf_counter()
            for step in range(n):
                sampler.batch(0, TRAIN_STREAM, 0, step)
            eps = B * n / (time.perf_counter() - start)
            rows.append((f"data, {name} episodes, S=64 128x128, augment {aug or 'off'}, 1 process",
                         f"{eps:.2f} episodes/s"))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip the S=64 128x128 CPU row")
    parser.add_argument("--corpus", help="also time episodes from this corpus")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = cpu_rows(args.repeats, args.quick) + gpu_rows(args.repeats)
    torch.set_num_threads(1)  # a DataLoader worker runs one thread
    rows += data_rows(args.repeats, args.corpus)
    lines = [
        f"CPU: {cpu_name()}, {args.threads} threads for training rows, 1 for data rows; "
        f"torch {torch.__version__}",
        "",
        "| setting | throughput |",
        "|---|---|",
        *(f"| {a} | {b} |" for a, b in rows),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
