"""Episode augmentation throughput: where should it run, DataLoader workers or the GPU?

Measures ``EpisodeAugment()`` (reference task-level + in-task settings) in episodes/s on
episodes of 1 query + S support examples at HxW:

* CPU, 1 thread, B=1: what one DataLoader worker does per episode;
* CPU, 1 thread, B=8: the same work batched over 8 episodes;
* CUDA, B=8 and B=32 on the training device (or "not measured (no GPU)").

Optionally (``--albumentations``, if installed) the same transform set with albumentations,
one example at a time, task-level draws replayed over the episode (``ReplayCompose``).

    python benchmarks/augment_speed.py [--support 64] [--size 128] [--min-seconds 3]

Timings: median over repeated calls after a warm-up, each call with a fresh generator seed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from megaseg.data.augment import EpisodeAugment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_episodes(
    batch: int, examples: int, size: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images and soft blob labels ``(B, N, 1, H, W)`` in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch * examples, 2, 8, 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)
    images = smooth[:, :1]
    labels = (8 * (smooth[:, 1:] - 0.5)).sigmoid()
    shape = (batch, examples, 1, size, size)
    return images.reshape(shape).to(device), labels.reshape(shape).to(device)


def median_seconds(
    fn: Callable[[int], object], min_seconds: float, sync: Callable[[], None]
) -> tuple[float, float]:
    """Median wall and process-CPU time of ``fn(call_index)`` over >= 5 calls and >=
    ``min_seconds``. On a shared machine the CPU time is the better estimate of what one
    uncontended core delivers (the wall time also counts waiting for a core)."""
    fn(-1)
    sync()
    wall: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(wall) < 5 or time.perf_counter() - start < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(len(wall))
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def rates(batch: int, seconds: tuple[float, float]) -> tuple[float, float]:
    """Episodes/s from (wall, cpu) seconds per call of ``batch`` episodes."""
    return batch / seconds[0], batch / max(seconds[1], 1e-9)


def bench_torch(batch: int, args, device: str) -> tuple[float, float]:
    augment = EpisodeAugment()
    images, labels = make_episodes(batch, 1 + args.support, args.size, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call(i: int) -> None:
        augment(images, labels, torch.Generator().manual_seed(1000 + i))

    return rates(batch, median_seconds(call, args.min_seconds, sync))


def bench_albumentations(args, coarse_elastic: bool) -> tuple[float, float]:
    """The reference transform set with albumentations, one episode, one thread.

    ``coarse_elastic``: ``GridDistortion`` (a coarse control grid, like ours) instead of
    ``ElasticTransform`` (a Gaussian-smoothed per-pixel field, ~10x slower)."""
    import albumentations as A
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    shift = 0.2

    def elastic(p: float):
        return (
            A.GridDistortion(num_steps=4, distort_limit=0.3, p=p)
            if coarse_elastic
            else A.ElasticTransform(p=p)
        )

    task = A.ReplayCompose(
        [
            A.Affine(rotate=(0, 360), scale=(0.8, 1.1), translate_percent=(-shift, shift), p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.2, p=0.5),
            A.GaussianBlur(sigma_limit=(0.1, 1.1), blur_limit=0, p=0.5),
            A.GaussNoise(std_range=(0.0, 0.05), p=0.5),
            A.Sharpen(p=0.5),
            elastic(0.25),
            A.OneOf([A.HorizontalFlip(p=1), A.VerticalFlip(p=1)], p=0.5),
            A.InvertImg(p=0.5),
        ]
    )
    in_task = A.Compose(
        [
            A.Affine(rotate=(0, 360), scale=(0.8, 1.1), translate_percent=(-shift, shift), p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=0.25),
            A.GaussianBlur(sigma_limit=(0.1, 1.1), blur_limit=0, p=0.25),
            A.GaussNoise(std_range=(0.0, 0.05), p=0.25),
            A.Sharpen(p=0.25),
            elastic(0.8),
        ]
    )
    images, labels = make_episodes(1, 1 + args.support, args.size, "cpu")
    images = [x[0].numpy() for x in images[0]]
    labels = [y[0].numpy() for y in labels[0]]

    def call(i: int) -> None:
        first = task(image=images[0], mask=labels[0])
        outs = [first]
        outs += [
            A.ReplayCompose.replay(first["replay"], image=x, mask=y)
            for x, y in zip(images[1:], labels[1:], strict=True)
        ]
        for out in outs:
            res = in_task(image=out["image"], mask=out["mask"])
            label = res["mask"]
            if np.random.rand() < 0.5:  # label inversion (no albumentations transform)
                label = 1.0 - label
            if np.random.rand() < 0.5:  # Sobel edge of the label
                gx = cv2.Sobel(label, cv2.CV_32F, 1, 0)
                gy = cv2.Sobel(label, cv2.CV_32F, 0, 1)
                cv2.magnitude(gx, gy)

    return rates(1, median_seconds(call, args.min_seconds, lambda: None))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--support", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--min-seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--albumentations", action="store_true", help="also time albumentations")
    args = p.parse_args(argv)

    examples = 1 + args.support
    print(
        f"CPU: {cpu_model()} ({torch.get_num_threads()} threads available), torch {torch.__version__}"
    )
    print(f"episodes of 1 + {args.support} examples at {args.size}x{args.size}\n")
    torch.set_num_threads(1)
    rows = [("torch, CPU 1 thread, B=1", bench_torch(1, args, "cpu"))]
    rows.append(("torch, CPU 1 thread, B=8", bench_torch(8, args, "cpu")))
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for batch in (8, 32):
            rows.append((f"torch, CUDA {name}, B={batch}", bench_torch(batch, args, "cuda")))
    else:
        rows.append(("torch, CUDA", None))
    if args.albumentations:
        try:
            import albumentations

            version = albumentations.__version__
            for coarse, what in ((False, "ElasticTransform"), (True, "GridDistortion")):
                name = f"albumentations {version} ({what}), CPU 1 thread, B=1"
                rows.append((name, bench_albumentations(args, coarse)))
        except ImportError as e:
            rows.append((f"albumentations ({e})", None))
    print(f"{'':<58} episodes/s   images/s   episodes per CPU-second")
    for name, rate in rows:
        if rate is None:
            print(f"{name:<58} not measured" + (" (no GPU)" if "CUDA" in name else ""))
            continue
        wall, per_cpu = rate
        cpu_text = "" if "cuda" in name.lower() else f"{per_cpu:10.1f}"
        print(f"{name:<58} {wall:10.1f} {wall * examples:10.0f}   {cpu_text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
