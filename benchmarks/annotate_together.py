"""Structures that continue one another, labelled together: the chest CT's vertebral column.

``benchmarks/annotate_volumes.py`` segments each structure on its own. For the three vertebral
column sections of 3D Slicer's chest CT (slicerio; cervical, thoracic, lumbar) that makes the
session follow the column past a section's end, where it looks the same, and it falls below a
copy of the nearest labelled slice there. A user annotating the spine labels the sections
together: here, for k = 1..10, k slices spread evenly over each section's extent (as in
annotate_volumes.py) are labelled with every section present on them, in one session, and
each section's volume Dice is compared with the fills without a model from the same slices.

    python benchmarks/annotate_together.py          # docs/results/annotate_together.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from annotate_loop import BASELINES, baselines_available  # noqa: E402
from annotate_volumes import VOLUMES, _checkpoint, even_slices, extent, load  # noqa: E402
from machine import cpu_name, emit  # noqa: E402

from megaseg import Segmenter  # noqa: E402
from megaseg.annotate import VolumeSession  # noqa: E402
from megaseg.metrics import mask_dice  # noqa: E402

SECTIONS = {"cervical spine": 2, "thoracic spine": 3, "lumbar spine": 4}


def labelled_together(labels: np.ndarray, k: int) -> dict[int, np.ndarray]:
    """The slices k per section spread evenly over its extent, each with every section on it."""
    given: dict[int, np.ndarray] = {}
    for value in SECTIONS.values():
        first, last = extent(labels == value, 2)
        for i in even_slices(first, last, k):
            given[i] = np.where(
                np.isin(labels[:, :, i], list(SECTIONS.values())), labels[:, :, i], 0
            )
    return given


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default="megaseg_generalist")
    p.add_argument("--ks", type=int, nargs="+", default=list(range(1, 11)))
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    (volume,) = [v for v in VOLUMES if v.spec == "PkgSlicerioChest"]
    image, labels, affine = load(volume)
    seg = Segmenter.from_checkpoint(_checkpoint(args.checkpoint), device="cpu")
    session = VolumeSession(
        seg, image, axis=volume.axis, affine=affine, progress=False, modality="CT"
    )
    fills = {name: BASELINES[name] for name in baselines_available()}
    methods = [*fills, "guided"]
    t0 = time.perf_counter()
    dice: dict[tuple[str, int, str], float] = {}
    for k in args.ks:
        given = labelled_together(labels, k)
        for i in session.labelled:
            session.remove(i)
        for i, lab in given.items():
            session.add(i, lab)
        filled = {m: np.moveaxis(f(given, labels.shape[2]), 0, 2) for m, f in fills.items()}
        filled["guided"] = session.segment().labels
        for name, value in SECTIONS.items():
            for m in methods:
                dice[name, k, m] = mask_dice(filled[m] == value, labels == value, empty=0.0)
        print(
            f"k={k:2d} " + " ".join(f"{n} {dice[n, k, 'guided']:.3f}" for n in SECTIONS), flush=True
        )
    lines = [
        "# Vertebral column sections labelled together (chest CT)",
        "",
        f"{volume.name} {image.shape}, axis {volume.axis}. Checkpoint `{args.checkpoint}` (it "
        "never saw this scan). For each k, k slices spread evenly over each section's extent "
        "are labelled with every section on them, in one `VolumeSession` (defaults, "
        "`modality='CT'`); nearest / ITK fill from the same slices. Volume Dice per section.",
        "",
        "| section | method | " + " | ".join(f"k={k}" for k in args.ks) + " |",
        "|---|---|" + "---:|" * len(args.ks),
    ]
    for name in SECTIONS:
        for m in methods:
            lines.append(
                f"| {name} | {m} | " + " | ".join(f"{dice[name, k, m]:.3f}" for k in args.ks) + " |"
            )
    below = [
        f"{n} k={k} ({dice[n, k, 'guided'] - dice[n, k, 'nearest']:+.3f})"
        for n in SECTIONS
        for k in args.ks
        if dice[n, k, "guided"] < dice[n, k, "nearest"] - 0.02
    ]
    lines += [
        "",
        f"Section and k where guided is more than 0.02 below nearest: {len(below)} of "
        f"{len(SECTIONS) * len(args.ks)}" + (": " + ", ".join(below) if below else "") + ".",
        "",
        f"Machine: {cpu_name()}, 1 thread; {time.perf_counter() - t0:.0f} s.",
        f"Command: `{' '.join(['python benchmarks/annotate_together.py', *(argv or sys.argv[1:])])}`.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    emit("\n".join(lines), args.out / "annotate_together.md")


if __name__ == "__main__":
    main()
