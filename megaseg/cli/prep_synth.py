"""``megaseg prep synth``: write synthetic tasks into a corpus (the work: :mod:`data_prep.synth`)."""

from __future__ import annotations

import argparse
import sys

from data_prep.synth import dataset_name, estimated_bytes, write_synthetic
from megaseg.cli.prep import finish_build
from megaseg.helpformat import DefaultsHelpFormatter


def _seed_offset(text: str) -> int:
    if text == "heldout":
        from megaseg.data.synthetic import HELDOUT_SEED_OFFSET

        return HELDOUT_SEED_OFFSET
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="megaseg prep synth",
        description="Write synthetic tasks (random smooth label maps) into a corpus.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--out", "--store", dest="out", required=True,
        help="corpus folder (other datasets in it are kept); a fit reads it as data.synthetic_store",
    )  # fmt: skip
    p.add_argument("--tasks", type=int, default=1000, help="synthetic tasks to write")
    p.add_argument("--subjects", type=int, default=100, help="subjects per task")
    p.add_argument(
        "--seed-offset",
        type=_seed_offset,
        default=0,
        help="0: training tasks; 'heldout' (megaseg.data.synthetic.HELDOUT_SEED_OFFSET): "
        "held-out tasks (dataset synthetic-heldout); another number: dataset synthetic-N",
    )
    p.add_argument("--resolutions", type=int, nargs="+", default=[128], metavar="PX",
                   help="square sizes every example is stored at")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="processes writing tasks in parallel")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject splits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--generator-version",
        "--version",
        dest="generator_version",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: megaseg.data.synthetic.v1; 2: megaseg.data.synthetic.v2 (objects, anatomy and "
        "MNI152 label maps; dataset name suffixed -v2)",
    )
    p.add_argument(
        "--label-maps",
        choices=("mni152", "mni152+spm12"),
        default="mni152",
        help="v2's real label maps: nilearn's MNI152, or also SPM12's tissue maps and "
        "Neuromorphometrics labels (spm-runtime wheel, fetched into $MEGASEG_CACHE)",
    )
    args = p.parse_args(argv)
    if args.tasks < 1 or args.subjects < 1 or min(args.resolutions) < 8:
        p.error("need --tasks >= 1, --subjects >= 1 and resolutions >= 8")
    size = estimated_bytes(args.tasks, args.subjects, args.resolutions)
    print(
        f"writing {args.tasks} tasks x {args.subjects} subjects ({dataset_name(args.seed_offset)}"
        f"{'-v2' if args.generator_version == 2 else ''}) "
        f"at {args.resolutions} px: ~{size / 1e9:.2f} GB of arrays (about twice that while building)"
    )
    try:
        summary = write_synthetic(
            args.out,
            args.tasks,
            args.subjects,
            args.seed_offset,
            args.resolutions,
            workers=args.workers,
            seed=args.seed,
            progress=not args.no_progress,
            generator_version=args.generator_version,
            label_maps=args.label_maps,
        )
    except ValueError as err:
        print(f"prep synth: {err}", file=sys.stderr)
        return 2
    return finish_build(summary, args.out)
