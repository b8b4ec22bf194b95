"""Cross-convolution vs cross-attention, trained and evaluated under one protocol.

    python benchmarks/compare_interactions.py train     # 3 variants x 3 seeds, megaseg fit
    python benchmarks/compare_interactions.py evaluate  # megaseg evaluate, the same draws
    python benchmarks/compare_interactions.py report    # table, PNG, cost; docs/results/
    python benchmarks/compare_interactions.py all

Every run is a plain ``megaseg fit --config configs/<config>.yaml --seed_everything S
--data.seed S``: the configs differ only in ``model.model_name`` (ci_tiny: v1 cross-conv;
attn_hybrid; attn_full), so for a given seed the three networks see the same episodes in the
same order for the same number of steps. Each export is evaluated with ``megaseg evaluate`` on
held-out synthetic tasks and the MNI152 grey/white-matter tasks of the ``nilearn`` wheel; the
first evaluation draws the support sets and writes ``draws.json``, every other one replays it
(``--draws``), so all checkpoints and the mean-label baseline are scored on the same draws.

The report averages each task's Dice over the three seeds (the task is the unit; seeds are
training noise) and bootstraps over tasks: per variant a 95% interval, and per attention
variant the paired difference to v1 (resampling the same tasks). A winner is named only where
the variants' own intervals do not overlap. Cost: parameters, and inference time (best of
``--repeats``) and peak tensor memory (``torch.profiler``) for one query at the training
resolution with S = 16 and 64, measured on the seed-0 weights in this process.

Every stage skips the work already done (an export present, an evaluation's summary present;
an interrupted fit resumes from its last checkpoint), so a killed run is continued by running
the same command again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from megaseg.evaluation.report import read_csv, summarize
from megaseg.evaluation.stats import bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name in the tables -> config
    "v1 cross-conv": "ci_tiny",
    "hybrid (attn at 2 coarse levels)": "attn_hybrid",
    "full attention": "attn_full",
}
BASELINE = "mean_label"


def slug(variant: str) -> str:
    return VARIANTS[variant]


def run(cmd: list[str], log: Path) -> None:
    """Run ``cmd``, its output to ``log``; raise naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "a") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        raise SystemExit(f"failed ({code}) after {time.time() - start:.0f} s; see {log}")
    print(f"  done in {time.time() - start:.0f} s", flush=True)


def train(args) -> None:
    for seed in args.seeds:
        for variant in VARIANTS:
            root = args.work / "runs" / f"{slug(variant)}_seed{seed}"
            if (root / "export" / "final.safetensors").is_file():
                continue
            cmd = ["megaseg", "fit", "--config", str(ROOT / "configs" / f"{slug(variant)}.yaml")]
            cmd += ["--seed_everything", str(seed), "--data.seed", str(seed)]
            cmd += ["--trainer.default_root_dir", str(root)]
            if (root / "checkpoints" / "last.ckpt").is_file():
                cmd += ["--ckpt_path", "last"]
            run(cmd, root / "fit.log")


def mni_folder(work: Path) -> Path:
    from megaseg.examples import write_mni152_nnunet

    folder = work / "mni" / "Dataset900_MNI152"
    if not folder.is_dir():
        write_mni152_nnunet(work / "mni")
    return folder


def evaluate(args) -> None:
    folder = mni_folder(args.work)
    # The first run draws the supports (and scores the baseline); every other one replays them.
    first = args.work / "eval" / f"{slug(next(iter(VARIANTS)))}_seed{args.seeds[0]}"
    draws = first / "draws.json"
    for seed in args.seeds:
        for variant in VARIANTS:
            name = f"{slug(variant)}_seed{seed}"
            out = args.work / "eval" / name
            if (out / "summary.json").is_file():
                continue
            weights = args.work / "runs" / name / "export" / "final.safetensors"
            if not weights.is_file():
                print(f"not trained yet: {name}", flush=True)
                continue
            cmd = ["megaseg", "evaluate", "--checkpoint", str(weights), "--label", variant]
            cmd += ["--out", str(out), "--no-progress", "--device", "cpu"]
            if out == first:
                cmd += ["--synthetic-tasks", str(args.synthetic_tasks), "--folder", str(folder)]
                cmd += ["--slices-per-plane", str(args.slices_per_plane)]
                cmd += ["--support-sizes", *map(str, args.support_sizes)]
                cmd += ["--draws-per-n", str(args.draws_per_n), "--seed", "0"]
                cmd += ["--methods", "megaseg", BASELINE]
            elif (first / "summary.json").is_file():
                cmd += ["--draws", str(draws), "--methods", "megaseg"]
            else:
                print(f"waiting for {first.name} (it draws the supports): {name}", flush=True)
                continue
            run(cmd, out.with_suffix(".log"))


