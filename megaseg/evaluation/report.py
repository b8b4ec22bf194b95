"""What an evaluation writes: CSV files, a markdown summary table and plots.

- ``predictions.csv``: one row per prediction (method, dataset, task, query, N, r, Dice...);
- ``tasks.csv``: per (method, task, N), the mean Dice over its queries and draws;
- ``summary.csv``: per (method, dataset or the mean over datasets, N), the Dice and its 95%
  bootstrap interval over tasks (see :mod:`megaseg.evaluation.stats`);
- ``summary.md``: the dataset x N table, every method in the same table, with notes;
- ``dice_vs_n_<dataset>.png`` and ``dice_vs_n_mean.png``: Dice against N, one line per method
  with its interval as a band;
- ``cases_<method>.png``: query, truth and prediction of the best, median and worst
  predictions of a method at its largest N.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megaseg.evaluation.stats import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    bootstrap_ci,
    stratified_bootstrap_ci,
)
from megaseg.paths import atomic_write

PREDICTION_COLUMNS = (
    "method", "dataset", "task", "query", "subject", "N", "support_size", "r", "ensemble",
    "seed", "dice", "truth_pixels", "pred_pixels", "within_subject", "overlap", "call_seconds",
)  # fmt: skip
TASK_COLUMNS = (
    "method", "dataset", "task", "N", "support_size", "dice", "predictions", "within_subject", "overlap",
)  # fmt: skip
SUMMARY_COLUMNS = (
    "method", "scope", "dataset", "N", "dice", "ci_low", "ci_high", "tasks", "predictions",
    "within_subject", "overlap",
)  # fmt: skip
MEAN = "mean"  # the ``dataset`` of the mean-over-datasets rows (their ``scope`` is "mean")


def write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV, atomically (an interrupted run leaves no half file)."""
    path = Path(path)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: _cell(row.get(k)) for k in columns})

    atomic_write(path, write)
    return path


