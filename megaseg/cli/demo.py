"""``megaseg demo``: segment a real brain MRI offline, with no argument and no download.

    megaseg demo                                  # shipped weights, else a 45 s synthetic model
    megaseg demo --checkpoint run/export/final.safetensors --support-size 16 --out demo/

Writes to ``--out`` (default ``megaseg_work/demo``, see :func:`megaseg.paths.work_dir`) and
ends by naming what it wrote. The data, the model and the scoring are :mod:`megaseg.demo`'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megaseg.cpu import idle_threads
from megaseg.demo import (
    AXES,
    DEFAULT_QUERIES,
    DEFAULT_SUPPORT_SIZE,
    DEFAULT_TRAIN_SECONDS,
    TASKS,
    load_demo_model,
    pick_slices,
    plot_demo,
    score,
)
from megaseg.paths import work_dir


def _parser() -> argparse.ArgumentParser:
    from megaseg.helpformat import DefaultsHelpFormatter

    p = argparse.ArgumentParser(
        prog="megaseg demo",
        description="Segment grey and white matter in the MNI152 brain template (shipped inside "
        "nilearn; no download) from a few labelled slices of the same volume, print the Dice "
        "and write an overlay PNG.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", help="weights to run (.safetensors with its card, or a "
                   "registered model name); default: the shipped weights, else a small model "
                   "trained on synthetic tasks")  # fmt: skip
    p.add_argument("--support-size", type=int, default=DEFAULT_SUPPORT_SIZE,
                   help=f"labelled slices in the support set (default {DEFAULT_SUPPORT_SIZE})")  # fmt: skip
    p.add_argument("--out", help=f"output folder (default {work_dir('demo')}/; "
                   "$MEGASEG_WORK moves megaseg_work)")  # fmt: skip
    p.add_argument("--train-seconds", type=float, default=DEFAULT_TRAIN_SECONDS,
                   help="training budget of the synthetic fallback, when no checkpoint is "
                   f"given or shipped (default {DEFAULT_TRAIN_SECONDS:.0f})")  # fmt: skip
    p.add_argument("--axis", choices=list(AXES), default="axial",
                   help="slicing plane of the support and query slices (default axial)")  # fmt: skip
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="query slices (default 3)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.queries < 1:
        print("megaseg demo: --queries must be >= 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out, plane = Path(args.out or work_dir("demo")), args.axis
    try:
        from megaseg.examples import MNI152_REFERENCE, mni152_slices, mni152_volume

        t1, labels, _ = mni152_volume()
        support, query = pick_slices(labels, AXES[plane], args.support_size, args.queries)
    except FileNotFoundError as e:
        print(f"megaseg demo: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"megaseg demo: {e}", file=sys.stderr)
        return 2
    print(f"megaseg demo: {MNI152_REFERENCE}")
    print("  one subject, so this is WITHIN-SUBJECT segmentation: support and queries are "
          "different slices of the same volume (easier than a new subject)")  # fmt: skip
    print(f"  support: {len(support)} {plane} slices {support} (grey and white matter labelled)")
    print(f"  queries: {len(query)} other {plane} slices {query}")

    with idle_threads():
        try:
            model = load_demo_model(args.checkpoint, args.train_seconds, out)
        except (FileNotFoundError, ValueError) as e:
            print(f"megaseg demo: {e}", file=sys.stderr)
            return 1
        seg = model.segmenter
        sup_images, sup_labels = mni152_slices(t1, labels, AXES[plane], support)
        q_images, q_truth = mni152_slices(t1, labels, AXES[plane], query)
        seg.set_support(sup_images, sup_labels, modality="MR")
        t0 = time.perf_counter()
        preds = seg.predict(q_images)
        predict_seconds = time.perf_counter() - t0
    masks, scores, baseline = score(preds, q_truth, sup_labels)

    title = (
        f"megaseg demo, MNI152 T1 (one subject: within-subject), {plane} slices.\n"
        f"support: {len(support)} labelled slices {support}; model: {model.title}"
    )
    png = plot_demo(
        out / f"mni152_{plane}_overlay.png",
        q_images,
        q_truth,
        masks,
        [f"{plane} slice {i}" for i in query],
        scores,
        _wrap(title, 110),
    )

    print(f"  model: {model.description}")
    if model.path is not None:
        print(f"  weights: {model.path.resolve()}")
        if model.is_fallback:
            print(f"    (run again without training: megaseg demo --checkpoint {model.path})")
    print(f"  predicted in {predict_seconds:.1f} s at {seg.resolution} px")
    print("  Dice per task (mean over the query slices):")
    for name in TASKS:
        per = ", ".join(f"{row[name]:.3f}" for row in scores)
        trivial = np.mean([row[name] for row in baseline])
        print(
            f"    {name:<13} Dice {np.mean([row[name] for row in scores]):.3f}   (per slice: "
            f"{per}; mean-support-label baseline {trivial:.3f})"
        )
    if model.is_fallback:
        print("  (a minute of training on synthetic tasks only: expect low Dice; the baseline "
              "predicts the average of the support labels, with no learning at all)")  # fmt: skip
    print(f"  total {time.perf_counter() - start:.0f} s")
    print("megaseg demo wrote:")
    print(f"  overlay PNG: {png.resolve()}")
    if model.is_fallback and model.path is not None and model.path.is_file():
        print(f"  weights:     {model.path.resolve()} (+ .json card)")
    return 0


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(
        textwrap.fill(line, width, subsequent_indent="  ") for line in text.splitlines()
    )