# ------------------------------------------------------------------------------ report


def read_tasks(args) -> list[dict]:
    """Per-task Dice of every evaluation (its tasks.csv): each variant's rows from its own runs,
    the baseline's from the first evaluation (every replay draws the same supports)."""
    rows = []
    for seed in args.seeds:
        for variant in VARIANTS:
            path = args.work / "eval" / f"{slug(variant)}_seed{seed}" / "tasks.csv"
            first = seed == args.seeds[0] and variant == next(iter(VARIANTS))
            for r in read_csv(path):
                if r["method"] == BASELINE and not first:
                    continue
                rows.append({**r, "seed": seed, "N": int(r["N"]), "dice": float(r["dice"]),
                             "predictions": int(r["predictions"]),
                             "within_subject": r["within_subject"] == "True",
                             "overlap": r["overlap"] == "True"})  # fmt: skip
    return rows


def seed_averaged(rows: list[dict]) -> list[dict]:
    """One row per (method, dataset, task, N): the task's Dice averaged over the seeds."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["dataset"], r["task"], r["N"])].append(r)
    return [
        {**rs[0], "dice": float(np.mean([r["dice"] for r in rs])), "seeds": len(rs)}
        for rs in groups.values()
    ]


def paired_differences(tasks: list[dict], resamples: int = 2000) -> list[dict]:
    """Per attention variant, dataset and N: mean over tasks of (variant - v1) Dice with a
    95% bootstrap interval over tasks (the same tasks resampled for both)."""
    by = {(t["method"], t["dataset"], t["task"], t["N"]): t["dice"] for t in tasks}
    reference = next(iter(VARIANTS))
    out = []
    datasets = sorted({t["dataset"] for t in tasks})
    for variant in list(VARIANTS)[1:]:
        for d in datasets:
            for N in sorted({t["N"] for t in tasks if t["dataset"] == d}):
                names = sorted(t["task"] for t in tasks
                               if (t["method"], t["dataset"], t["N"]) == (reference, d, N))  # fmt: skip
                diff = np.array([by[(variant, d, n, N)] - by[(reference, d, n, N)] for n in names])
                mean, lo, hi = bootstrap_ci(diff, resamples)
                out.append({"variant": variant, "dataset": d, "N": N, "diff": float(mean),
                            "lo": float(lo), "hi": float(hi), "tasks": len(names)})  # fmt: skip
    return out


def seed_table(rows: list[dict]) -> dict[tuple[str, int], float]:
    """(variant, seed) -> mean Dice over datasets (each the mean over its tasks and N)."""
    out = {}
    for variant in VARIANTS:
        for seed in sorted({r["seed"] for r in rows}):
            per_dataset = defaultdict(list)
            for r in rows:
                if r["method"] == variant and r["seed"] == seed:
                    per_dataset[r["dataset"]].append(r["dice"])
            out[(variant, seed)] = float(np.mean([np.mean(v) for v in per_dataset.values()]))
    return out


def measure_cost(args, resolution: int) -> list[dict]:
    """Parameters, inference time (best of ``--repeats``) and peak tensor memory (profiler)
    of each variant's seed-0 network, one query at ``resolution``, S = 16 and 64."""
    import torch
    from attention_cost import best_ms, profiled_peak_bytes  # benchmarks/attention_cost.py

    from megaseg import load_checkpoint

    torch.set_num_threads(args.threads)
    out = []
    for variant in VARIANTS:
        weights = args.work / "runs" / f"{slug(variant)}_seed{args.seeds[0]}" / "export"
        model, _ = load_checkpoint(weights / "final.safetensors")
        model.eval()
        for S in (16, 64):
            g = torch.Generator().manual_seed(0)
            q = torch.rand(1, 1, resolution, resolution, generator=g)
            si = torch.rand(1, S, 1, resolution, resolution, generator=g)
            sl = (torch.rand(1, S, 1, resolution, resolution, generator=g) > 0.5).float()

            def forward(model=model, q=q, si=si, sl=sl):
                with torch.inference_mode():
                    model(q, si, sl)

            ms = best_ms({"model": forward}, args.repeats)["model"]
            out.append({"variant": variant, "S": S, "ms": ms,
                        "params": sum(p.numel() for p in model.parameters()),
                        "peak_mb": profiled_peak_bytes(forward) / 2**20})  # fmt: skip
    return out


