"""How many synthetic training labels are unlearnable speckle, per task kind and resolution.

A label example is *fragmented* when its mask falls apart into >= 8 connected components of
fewer than 6 pixels on average: at that point the "structure" is pixel noise (e.g. MNI152's
cortical ribbon rendered at half zoom on a 64 px grid), which no support set can define.

    python benchmarks/synthetic_label_quality.py --tasks 300 --resolutions 64 128

Prints (and with ``--out`` writes) a table: per generator kind, label examples scored and the
fragmented share. Generator v2 with the MNI152 label maps (what training uses by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_name, emit  # noqa: E402

from data_prep.label_maps import make_tasks  # noqa: E402
from megaseg.data.synthetic.versions import make_config  # noqa: E402

MIN_COMPONENTS, MAX_MEAN_SIZE = 8, 6.0


def fragmented(mask: np.ndarray) -> bool:
    """``mask (H, W)`` bool: >= 8 components averaging < 6 px."""
    _, n = ndimage.label(mask)
    return n >= MIN_COMPONENTS and mask.sum() / n < MAX_MEAN_SIZE


def measure(num_tasks: int, size: int, subjects: int = 4) -> dict[str, list[bool]]:
    config = make_config(2, None, size=size)
    gen = make_tasks(2, num_tasks, 0, config, "mni152")
    out: dict[str, list[bool]] = defaultdict(list)
    for t in range(num_tasks):
        kind = gen._params(t).kind
        for label in range(gen.num_labels(t)):
            _, masks = gen.batch(t, label, range(subjects))
            out[kind] += [fragmented(m) for m in masks[:, 0].numpy() > 0.5]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    lines = ["| resolution | kind | label examples | fragmented |", "|---|---|---:|---:|"]
    start = time.perf_counter()
    for size in args.resolutions:
        result = measure(args.tasks, size)
        for kind, flags in sorted(result.items()):
            lines.append(f"| {size} | {kind} | {len(flags)} | {100 * np.mean(flags):.1f}% |")
        every = [f for flags in result.values() for f in flags]
        lines.append(f"| {size} | **all** | {len(every)} | **{100 * np.mean(every):.1f}%** |")
    seconds = time.perf_counter() - start
    lines += [
        "",
        f"Generator v2, MNI152 label maps, training tasks 0-{args.tasks - 1}, 4 subjects each; "
        f"fragmented = >= {MIN_COMPONENTS} components averaging < {MAX_MEAN_SIZE:g} px. "
        f"{cpu_name()}, {seconds:.0f} s.",
    ]
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
