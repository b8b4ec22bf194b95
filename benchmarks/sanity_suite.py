"""Run the sanity suite (megaseg.evaluation.sanity) on a checkpoint and record its table.

    python benchmarks/sanity_suite.py checkpoints/megaseg_small_synth64.safetensors
    python benchmarks/sanity_suite.py CKPT --ns 1 4 16 --ensembles 4 --device cuda
    python benchmarks/sanity_suite.py CKPT --flips     # flip test-time augmentation

Writes ``docs/results/sanity_<checkpoint stem>.md`` (the Dice table by task and support size N,
K-ensembles, the ensemble-never-empties check, machine and time) and ``.png`` (support examples
and queries with truth and prediction at the largest N); with ``--flips``,
``sanity_<stem>_flips.md`` / ``.png`` beside them. The bar a new checkpoint must meet
(issue #13): Dice >= 0.9 on every task at N=16, and the ensemble check passing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_name  # noqa: E402

from megaseg.evaluation.sanity import TASKS, run_sanity, sanity_png  # noqa: E402
from megaseg.paths import atomic_write  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .safetensors checkpoint (card beside it)")
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--ensembles", type=int, nargs="*", default=[4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--flips",
        action="store_true",
        help="flip test-time augmentation on every prediction (4x the forward passes)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    path = Path(args.checkpoint)
    if not path.is_file():
        print(f"error: {path}: no such checkpoint file", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = run_sanity(
            path, ns=args.ns, ensembles=args.ensembles, device=args.device, flips=args.flips
        )
    except ValueError as err:
        print(f"error: {path}: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    worst = min(result.dice[(t, max(args.ns), 1)] for t in result.tasks)
    meets = worst >= 0.9 and result.ensemble_ok()
    tasks = "\n".join(f"- `{name}`: {desc}" for name, desc in TASKS.items())
    text = (
        f"# Sanity suite: `{path.name}`\n\n"
        f"Dice (probs > 0.5, 128 px) through `Segmenter`, mean over 8 queries per task; N = "
        f"support size (the first N of a fixed pool of 32), K = ensemble members (K random "
        f"N-subsets of the pool, probabilities averaged).\n\n"
        f"{result.markdown()}\n\n"
        f"Bar of issue #13 (Dice >= 0.9 on every task at N={max(args.ns)}, ensemble check "
        f"passing): **{'met' if meets else 'not met'}** (worst task {worst:.2f}).\n\n"
        f"Tasks:\n{tasks}\n\n"
        f"Machine: {cpu_name()}, device {args.device}; {seconds:.0f} s.\n"
        f"Command: `python benchmarks/sanity_suite.py {args.checkpoint}"
        f"{' --ns ' + ' '.join(map(str, args.ns)) if args.ns != [1, 4, 16] else ''}"
        f"{' --ensembles ' + ' '.join(map(str, args.ensembles)) if args.ensembles != [4] else ''}"
        f"{' --device ' + args.device if args.device != 'cpu' else ''}"
        f"{' --flips' if args.flips else ''}`\n"
    )
    stem = f"sanity_{path.stem}{'_flips' if args.flips else ''}"
    out = args.out_dir / f"{stem}.md"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text), suffix=".md")
    sanity_png(args.out_dir / f"{stem}.png", result)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
