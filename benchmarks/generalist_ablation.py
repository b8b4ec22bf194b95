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

Phase-2 arms start from phase 1's exported EMA weights with ``configs/generalist_cpu_128.yaml``
(2000 steps at 128 px, light augmentation: the shipped model's phase 2), one change undone each,
to separate what phase 2's two changes bought:

    p2_light_r64        phase 2 at 64 px (the augmentation change alone)
    p2_generalist_r128  phase 2 with the generalist augmentation (the resolution change alone)

    python benchmarks/generalist_ablation.py train --arms v1_reference v2_generalist
    python benchmarks/generalist_ablation.py train --arms v2real_light --seed 1

Trains each arm in the background-friendly way the campaign does (one intra-op thread: run it
with ``OMP_NUM_THREADS=1``), into ``runs/ablation/<arm>_s<seed>/``; an arm whose
``export/final.safetensors`` exists is skipped, an interrupted one resumes from its last
checkpoint. Its weights are then scored on the visible benchmark, and the table written:

    python benchmarks/generalist_ablation.py evaluate NAME=WEIGHTS ... [--reference NAME]
    python benchmarks/generalist_ablation.py table NAME ... [--out docs/results/generalist_ablation]

``evaluate`` runs, per checkpoint, the sanity suite (megaseg.evaluation.sanity, N = 1, 4, 16 and
4-member ensembles) and ``megaseg evaluate`` on the same recorded draws for every checkpoint
(the first one given draws them, with the mean-label baseline; the others replay its
draws.json): the held-out cross-subject real source (``--corpus``/``--datasets``), held-out
synthetic v2 tasks and the MNI152 template (within-subject). Outputs go to
``megaseg_work/ablation/<NAME>/`` (resumable: a finished part is not rerun; the folder records
the sha256 of its weights and refuses other weights under that NAME). ``table`` gathers
them into a Markdown table with 95% intervals and a Dice-vs-N PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py
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
    # Phase 2 (configs/generalist_cpu_128.yaml: 128 px, light augmentation, from phase 1's
    # EMA weights) with one of its two changes undone, to separate them.
    "p2_light_r64": ["--data.resolution", "64"],
    "p2_generalist_r128": ["--data.augment", "generalist"],
}  # fmt: skip
PHASE2_CONFIG = "configs/generalist_cpu_128.yaml"


def config_of(arm: str) -> str:
    return PHASE2_CONFIG if arm.startswith("p2_") else CONFIG


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
        str(Path(sys.executable).parent / "megaseg"), "fit", "--config", config_of(arm), *ARMS[arm],
        "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(out),
        "--seed_everything", str(seed), "--data.seed", str(seed), "--ckpt_path", "last",
    ]  # fmt: skip
    print(f"{arm} (seed {seed}): megaseg {' '.join(cmd[1:])}", flush=True)
    with open(out / "fit.log", "a") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})  # fmt: skip
    return final


EVAL_DIR = ROOT / "megaseg_work" / "ablation"


def megaseg_cmd() -> str:
    return str(Path(sys.executable).parent / "megaseg")


def check_weights(name: str, weights: str) -> None:
    """Tie ``EVAL_DIR/name`` to the file ``weights`` by its sha256 (``weights.json``), so a cached
    result is never reused for other weights under the same name: exits with a message naming
    the folder when it was made from another file, or before weights were recorded."""
    from megaseg.paths import sha256_file

    if not Path(weights).is_file():
        sys.exit(f"generalist_ablation: {name}={weights}: no such weights file")
    folder = EVAL_DIR / name
    digest = sha256_file(Path(weights))
    record = folder / "weights.json"
    if record.is_file():
        made_from = json.loads(record.read_text())
        if made_from.get("sha256") == digest:
            return
        why = f"was made from {made_from.get('path')} (sha256 {made_from.get('sha256', '?')[:12]})"
    elif folder.is_dir() and any(folder.iterdir()):
        why = "holds results that do not record their weights (made by an older version)"
    else:
        from megaseg.paths import atomic_write

        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"path": weights, "sha256": digest}, indent=1)
        atomic_write(record, lambda tmp: Path(tmp).write_text(text))
        return
    sys.exit(
        f"generalist_ablation: {folder} {why}, not {weights} (sha256 {digest[:12]}): its cached "
        "results would be reused for other weights. Delete that folder (this script's own "
        "cache) or evaluate under another NAME."
    )


