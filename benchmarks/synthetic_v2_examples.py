"""Preview of synthetic tasks v2: one row per task, several subjects side by side.

    python benchmarks/synthetic_v2_examples.py [--out docs/results/synthetic_v2_examples.png]

Training-range tasks (seeds 0..) with the MNI152 label maps from nilearn for the ``real`` kind;
each row shows 5 subjects of one task (the first label outlined in red), then their label maps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megaseg.data.synthetic.v2 import SyntheticTasksV2, mni152_label_maps, preview_png


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/synthetic_v2_examples.png"))
    parser.add_argument("--tasks", type=int, default=12)
    args = parser.parse_args(argv)
    gen = SyntheticTasksV2(num_tasks=args.tasks, label_maps=mni152_label_maps(128))
    print(preview_png(args.out, gen, tasks=range(args.tasks), subjects=5))


if __name__ == "__main__":
    main()
