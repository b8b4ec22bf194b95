"""Corpus build throughput and episode read latency.

    python benchmarks/corpus_speed.py [--cases 4] [--size 256] [--subjects 300] [--episodes 200]

1. Build: ``--cases`` CT-like volumes of ``size^3`` voxels (int16, 0.8 x 0.8 x 1.5 mm, LPS
   affine, 3 labels) written as an nnU-Net dataset in a temporary folder, built at 64/128/256
   with 1 and 2 workers (cases/s, whole build including consolidation and manifest).
2. Read: one training episode = query + 64 support examples of one random task at 128x128,
   random indices, through ``Corpus.load_many``, from a corpus of ``--subjects`` 2D subjects
   (page cache warm, as during training). Target: under 5 ms per episode. The same rows read
   from a float16 copy of the arrays show the uint8-vs-float16 storage trade-off.

Prints a markdown table with the CPU model and thread counts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from machine import cpu_name  # benchmarks/machine.py (the script's folder is on sys.path)


def write_volumes(root: Path, n: int, size: int) -> Path:
    """An nnU-Net dataset of ``n`` CT-like ``size^3`` int16 volumes with three nested blobs."""
    import json

    import nibabel as nib

    affine = np.diag([-0.8, -0.8, 1.5, 1.0])
    grid = np.indices((size,) * 3, dtype=np.float32)
    for i in range(n):
        rng = np.random.default_rng(i)
        centre = size / 2 + rng.uniform(-size / 10, size / 10, 3)
        r = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) / size
        label = np.select([r < 0.08, r < 0.2, r < 0.35], [3, 2, 1], 0).astype(np.uint8)
        image = (
            np.array([-1000, 40, 200, 600], np.float32)[label] + rng.normal(0, 30, label.shape)
        ).astype(np.int16)
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(
            nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"vol_{i:03d}_0000.nii.gz")
        )
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"vol_{i:03d}.nii.gz"))
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "body": 1, "organ": 2, "core": 3},
            "numTraining": n, "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def bench_build(tmp: Path, n: int, size: int) -> list[tuple[str, str]]:
    from data_prep.pipeline import build_corpus, job_from_spec
    from data_prep.specs import spec_from_path

    t0 = time.perf_counter()
    root = write_volumes(tmp / "Dataset500_Bench", n, size)
    rows = [
        (
            f"write {n} volumes {size}^3 (fixture, not timed below)",
            f"{time.perf_counter() - t0:.1f} s",
        )
    ]
    spec = spec_from_path(root)
    for workers in (1, 2):
        out = tmp / f"corpus_w{workers}"
        job = job_from_spec(spec, root)
        t0 = time.perf_counter()
        summary = build_corpus(
            [job], out, workers=workers, resolutions=(64, 128, 256), progress=False
        )
        dt = time.perf_counter() - t0
        assert summary.ok, summary.text()
        rows.append(
            (
                f"build, {workers} worker(s), {n} cases {size}^3 -> 64/128/256",
                f"{n / dt:.2f} cases/s ({dt:.1f} s)",
            )
        )
    return rows


def bench_read(tmp: Path, subjects: int, episodes: int) -> list[tuple[str, str]]:
    from data_prep.pipeline import write_dataset
    from data_prep.readers import LoadedCase
    from data_prep.store_writer import memory_case
    from megaseg.data import Corpus

    class Source:
        def __call__(self, case):
            rng = np.random.default_rng(int(case.case_id[1:]))
            label = (rng.random((8, 8)) > 0.5).repeat(20, 0).repeat(20, 1).astype(np.int64)
            label[0, 0] = 2
            return LoadedCase(rng.random((1, 160, 160), dtype=np.float32), label, None, ["MR"])

    cases = [memory_case("Read", f"c{i}", f"s{i}", {1: "a", 2: "b"}) for i in range(subjects)]
    spec = SimpleNamespace(name="Read", source="benchmarks/corpus_speed.py")
    out = tmp / "read"
    write_dataset(
        out, spec, cases, Source(), lambda c: c.case_id, resolutions=(128,), progress=False
    )
    corpus = Corpus(out)
    tasks = [k for k in corpus.tasks("train") if corpus.num_examples(k, "train") >= 65]
    rng = np.random.default_rng(0)

    def episode_times(read) -> np.ndarray:
        times = []
        for _ in range(episodes):
            key = tasks[rng.integers(len(tasks))]
            idx = rng.choice(corpus.num_examples(key, "train"), 65, replace=False)
            t0 = time.perf_counter()
            read(key, idx)
            times.append(time.perf_counter() - t0)
        return np.array(times) * 1000

    for _ in range(2):  # warm the page cache and the memory maps
        episode_times(lambda k, i: corpus.load_many(k, i, 128, "train"))
    u8 = episode_times(lambda k, i: corpus.load_many(k, i, 128, "train"))

    # float16 alternative: the same rows from float16 arrays (values / 255), converted to float32
    folder = out / "datasets" / "Read"
    f16 = {}
    for kind in ("images", "labels"):
        src = np.load(folder / f"{kind}_128.npy", mmap_mode="r")
        np.save(tmp / f"{kind}_f16.npy", (src / np.float32(255)).astype(np.float16))
        f16[kind] = np.load(tmp / f"{kind}_f16.npy", mmap_mode="r")
    examples = np.load(folder / "examples.npy")
    ranges = {t: corpus._ranges[t]["train"] for t in tasks}

    def read_f16(key, idx):
        rows = examples[ranges[key][0] + idx]
        return f16["images"][rows[:, 4]].astype(np.float32), f16["labels"][rows[:, 5]].astype(
            np.float32
        )

    episode_times(read_f16)
    f16_times = episode_times(read_f16)
    size_u8 = sum((folder / f"{k}_128.npy").stat().st_size for k in ("images", "labels"))
    size_f16 = sum((tmp / f"{k}_f16.npy").stat().st_size for k in ("images", "labels"))
    n_ex = len(examples)
    return [
        (f"episode read, uint8 store (1+64 at 128x128, {len(tasks)} tasks)",
         f"median {np.median(u8):.2f} ms, p95 {np.percentile(u8, 95):.2f} ms"),
        ("episode read, float16 arrays (alternative)",
         f"median {np.median(f16_times):.2f} ms, p95 {np.percentile(f16_times, 95):.2f} ms"),
        ("bytes per example at 128 (image + label)",
         f"uint8 {size_u8 / n_ex / 1024:.1f} KiB, float16 {size_f16 / n_ex / 1024:.1f} KiB"),
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--subjects", type=int, default=300)
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--skip-build", action="store_true")
    args = p.parse_args()

    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="corpus_speed_") as tmp:
        if not args.skip_build:
            rows += bench_build(Path(tmp), args.cases, args.size)
        rows += bench_read(Path(tmp), args.subjects, args.episodes)
    print(f"\nCPU: {cpu_name()}; {os.cpu_count()} logical CPUs; torch threads {torch.get_num_threads()} "
          f"(builds use 1 per worker); load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