def sanity(name: str, weights: str, flips: bool = False, resolution: int | None = None) -> dict:
    """The sanity suite's Dice table and ensemble check of ``weights``, cached as JSON."""
    out = EVAL_DIR / name / "sanity.json"
    if out.is_file():
        return json.loads(out.read_text())
    from megaseg.evaluation.sanity import run_sanity
    from megaseg.paths import atomic_write

    start = time.perf_counter()
    kwargs = {"flips": True} if flips else {}
    from megaseg.inference import Segmenter

    segmenter = Segmenter.from_checkpoint(weights, resolution=resolution)
    result = run_sanity(segmenter, ns=(1, 4, 16), ensembles=(4,), **kwargs)
    record = {
        "weights": weights,
        "flips": flips,
        "resolution": segmenter.resolution,
        "dice": {f"{t}|{n}|{k}": v for (t, n, k), v in result.dice.items()},
        "violations": sum(result.violations.values()),
        "confident": sum(v for (_, _, k), v in result.confident.items() if k > 1),
        "seconds": round(time.perf_counter() - start, 1),
        "markdown": result.markdown(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def evaluate(name: str, weights: str, reference: str, args) -> Path:
    """``megaseg evaluate`` of ``weights`` into ``EVAL_DIR/name``: the reference checkpoint draws
    (with the mean-label baseline), the others replay its draws.json."""
    out = EVAL_DIR / name / "eval"
    if (out / "summary.json").is_file():
        return out
    cmd = [megaseg_cmd(), "evaluate", "--checkpoint", weights, "--out", str(out), "--no-progress"]
    if args.allow_overlap:
        cmd.append("--allow-overlap")
    if args.ensemble > 1:  # ignored by a replay: an ensemble run draws its own (--reference)
        cmd += ["--ensemble", str(args.ensemble)]
    if args.flips:
        cmd.append("--flips")
    if args.resolution:  # a folder source's draws are tied to it: draw once per resolution
        cmd += ["--resolution", str(args.resolution)]
    if name == reference:
        cmd += ["--methods", "megaseg", "mean_label", "--support-sizes", *map(str, args.ns),
                "--draws-per-n", str(args.draws_per_n)]  # fmt: skip
        if args.synthetic_tasks:  # evaluate refuses a generator version without tasks
            cmd += ["--synthetic-tasks", str(args.synthetic_tasks), "--synthetic-version", "2"]
        if args.corpus:
            cmd += ["--corpus", args.corpus, "--datasets", *args.datasets]
        if args.mni152:
            from megaseg.examples import write_mni152_nnunet

            cmd += ["--folder", str(write_mni152_nnunet()), "--slices-per-plane", "4"]
    else:
        draws = EVAL_DIR / reference / "eval" / "draws.json"
        if not draws.is_file():
            raise SystemExit(f"{draws}: evaluate the reference checkpoint {reference} first")
        cmd += ["--methods", "megaseg", "--draws", str(draws)]
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "evaluate.log", "a") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out


def rows(name: str) -> list[dict]:
    """Summary rows (per method, dataset, N) of ``name``'s evaluation."""
    path = EVAL_DIR / name / "eval" / "summary.json"
    return json.loads(path.read_text())["summary"] if path.is_file() else []


def table(names: list[str], reference: str, out: Path) -> str:
    """Markdown: per checkpoint, sanity mean at N=1/4/16, worst task at N=16, ensemble check,
    and Dice at each N on each evaluated dataset with its 95% interval (plus mean-label)."""
    ref_rows = rows(reference)
    datasets = list(dict.fromkeys(r["dataset"] for r in ref_rows if r["scope"] == "dataset"))
    ns = sorted({r["N"] for r in ref_rows})

    def cell(rs, method, dataset, n):
        for r in rs:
            if (r["method"], r["dataset"], r["N"]) == (method, dataset, n) and r[
                "scope"
            ] == "dataset":
                return f"{100 * r['dice']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        return "—"

    head = ["checkpoint", "sanity N=1/4/16", "worst N=16", "ens. check"]
    head += [f"{d} N={n}" for d in datasets for n in ns]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in names:
        path = EVAL_DIR / name / "sanity.json"
        if path.is_file():
            s = json.loads(path.read_text())
            dice = {tuple(k.split("|")): v for k, v in s["dice"].items()}
            means = [
                sum(v for (t, n, k), v in dice.items() if n == str(N) and k == "1")
                / max(1, sum(1 for (t, n, k) in dice if n == str(N) and k == "1"))
                for N in (1, 4, 16)
            ]
            worst = min(v for (t, n, k), v in dice.items() if n == "16" and k == "1")
            san = "/".join(f"{m:.2f}" for m in means)
            ens = f"{s['violations']}/{s['confident']}"
        else:
            san, worst, ens = "—", float("nan"), "—"
        cells = [cell(rows(name), "megaseg", d, n) for d in datasets for n in ns]
        lines.append(f"| {name} | {san} | {worst:.2f} | {ens} | " + " | ".join(cells) + " |")
    cells = [cell(ref_rows, "mean_label", d, n) for d in datasets for n in ns]
    lines.append("| mean-label baseline | — | — | — | " + " | ".join(cells) + " |")
    lines += ["", paired_table(names, reference, datasets, max(ns))]
    return "\n".join(lines)


def diff_cells(r: dict) -> tuple[str, str, str]:
    """A compare_runs row as Dice x100 text: the difference, its interval over tasks, its
    interval over support draws."""
    return (
        f"{100 * r['diff']:+.1f}",
        f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]",
        f"[{100 * r['ci_draws_low']:+.1f}, {100 * r['ci_draws_high']:+.1f}]",
    )