def plot(summary: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = [d for d in dict.fromkeys(r["dataset"] for r in summary)]
    fig = Figure(figsize=(4.2 * len(datasets), 3.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, d in zip(axes, datasets, strict=True):
        for method in dict.fromkeys(r["method"] for r in summary):
            rs = sorted((r for r in summary if (r["dataset"], r["method"]) == (d, method)),
                        key=lambda r: r["N"])  # fmt: skip
            N = [r["N"] for r in rs]
            ax.plot(N, [100 * r["dice"] for r in rs], marker="o", ms=3, label=method)
            ax.fill_between(N, [100 * r["ci_low"] for r in rs], [100 * r["ci_high"] for r in rs],
                            alpha=0.15)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("support size N")
        ax.set_ylabel("Dice x100 (95% CI over tasks)")
        ax.set_title(d + (" (within-subject)" if any(
            r["within_subject"] for r in summary if r["dataset"] == d) else ""), fontsize=9)  # fmt: skip
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def verdicts(summary: list[dict]) -> list[str]:
    """Per dataset and N: which variants' intervals do not overlap (the only place a winner
    is named); "no difference detected" elsewhere."""
    lines = []
    cells = defaultdict(dict)
    for r in summary:
        if r["method"] in VARIANTS:
            cells[(r["dataset"], r["N"])][r["method"]] = r
    for (d, N), rs in sorted(cells.items()):
        separated = []
        for a in rs:
            for b in rs:
                if rs[a]["ci_low"] > rs[b]["ci_high"]:
                    separated.append(f"{a} > {b}")
        lines.append(f"- {d}, N={N}: " + ("; ".join(separated) or "no difference detected"))
    return lines


def report(args) -> None:
    import platform

    import torch
    from machine import cpu_name, emit  # benchmarks/machine.py

    rows = read_tasks(args)
    tasks = seed_averaged(rows)
    summary = summarize(tasks)
    card = json.loads((args.work / "runs" / f"ci_tiny_seed{args.seeds[0]}" / "export"
                       / "final.json").read_text())  # fmt: skip
    resolution = int(card["resolution"])
    cost = measure_cost(args, resolution)
    plot(summary, args.out / "compare_interactions.png")
    diffs = paired_differences(tasks)
    seeds = seed_table(rows)

    Ns = sorted({t["N"] for t in tasks})
    lines = [
        "# Cross-convolution vs cross-attention: one protocol",
        "",
        f"Made by `python benchmarks/compare_interactions.py all` (train, evaluate, report); "
        f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}) per variant, each "
        f"`megaseg fit --config configs/<config>.yaml --seed_everything S --data.seed S` "
        f"(configs: {', '.join(f'{v}: `{c}.yaml`' for v, c in VARIANTS.items())}; 16 features, "
        f"{resolution}x{resolution}, synthetic tasks only, {card['training']['step']} steps), then "
        "`megaseg evaluate` on the same draws (`draws.json` replayed).",
        "",
        "Dice x100: per task the mean over its queries, draws and the "
        f"{len(args.seeds)} seeds; then the mean over tasks with a 95% percentile bootstrap "
        "interval over tasks (2000 resamples). † within-subject (one subject: support and query "
        "are other slices of the same volume).",
        "",
        "| dataset | method | tasks | " + " | ".join(f"N={n}" for n in Ns) + " |",
        "|---|---|---:|" + "---:|" * len(Ns),
    ]
    for d in dict.fromkeys(r["dataset"] for r in summary):
        for method in dict.fromkeys(r["method"] for r in summary):
            rs = {r["N"]: r for r in summary if (r["dataset"], r["method"]) == (d, method)}
            if not rs:
                continue
            any_r = next(iter(rs.values()))
            name = f"**{d}**" if d == "mean" else d
            name += "†" if any_r["within_subject"] else ""
            cells = [f"{100 * rs[n]['dice']:.1f} [{100 * rs[n]['ci_low']:.1f}, "
                     f"{100 * rs[n]['ci_high']:.1f}]" if n in rs else "" for n in Ns]  # fmt: skip
            lines.append(f"| {name} | {method} | {any_r['tasks']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired difference to v1 (variant - v1, Dice x100, 95% bootstrap over tasks):", "",
              "| variant | dataset | " + " | ".join(f"N={n}" for n in Ns) + " |",
              "|---|---|" + "---:|" * len(Ns)]  # fmt: skip
    for variant in list(VARIANTS)[1:]:
        for d in dict.fromkeys(r["dataset"] for r in diffs):
            rs = {r["N"]: r for r in diffs if (r["variant"], r["dataset"]) == (variant, d)}
            cells = [f"{100 * rs[n]['diff']:+.1f} [{100 * rs[n]['lo']:+.1f}, "
                     f"{100 * rs[n]['hi']:+.1f}]" if n in rs else "" for n in Ns]  # fmt: skip
            lines.append(f"| {variant} | {d} | " + " | ".join(cells) + " |")
    lines += ["", "Training noise: each seed's mean Dice x100 (mean over datasets of the mean "
              "over tasks and N):", "", "| variant | " + " | ".join(
                  f"seed {s}" for s in args.seeds) + " |", "|---|" + "---:|" * len(args.seeds)]  # fmt: skip
    for variant in VARIANTS:
        lines.append(f"| {variant} | " + " | ".join(
            f"{100 * seeds[(variant, s)]:.1f}" for s in args.seeds) + " |")  # fmt: skip
    lines += [
        "",
        f"Cost of the trained networks: one query {resolution}x{resolution}, inference, fp32, "
        f"fast path, {args.threads} threads on {cpu_name()} (torch {torch.__version__}, "
        f"{platform.machine()}); time: best of {args.repeats}; memory: peak of live tensor "
        "bytes (torch.profiler). The default 64-feature variants at 128x128: "
        "benchmarks/RESULTS.md, attention section.",
        "",
        "| variant | params | ms S=16 | ms S=64 | peak MB S=16 | peak MB S=64 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        c = {r["S"]: r for r in cost if r["variant"] == variant}
        lines.append(f"| {variant} | {c[16]['params']:,} | {c[16]['ms']:.1f} | {c[64]['ms']:.1f} "
                     f"| {c[16]['peak_mb']:.1f} | {c[64]['peak_mb']:.1f} |")  # fmt: skip
    lines += ["", "Where the intervals of the variants separate (the only place a winner is "
              "named):", "", *verdicts(summary), "",
              "![Dice vs N](compare_interactions.png)"]  # fmt: skip
    emit("\n".join(lines), args.out / "compare_interactions.md")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["train", "evaluate", "report", "all"])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "compare_interactions")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--synthetic-tasks", type=int, default=30)
    parser.add_argument("--slices-per-plane", type=int, default=12)
    parser.add_argument("--support-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--draws-per-n", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.stage in ("train", "all"):
        train(args)
    if args.stage in ("evaluate", "all"):
        evaluate(args)
    if args.stage in ("report", "all"):
        report(args)


if __name__ == "__main__":
    sys.exit(main())