def _save_png(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ summaries


def _ordered(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def task_means(rows: Sequence[dict]) -> list[dict]:
    """Per (method, dataset, task, N): mean Dice over the task's queries and draws."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["dataset"], row["task"], row["N"])].append(row)
    out = []
    for (method, dataset, task, N), rs in groups.items():
        out.append({
            "method": method, "dataset": dataset, "task": task, "N": N,
            "support_size": max(r["support_size"] for r in rs),
            "dice": float(np.mean([r["dice"] for r in rs])),
            "predictions": len(rs),
            "within_subject": bool(rs[0]["within_subject"]),
            "overlap": bool(rs[0]["overlap"]),
        })  # fmt: skip
    return out


def summarize(
    tasks: Sequence[dict],
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> list[dict]:
    """Per method and N: each dataset's mean over tasks and the mean over datasets, with CIs.

    Dataset ``d`` (in order of appearance) is bootstrapped with seed ``seed + d`` for every
    method and N, so methods are resampled on the same tasks; the mean over datasets uses the
    stratified bootstrap (tasks resampled within each dataset).
    """
    datasets = _ordered(t["dataset"] for t in tasks)
    dseed = {d: seed + i for i, d in enumerate(datasets)}
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for t in tasks:
        cells[(t["method"], t["N"], t["dataset"])].append(t)
    out = []
    for method in _ordered(t["method"] for t in tasks):
        for N in sorted({t["N"] for t in tasks}):
            groups, flags = [], []
            for d in datasets:
                ts = sorted(cells.get((method, N, d), []), key=lambda t: t["task"])
                if not ts:
                    continue
                values = np.array([t["dice"] for t in ts])
                mean, lo, hi = bootstrap_ci(values, resamples, level, dseed[d])
                within = any(t["within_subject"] for t in ts)
                overlap = any(t["overlap"] for t in ts)
                out.append(_summary_row(method, "dataset", d, N, mean, lo, hi, ts, within, overlap))
                groups.append(values)
                flags.append((within, overlap, ts))
            if not groups:
                continue
            present = [d for d in datasets if cells.get((method, N, d))]
            mean, lo, hi = stratified_bootstrap_ci(
                groups, resamples, level, [dseed[d] for d in present]
            )
            all_ts = [t for _, _, ts in flags for t in ts]
            out.append(_summary_row(
                method, MEAN, MEAN, N, mean, lo, hi, all_ts,
                any(f[0] for f in flags), any(f[1] for f in flags),
            ))  # fmt: skip
    return out


def _summary_row(method, scope, dataset, N, mean, lo, hi, ts, within, overlap) -> dict:
    return {
        "method": method, "scope": scope, "dataset": dataset, "N": N,
        "dice": float(mean), "ci_low": float(lo), "ci_high": float(hi),
        "tasks": len(ts), "predictions": sum(t["predictions"] for t in ts),
        "within_subject": bool(within), "overlap": bool(overlap),
    }  # fmt: skip


# ------------------------------------------------------------------------------ markdown


def markdown_table(summary: Sequence[dict]) -> str:
    """Rows (dataset, method), columns N; cells ``Dice x100 [CI low, CI high]``.

    ``†`` marks a within-subject dataset, ``⚠`` one that the model saw in training.
    """
    Ns = sorted({s["N"] for s in summary})
    methods = _ordered(s["method"] for s in summary)
    datasets = _ordered(s["dataset"] for s in summary if s["scope"] == "dataset")
    cell = {(s["dataset"], s["method"], s["N"]): s for s in summary}
    head = ["dataset", "method", "tasks", *[f"N={n}" for n in Ns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(Ns)) + "|"]
    for d in [*datasets, MEAN]:
        for m in methods:
            row = [cell.get((d, m, n)) for n in Ns]
            present = [r for r in row if r is not None]
            if not present:
                continue
            mark = ("†" if any(r["within_subject"] for r in present) else "") + (
                "⚠" if any(r["overlap"] for r in present) else ""
            )
            name = f"**{d}**" if d == MEAN else d
            cells = [
                ""
                if r is None
                else f"{100 * r['dice']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
                for r in row
            ]
            lines.append(
                "| " + " | ".join([name + mark, m, str(present[0]["tasks"]), *cells]) + " |"
            )
    return "\n".join(lines)


def markdown_report(summary: Sequence[dict], meta: dict) -> str:
    """The whole ``summary.md``: header (what was evaluated, how), the table, notes."""
    lines = ["# megaseg held-out evaluation", ""]
    s = meta.get("settings", {})
    lines += [
        f"- model: `{meta.get('model', '?')}`",
        f"- trained on: {_names(meta.get('training_datasets'))}",
        f"- evaluated on: {', '.join(meta.get('datasets', []))}",
        f"- resolution {s.get('resolution')}, support sizes {s.get('support_sizes')}, "
        f"{s.get('draws_per_n')} draw(s) per N, ensemble K={s.get('ensemble')}, seed {s.get('seed')}"
        + (" (replayed from a draws file)" if meta.get("replayed") else ""),
        f"- Dice x100: mean over tasks (each task: mean over its queries and draws), "
        f"[{100 * meta.get('level', DEFAULT_LEVEL):.0f}% percentile bootstrap over tasks, "
        f"{meta.get('resamples', DEFAULT_RESAMPLES)} resamples]; **mean** = mean over datasets "
        "(bootstrap stratified by dataset)",
        "",
        markdown_table(summary),
        "",
        "Notes:",
    ]
    notes = []
    if any(r["within_subject"] for r in summary):
        notes.append(
            "† within-subject: a single-subject dataset; support and query are different slices "
            "of the same subject (each query excluded from its own support). Not comparable to "
            "across-subject rows."
        )
    if meta.get("overlap"):
        notes.append(
            "⚠ OVERLAP: evaluated on data the model was trained on (--allow-overlap): "
            + "; ".join(meta["overlap"])
        )
    excluded = sum(t.get("excluded_empty", 0) for t in meta.get("tasks", {}).values())
    queries = sum(t.get("queries", 0) for t in meta.get("tasks", {}).values())
    notes.append(f"{queries} queries used; {excluded} excluded because their truth is empty.")
    capped = {k: t["capped"] for k, t in meta.get("tasks", {}).items() if t.get("capped")}
    if capped:
        notes.append(
            f"N capped to the support pool in {len(capped)} task(s) (those rows use every "
            "candidate): "
            + "; ".join(f"{k} N={v}" for k, v in sorted(capped.items())[:20])
            + (" ..." if len(capped) > 20 else "")
        )
    if meta.get("skipped"):
        notes.append(
            f"{len(meta['skipped'])} task(s) skipped: "
            + "; ".join(f"{s['dataset']}/{s['task']} ({s['reason']})" for s in meta["skipped"][:20])
        )
    for name, t in meta.get("timings", {}).items():
        notes.append(
            f"{name}: {t['mean_seconds']:.2f} s per support set (mean over {t['calls']} calls"
            + (f"; {t['detail']}" if t.get("detail") else "")
            + ")"
        )
    for w in meta.get("warnings", []):
        notes.append(f"warning: {w}")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _names(names) -> str:
    if names is None:
        return "unknown (no card): held-out status could not be checked"
    return ", ".join(names) if names else "none listed"


# ------------------------------------------------------------------------------ plots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def plot_dice_vs_n(summary: Sequence[dict], out_dir: Path) -> list[Path]:
    """One PNG per dataset and one for the mean: Dice vs N, a line and CI band per method."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    paths = []
    for d in _ordered(s["dataset"] for s in summary):
        rows = [s for s in summary if s["dataset"] == d]
        # A bare Figure draws off-screen without switching the caller's (notebook) backend.
        fig = Figure(figsize=(5, 3.6), dpi=100)
        ax = fig.subplots()
        for m in _ordered(r["method"] for r in rows):
            rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["N"])
            n = [r["N"] for r in rs]
            ax.plot(n, [r["dice"] for r in rs], marker="o", label=m)
            ax.fill_between(n, [r["ci_low"] for r in rs], [r["ci_high"] for r in rs], alpha=0.2)
        Ns = sorted({r["N"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ns, [str(n) for n in Ns])
        ax.set_ylim(0, 1)
        ax.set_xlabel("support size N")
        ax.set_ylabel("Dice")
        within = "incl. within-subject" if d == MEAN else "within-subject"
        marks = (f"  ({within})" if any(r["within_subject"] for r in rows) else "") + (
            "  (OVERLAP)" if any(r["overlap"] for r in rows) else ""
        )
        ax.set_title(("mean over datasets" if d == MEAN else d) + marks, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"dice_vs_n_{_slug(d)}.png"
        _save_png(fig, path)
        paths.append(path)
    return paths


def plot_cases(cases: Sequence[dict], path: Path, title: str = "") -> Path:
    """Rows of (query, truth overlay, prediction overlay) for the given cases.

    Each case: ``image``, ``truth``, ``pred`` ``(R, R)`` arrays and a ``label`` string.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 2.6 * len(cases)), dpi=100)
    axes = fig.subplots(len(cases), 3, squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        img = case["image"]
        for ax, (mask, color, name) in zip(
            row, [(None, None, "query"), (case["truth"], (0.1, 0.9, 0.2), "truth"),
                  (case["pred"], (0.95, 0.2, 0.1), "prediction")], strict=True,
        ):  # fmt: skip
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if mask is not None:
                overlay = np.zeros((*mask.shape, 4))
                overlay[mask.astype(bool)] = (*color, 0.45)
                ax.imshow(overlay, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=8)
        row[0].set_ylabel(case["label"], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    _save_png(fig, path)
    return path


__all__ = [
    "MEAN",
    "PREDICTION_COLUMNS",
    "SUMMARY_COLUMNS",
    "TASK_COLUMNS",
    "markdown_report",
    "markdown_table",
    "plot_cases",
    "plot_dice_vs_n",
    "read_csv",
    "summarize",
    "task_means",
    "write_csv",
]
