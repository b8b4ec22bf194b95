"""Issue #13's ablation: what the data and the augmentation buy, at equal training steps.

Every arm is ``configs/generalist_cpu.yaml`` (32 features, 64 px, S log-uniform in [2, 64], B=2,
Adam 3e-4, warm-up 1000 + cosine over a fixed 12000 steps, EMA 0.999) stopped at the same step
(2000 by default), with one change each:

    v1_reference      synthetic tasks v1 only, reference augmentation (megaseg_small_synth64's recipe)
    v2_generalist     synthetic tasks v2 only (MNI152 + SPM12 label maps), generalist augmentation
    v2real_generalist v2 + the packaged real corpus (75/25), generalist augmentation
                      (the campaign itself: its export/step0002000 is this arm when it ran with
                      the same settings; --arms v2real_generalist trains it separately)
    v2real_reference  as above with the reference augmentation
    v2real_light      as above with the light one (task-level flips + intensity inversion)

    python benchmarks/generalist_ablation.py train --arms v1_reference v2_generalist
    python benchmarks/generalist_ablation.py train --arms v2real_light --seed 1

Trains each arm in the background-friendly way the campaign does (one intra-op thread: run it
with ``OMP_NUM_THREADS=1``), into ``runs/ablation/<arm>_s<seed>/``; an arm whose
``export/final.safetensors`` exists is skipped, an interrupted one resumes from its last
checkpoint. Its weights are then scored by ``evaluate`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/generalist_cpu.yaml"
NO_CORPUS = ["--data.corpora", "[]", "--data.synthetic_ratio", "1.0", "--data.protocol", "null"]
ARMS: dict[str, list[str]] = {
    "v1_reference": [
        *NO_CORPUS, "--data.synthetic_version", "1", "--data.synthetic_real_maps", "false",
        "--data.augment", "reference",
    ],
    "v2_generalist": [*NO_CORPUS, "--data.augment", "generalist"],
    "v2real_generalist": ["--data.augment", "generalist"],
    "v2real_reference": ["--data.augment", "reference"],
    "v2real_light": ["--data.augment", "light"],
}  # fmt: skip


def run_dir(arm: str, seed: int) -> Path:
    return ROOT / "runs" / "ablation" / f"{arm}_s{seed}"


def train(arm: str, steps: int, seed: int) -> Path:
    out = run_dir(arm, seed)
    final = out / "export" / "final.safetensors"
    if final.is_file():
        print(f"{arm} (seed {seed}): {final} exists, skipped", flush=True)
        return final
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "megaseg"), "fit", "--config", CONFIG, *ARMS[arm],
        "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(out),
        "--seed_everything", str(seed), "--data.seed", str(seed), "--ckpt_path", "last",
    ]  # fmt: skip
    print(f"{arm} (seed {seed}): megaseg {' '.join(cmd[1:])}", flush=True)
    with open(out / "fit.log", "a") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})  # fmt: skip
    return final


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the arms (sequentially)")
    t.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "train":
        for arm in args.arms:
            train(arm, args.steps, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
