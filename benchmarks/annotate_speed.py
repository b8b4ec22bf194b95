"""The first guided ``segment()``: CPU seconds and Dice, the model on every slice or every 3rd.

``VolumeSession(stride=...)`` sets how many of the slices the guided session fills get a model
prediction (1: all; the default 3: every 3rd of each run and its last, the rest mixed from
their neighbours). This measures both on the README's timing case (``time_large`` of
``benchmarks/annotate_loop.py``: MNI152 resampled to 128x128x200, 5 labelled slices, one torch
thread), alternating the two settings round by round in one process so that other jobs on the
machine weigh on both alike, in CPU seconds (``time.process_time``; the JSON also has the wall
seconds of each whole ``time_large`` run).
Then (unless ``--no-volumes``) it runs ``benchmarks/annotate_volumes.py`` on its structures
(all, or ``--structures``; guided only, k = 1..10, no which-slice-next) once per stride,
VolumeSession's default stride set for the run, and tabulates the Dice of both.

    python benchmarks/annotate_speed.py                     # docs/results/annotate_speed.md
    python benchmarks/annotate_speed.py --rounds 1 --structures "R caudate" --out /tmp/speed
    python benchmarks/annotate_speed.py --rounds 1 --no-volumes --out /tmp/speed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import annotate_volumes  # noqa: E402
from annotate_loop import time_large  # noqa: E402
from machine import cpu_name, emit  # noqa: E402
from readme_timings import cpu_clock  # noqa: E402

from megaseg import Segmenter  # noqa: E402
from megaseg.annotate import VolumeSession  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def default_stride(stride: int):
    """Inside: ``VolumeSession(...)`` without a ``stride`` argument uses ``stride``."""
    defaults = VolumeSession.__init__.__kwdefaults__
    saved = defaults["stride"]
    defaults["stride"] = stride
    try:
        yield
    finally:
        defaults["stride"] = saved


def first_segment(seg, stride: int) -> dict:
    """``time_large`` with ``stride``: the first call's CPU and wall seconds, slices, Dice."""
    wall = time.perf_counter()
    with cpu_clock():
        run = time_large(seg, {"stride": stride})
    return {
        "cpu_s": run["first_s"],
        "run_wall_s": time.perf_counter() - wall,  # the whole time_large, add() etc. included
        "predicted": run["first_predicted"],
        "dice": run["dice_first"],
    }


def volume_dice(strides: list[int], structures: list[str]) -> dict[int, dict]:
    """Per stride: ``{"dice": {"structure|k": Dice}, "seconds": mean wall s of a segment()}``
    from annotate_volumes.py (guided, k = 1..10)."""
    out = {}
    for stride in strides:
        with tempfile.TemporaryDirectory() as tmp, default_stride(stride):
            annotate_volumes.main(
                ["--only", *structures, "--methods", "guided", "--no-suggest", "--out", tmp]
            )
            rows = json.loads((Path(tmp) / "annotate_volumes.json").read_text())["rows"]
        out[stride] = {
            "dice": {f"{r['structure']}|{r['k']}": r["dice"] for r in rows},
            "seconds": float(np.mean([r["seconds"] for r in rows])),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="megaseg_generalist")
    p.add_argument("--strides", type=int, nargs="+", default=[1, 3])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the timing")
    p.add_argument("--no-volumes", action="store_true", help="skip the Dice on real structures")
    p.add_argument("--structures", nargs="+", default=None,
                   help="of benchmarks/annotate_volumes.py (default: all)")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/annotate_speed",
                   help="writes OUT.md and OUT.json")  # fmt: skip
    args = p.parse_args(argv)
    if args.structures is None:
        args.structures = [s for v in annotate_volumes.VOLUMES for s in v.structures]

    load_before = os.getloadavg()
    torch.set_num_threads(1)
    seg = Segmenter.from_checkpoint(args.checkpoint, device="cpu")
    timing: dict[int, list[dict]] = {s: [] for s in args.strides}
    for r in range(args.rounds):
        for stride in args.strides:
            timing[stride].append(first_segment(seg, stride))
            t = timing[stride][-1]
            print(f"round {r + 1} stride {stride}: {t['cpu_s']:.2f} CPU s, "
                  f"{t['predicted']} slices, Dice {t['dice']:.4f}", flush=True)  # fmt: skip
    dice = {} if args.no_volumes else volume_dice(args.strides, args.structures)
    load_after = os.getloadavg()

    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores (1 torch thread), torch {torch.__version__}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    lines = [
        "# The first guided `segment()`: the model on every slice or every 3rd",
        "",
        f"Measured by `benchmarks/annotate_speed.py` on {machine}. Checkpoint "
        f"`{args.checkpoint}` ({seg.resolution} px); MNI152 resampled to 128x128x200, axis 2, "
        f"5 labelled slices (`time_large` of `benchmarks/annotate_loop.py`); {args.rounds} "
        "rounds, the settings alternating within each. `stride=1` is the previous code path "
        "(the same labels and uncertainty bit for bit, checked when `stride` was added).",
        "",
        "| `stride` | first `segment()`, CPU s (median; all rounds) | slices predicted | "
        "volume Dice (both labels) |",
        "|---:|---|---:|---:|",
    ]
    for stride, runs in timing.items():
        if not runs:  # --rounds 0: the Dice alone
            continue
        cpu = [t["cpu_s"] for t in runs]
        lines.append(
            f"| {stride} | {np.median(cpu):.1f} ({', '.join(f'{c:.1f}' for c in cpu)}) | "
            f"{runs[0]['predicted']} | {runs[0]['dice']:.4f} |"
        )
    if dice:
        first, *rest = args.strides
        keys = list(dice[first]["dice"])
        lines += [
            "",
            f"Volume Dice on {len(args.structures)} real structures (`benchmarks/"
            "annotate_volumes.py --only "
            + " ".join(f'"{s}"' for s in args.structures)
            + " --methods guided --no-suggest`, k = 1..10 evenly spread slices), mean over "
            "structures and k, and the largest changes of one structure at one k against "
            f"`stride={first}`:",
            "",
            "| `stride` | mean Dice | mean change | worst | best | mean wall s per segment() |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {first} | {np.mean([dice[first]['dice'][k] for k in keys]):.4f} | | | | "
            f"{dice[first]['seconds']:.1f} |",
        ]
        for stride in rest:
            d = np.array([dice[stride]["dice"][k] - dice[first]["dice"][k] for k in keys])
            worst, best = keys[int(d.argmin())], keys[int(d.argmax())]
            lines.append(
                f"| {stride} | {np.mean([dice[stride]['dice'][k] for k in keys]):.4f} | "
                f"{d.mean():+.4f} | {d.min():+.3f} ({worst.replace('|', ', k=')}) "
                f"| {d.max():+.3f} ({best.replace('|', ', k=')}) | {dice[stride]['seconds']:.1f} |"
            )
    record = {"machine": machine, "checkpoint": args.checkpoint, "timing": timing, "dice": dice}
    emit("\n".join(lines), args.out.with_suffix(".md"))
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