def paired_table(names: list[str], reference: str, datasets: list[str], n: int) -> str:
    """Paired differences at N=``n`` on the same draws: each checkpoint minus the reference
    checkpoint and minus the mean-label baseline, x100, with the 95% interval over tasks and
    the one over support draws (the only meaningful one for a 3-task dataset)."""
    from megaseg.evaluation.compare import compare_runs

    def fmt(rows, d):
        for r in rows:
            if r["dataset"] == d and r["N"] == n and r["scope"] == "dataset":
                diff, tasks, draws = diff_cells(r)
                return f"{diff} {tasks}; draws {draws}"
        return "—"

    head = ["checkpoint"] + [f"{d}: - {reference}" for d in datasets]
    head += [f"{d}: - mean-label" for d in datasets]
    lines = [
        f"Paired differences at N={n} (Dice x100; [over tasks]; draws [over support draws]):",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    ref_dir = EVAL_DIR / reference / "eval"
    for name in names:
        run = EVAL_DIR / name / "eval"
        if not (run / "predictions.csv").is_file():
            continue
        vs_ref = compare_runs(run, ref_dir) if name != reference else []
        vs_base = compare_runs(run, ref_dir, method_b="mean_label")
        cells = [fmt(vs_ref, d) for d in datasets] + [fmt(vs_base, d) for d in datasets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairs_table(pairs: list[list[str]]) -> str:
    """Paired differences A - B at the largest N per dataset (Dice x100, interval over tasks
    and over support draws), for checkpoints evaluated on the same draws."""
    from megaseg.evaluation.compare import compare_runs

    lines = [
        "Arm against arm, same draws (Dice x100; [over tasks]; draws [over support draws]):",
        "",
        "| A - B | dataset | N | difference | over tasks | over draws |",
        "|---|---|---|---:|---|---|",
    ]
    for a, b in pairs:
        rows = compare_runs(EVAL_DIR / a / "eval", EVAL_DIR / b / "eval")
        n = max(r["N"] for r in rows)
        for r in rows:
            if r["N"] == n:
                lines.append(
                    f"| {a} - {b} | {r['dataset']} | {n} | " + " | ".join(diff_cells(r)) + " |"
                )
    return "\n".join(lines)


def plot(names: list[str], reference: str, png: Path) -> None:
    """Dice vs N per dataset, one line per checkpoint (+ mean-label), with the 95% intervals."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ref_rows = rows(reference)
    datasets = list(dict.fromkeys(r["dataset"] for r in ref_rows if r["scope"] == "dataset"))
    fig = Figure(figsize=(4.2 * len(datasets), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    series = [(n, "megaseg", rows(n)) for n in names] + [("mean-label", "mean_label", ref_rows)]
    colors = matplotlib.colormaps["tab20"].colors
    for ax, d in zip(axes, datasets, strict=True):
        for i, (label, method, rs) in enumerate(series):
            pts = sorted(
                (r["N"], r["dice"], r["ci_low"], r["ci_high"])
                for r in rs
                if r["scope"] == "dataset" and r["dataset"] == d and r["method"] == method
            )
            if not pts:
                continue
            x, y, lo, hi = zip(*pts, strict=True)
            color = "black" if method == "mean_label" else colors[i % len(colors)]
            ls = "--" if method == "mean_label" else "-"
            ax.plot(x, y, marker="o", label=label, ls=ls, color=color)
            ax.fill_between(x, lo, hi, alpha=0.08, color=color)
        ax.set_xscale("log", base=2)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("support size N")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("Dice")
    fig.tight_layout()
    # beside the panels, not over them: a long ablation has ~20 lines
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the arms (sequentially)")
    t.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="score checkpoints on the visible benchmark")
    e.add_argument("checkpoints", nargs="+", metavar="NAME=WEIGHTS")
    e.add_argument("--reference", help="the checkpoint that draws (default: the first)")
    e.add_argument("--corpus", help="corpus holding the held-out real source")
    e.add_argument("--datasets", nargs="*", default=["PkgBrainXS"])
    e.add_argument("--mni152", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--synthetic-tasks", type=int, default=30)
    e.add_argument("--ns", type=int, nargs="+", default=[1, 4, 16])
    e.add_argument("--draws-per-n", type=int, default=3)
    e.add_argument("--ensemble", type=int, default=1)
    e.add_argument("--allow-overlap", action="store_true")
    e.add_argument("--flips", action="store_true", help="flip test-time augmentation")
    e.add_argument("--resolution", type=int, help="network input size (default: each card's)")
    e.add_argument("--no-sanity", action="store_true")
    tb = sub.add_parser("table", help="the ablation table and PNG")
    tb.add_argument("names", nargs="+")
    tb.add_argument("--reference")
    tb.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "generalist_ablation")
    tb.add_argument("--pairs", nargs="*", default=[], metavar="A:B",
                    help="also the paired differences A - B (same draws) at the largest N")  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "train":
        for arm in args.arms:
            train(arm, args.steps, args.seed)
    elif args.command == "evaluate":
        pairs = [c.split("=", 1) for c in args.checkpoints]
        if any(len(p) != 2 for p in pairs):
            parser.error("checkpoints are NAME=WEIGHTS")
        reference = args.reference or pairs[0][0]
        for name, weights in pairs:
            check_weights(name, weights)
        for name, weights in sorted(pairs, key=lambda p: p[0] != reference):
            evaluate(name, weights, reference, args)
            if not args.no_sanity:
                sanity(name, weights, flips=args.flips, resolution=args.resolution)
    else:
        bad = [p for p in args.pairs if len(p.split(":", 1)) != 2 or "" in p.split(":", 1)]
        if bad:
            parser.error(f"--pairs takes A:B (two evaluated checkpoint names), not {bad}")
        reference = args.reference or args.names[0]
        text = table(args.names, reference, args.out)
        if args.pairs:
            text += "\n\n" + pairs_table([p.split(":", 1) for p in args.pairs])
        from machine import cpu_name

        text += (
            f"\n\nEvaluated on {cpu_name()}, CPU (the per-run logs and outputs: "
            f"{EVAL_DIR.relative_to(ROOT)}/NAME/). Table command: `python "
            f"benchmarks/generalist_ablation.py table {' '.join(args.names)}"
            + (f" --pairs {' '.join(args.pairs)}" if args.pairs else "")
            + "`"
        )
        print(text)
        from megaseg.paths import atomic_write

        atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text + "\n"))
        plot(args.names, reference, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
