"""What an evaluation writes: CSV files, a markdown summary table and plots.

- ``predictions.csv``: one row per prediction (method, dataset, task, query, N, r, Dice...);
- ``tasks.csv``: per (method, task, N), the mean Dice over its queries and draws;
- ``summary.csv``: per (method, dataset or the mean over datasets, N), the Dice and its 95%
  bootstrap interval over tasks (``ci_low``, ``ci_high``), a second one over the support draws
  within each task (``ci_draws_low``, ``ci_draws_high``), and on every method but the
  reference (the first) the paired difference reference - this method with both intervals
  (``paired_*``; :func:`differences` lists them; see :mod:`megaseg.evaluation.stats`);
- ``summary.md``: the dataset x N table, every method in the same table, the same over draws,
  the paired differences, with notes on what each interval covers;
- ``dice_vs_n_<dataset>.png`` and ``dice_vs_n_mean.png``: Dice against N, one line per method
  with its interval as a band;
- ``cases_<method>.png``: query, truth and prediction of the best, median and worst
  predictions of a method at its largest N.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megaseg.evaluation.stats import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    bootstrap_ci,
    is_task_range,
    percentile_interval,
    stratified_bootstrap_ci,
    stratified_bootstrap_means,
    unit_seed,
)
from megaseg.overlay import overlay_rgb
from megaseg.paths import atomic_write, slug

PREDICTION_COLUMNS = (
    "method", "dataset", "task", "query", "subject", "N", "support_size", "r", "ensemble",
    "seed", "dice", "truth_pixels", "pred_pixels", "within_subject", "overlap", "call_seconds",
)  # fmt: skip
TASK_COLUMNS = (
    "method", "dataset", "task", "N", "support_size", "dice", "predictions", "within_subject", "overlap",
)  # fmt: skip
SUMMARY_COLUMNS = (
    "method", "scope", "dataset", "N", "dice", "ci_low", "ci_high", "tasks", "predictions",
    "within_subject", "overlap", "draws", "ci_draws_low", "ci_draws_high", "paired_ref",
    "paired_diff", "paired_ci_low", "paired_ci_high", "paired_ci_draws_low", "paired_ci_draws_high",
)  # fmt: skip
# One paired difference (see :func:`paired_differences`): Dice of method_a minus method_b.
DIFFERENCE_COLUMNS = (
    "scope", "dataset", "N", "method_a", "method_b", "dice_a", "dice_b", "diff", "ci_low",
    "ci_high", "ci_draws_low", "ci_draws_high", "tasks", "draws",
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
    """Per (method, dataset, task, N): mean Dice over the task's queries and draws.

    Each task also carries ``draws``: per support draw (rows with the same ``r`` and ``seed``:
    one support set, or one ensemble of them; within-subject tasks draw one per query), sorted,
    ``{"r", "seed", "dice": mean over its queries, "queries": how many}`` — the units of the
    interval over draws (not written to tasks.csv).
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["dataset"], row["task"], row["N"])].append(row)
    out = []
    for (method, dataset, task, N), rs in groups.items():
        by_draw: dict[tuple, list[float]] = defaultdict(list)
        for r in rs:
            by_draw[(r["r"], r.get("seed", 0))].append(r["dice"])
        draws = [
            {"r": r, "seed": seed, "dice": float(np.mean(v)), "queries": len(v)}
            for (r, seed), v in sorted(by_draw.items())
        ]
        out.append({
            "method": method, "dataset": dataset, "task": task, "N": N,
            "support_size": max(r["support_size"] for r in rs),
            "dice": float(np.mean([r["dice"] for r in rs])),
            "predictions": len(rs),
            "within_subject": bool(rs[0]["within_subject"]),
            "overlap": bool(rs[0]["overlap"]),
            "draws": draws,
        })  # fmt: skip
    return out


def summarize(
    tasks: Sequence[dict],
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    reference: str | None = None,
) -> list[dict]:
    """Per method and N: each dataset's mean over tasks and the mean over datasets, with CIs.

    Dataset ``d`` (in order of appearance) is bootstrapped with seed ``seed + d`` for every
    method and N, so methods are resampled on the same tasks; the mean over datasets uses the
    stratified bootstrap (tasks resampled within each dataset): ``ci_low``, ``ci_high``.

    Tasks with ``draws`` (:func:`task_means`) also get the interval over support draws
    (``ci_draws_low``, ``ci_draws_high``; ``draws``: how many): the draws of each task
    resampled within the task (task ``t`` of dataset ``d`` with seed :func:`unit_seed`
    ``(seed, d, t)``), each resample's Dice the mean over tasks of the query-weighted mean of
    the resampled draws; for the mean over datasets, the mean of the datasets' resamples.
    Without ``draws`` these fields are None.

    Every method other than ``reference`` (default: the first method, the model in an
    evaluation) also gets the paired difference ``Dice(reference) - Dice(method)`` on the same
    tasks and draws (:func:`paired_differences`): ``paired_ref``, ``paired_diff``,
    ``paired_ci_low`` / ``_high`` (over tasks), ``paired_ci_draws_low`` / ``_high`` (over
    draws); None where the two methods were not evaluated on the same tasks.
    """
    datasets = _ordered(t["dataset"] for t in tasks)
    dseed = {d: seed + i for i, d in enumerate(datasets)}
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for t in tasks:
        cells[(t["method"], t["N"], t["dataset"])].append(t)
    methods = _ordered(t["method"] for t in tasks)
    out = []
    for method in methods:
        for N in sorted({t["N"] for t in tasks}):
            groups, flags, draw_means = [], [], []
            for d in datasets:
                ts = sorted(cells.get((method, N, d), []), key=lambda t: t["task"])
                if not ts:
                    continue
                values = np.array([t["dice"] for t in ts])
                mean, lo, hi = bootstrap_ci(values, resamples, level, dseed[d])
                within = any(t["within_subject"] for t in ts)
                overlap = any(t["overlap"] for t in ts)
                row = _summary_row(method, "dataset", d, N, mean, lo, hi, ts, within, overlap)
                means = _draw_means(ts, _draw_values(ts), d, resamples, seed)
                out.append(_with_draws(row, ts, means, level))
                groups.append(values)
                flags.append((within, overlap, ts))
                draw_means.append(means)
            if not groups:
                continue
            present = [d for d in datasets if cells.get((method, N, d))]
            mean, lo, hi = stratified_bootstrap_ci(
                groups, resamples, level, [dseed[d] for d in present]
            )
            all_ts = [t for _, _, ts in flags for t in ts]
            row = _summary_row(
                method, MEAN, MEAN, N, mean, lo, hi, all_ts,
                any(f[0] for f in flags), any(f[1] for f in flags),
            )  # fmt: skip
            means = None if any(m is None for m in draw_means) else np.mean(draw_means, axis=0)
            out.append(_with_draws(row, all_ts, means, level))
    reference = methods[0] if reference is None and methods else reference
    if reference is not None and reference not in methods:
        raise ValueError(f"reference: method {reference!r} is not among {methods}")
    by_method = {m: [t for t in tasks if t["method"] == m] for m in methods}
    index = {(r["method"], r["dataset"], r["N"]): r for r in out}
    for method in methods:
        if method == reference or _keys(by_method[method]) != _keys(by_method[reference]):
            continue
        for diff in paired_differences(
            by_method[reference], by_method[method], resamples, level, seed, _datasets=datasets
        ):
            index[(method, diff["dataset"], diff["N"])].update({
                "paired_ref": reference, "paired_diff": diff["diff"],
                "paired_ci_low": diff["ci_low"], "paired_ci_high": diff["ci_high"],
                "paired_ci_draws_low": diff["ci_draws_low"],
                "paired_ci_draws_high": diff["ci_draws_high"],
            })  # fmt: skip
    return out


def _summary_row(method, scope, dataset, N, mean, lo, hi, ts, within, overlap) -> dict:
    return {
        "method": method, "scope": scope, "dataset": dataset, "N": N,
        "dice": float(mean), "ci_low": float(lo), "ci_high": float(hi),
        "tasks": len(ts), "predictions": sum(t["predictions"] for t in ts),
        "within_subject": bool(within), "overlap": bool(overlap),
        "draws": None, "ci_draws_low": None, "ci_draws_high": None,
        "paired_ref": None, "paired_diff": None, "paired_ci_low": None, "paired_ci_high": None,
        "paired_ci_draws_low": None, "paired_ci_draws_high": None,
    }  # fmt: skip


def _with_draws(row: dict, ts: Sequence[dict], means: np.ndarray | None, level: float) -> dict:
    """``row`` plus ``draws`` and the percentile interval of the draw resamples ``means``."""
    if means is not None:
        lo, hi = percentile_interval(means, level)
        row.update({"draws": sum(len(t["draws"]) for t in ts), "ci_draws_low": float(lo),
                    "ci_draws_high": float(hi)})  # fmt: skip
    return row


def _keys(tasks: Sequence[dict]) -> set[tuple]:
    return {(t["dataset"], t["task"], t["N"]) for t in tasks}


def _draw_key(t: dict) -> list[tuple]:
    return [(u["r"], u["seed"], u["queries"]) for u in t.get("draws", ())]


def _draw_values(ts: Sequence[dict]) -> list[np.ndarray] | None:
    """Per task, its draws' mean Dice ``(n_draws,)``; None if a task has no ``draws``."""
    if not all(t.get("draws") for t in ts):
        return None
    return [np.array([u["dice"] for u in t["draws"]]) for t in ts]


def _draw_means(
    ts: Sequence[dict], values: list[np.ndarray] | None, dataset: str, resamples: int, seed: int
) -> np.ndarray | None:
    """``(resamples,)`` bootstrap means of one dataset over support draws, stratified by task:
    ``values[i]`` per draw of task ``ts[i]`` (Dice, or a paired difference of Dice), weighted
    by the draws' query counts. None without draws."""
    if values is None:
        return None
    return stratified_bootstrap_means(
        values,
        resamples,
        seeds=[unit_seed(seed, dataset, t["task"]) for t in ts],
        weights=[np.array([u["queries"] for u in t["draws"]], np.float64) for t in ts],
    )


def paired_differences(
    tasks_a: Sequence[dict],
    tasks_b: Sequence[dict],
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    *,
    _datasets: Sequence[str] | None = None,
) -> list[dict]:
    """Per dataset and N, and the mean over datasets: ``Dice(a) - Dice(b)`` on the same tasks,
    draws and queries, with paired bootstrap intervals (rows of :data:`DIFFERENCE_COLUMNS`).

    ``tasks_a``, ``tasks_b``: the :func:`task_means` rows of one method each (one run each, or
    two methods of one run); they must cover the same (dataset, task, N) and, where both have
    ``draws``, the same draws (same r, seed and query count), else ValueError. ``diff`` is the
    mean over tasks of the per-task differences (= the difference of the two summary Dice);
    ``ci_low``/``ci_high`` resample tasks (dataset ``d`` in order of appearance with seed
    ``seed + d``, as :func:`summarize`; the mean over datasets stratified by dataset) and
    ``ci_draws_low``/``ci_draws_high`` resample the draws within each task — both times the
    same units for a and b, and the interval is that of the difference of the resampled means.
    Identical methods give exactly 0 [0, 0].
    """
    a = {(t["dataset"], t["task"], t["N"]): t for t in tasks_a}
    b = {(t["dataset"], t["task"], t["N"]): t for t in tasks_b}
    if not a:
        raise ValueError("paired_differences: no tasks")
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:5]
        raise ValueError(
            f"paired_differences: the two methods were not evaluated on the same tasks "
            f"(e.g. {', '.join(f'{d}/{t} N={n}' for d, t, n in only)})"
        )
    for k in a:
        if a[k].get("draws") and b[k].get("draws") and _draw_key(a[k]) != _draw_key(b[k]):
            raise ValueError(
                f"paired_differences: {k[0]}/{k[1]} N={k[2]}: the two methods were not evaluated "
                "on the same draws (r, seed or number of queries differ)"
            )
    name_a = _ordered(t["method"] for t in tasks_a)
    name_b = _ordered(t["method"] for t in tasks_b)
    datasets = list(_datasets) if _datasets is not None else _ordered(d for d, _, _ in a)
    dseed = {d: seed + i for i, d in enumerate(datasets)}
    out = []
    for N in sorted({n for _, _, n in a}):
        groups, draw_means, dice_a, dice_b, counts = [], [], [], [], []
        present = [d for d in datasets if any(k[0] == d and k[2] == N for k in a)]
        for d in present:
            keys = sorted(k for k in a if k[0] == d and k[2] == N)
            ta, tb = [a[k] for k in keys], [b[k] for k in keys]
            diff = np.array([x["dice"] - y["dice"] for x, y in zip(ta, tb, strict=True)])
            mean, lo, hi = bootstrap_ci(diff, resamples, level, dseed[d])
            va, vb = _draw_values(ta), _draw_values(tb)
            values = (
                None if va is None or vb is None else [x - y for x, y in zip(va, vb, strict=True)]
            )
            means = _draw_means(ta, values, d, resamples, seed)
            da, db = np.mean([x["dice"] for x in ta]), np.mean([y["dice"] for y in tb])
            n_draws = sum(len(t["draws"]) for t in ta) if means is not None else None
            out.append(_difference_row("dataset", d, N, name_a, name_b, da, db, mean, lo, hi,
                                       means, level, len(keys), n_draws))  # fmt: skip
            groups.append(diff)
            draw_means.append(means)
            dice_a.append(da)
            dice_b.append(db)
            counts.append((len(keys), n_draws))
        mean, lo, hi = stratified_bootstrap_ci(
            groups, resamples, level, [dseed[d] for d in present]
        )
        means = None if any(m is None for m in draw_means) else np.mean(draw_means, axis=0)
        n_draws = None if means is None else sum(c[1] for c in counts)
        n_tasks = sum(c[0] for c in counts)
        out.append(_difference_row(MEAN, MEAN, N, name_a, name_b, np.mean(dice_a), np.mean(dice_b),
                                   mean, lo, hi, means, level, n_tasks, n_draws))  # fmt: skip
    return out


def _difference_row(scope, dataset, N, name_a, name_b, da, db, mean, lo, hi, means, level,
                    tasks, draws) -> dict:  # fmt: skip
    dlo, dhi = (None, None) if means is None else percentile_interval(means, level)
    return {
        "scope": scope, "dataset": dataset, "N": N, "method_a": "+".join(name_a),
        "method_b": "+".join(name_b), "dice_a": float(da), "dice_b": float(db),
        "diff": float(mean), "ci_low": float(lo), "ci_high": float(hi),
        "ci_draws_low": None if dlo is None else float(dlo),
        "ci_draws_high": None if dhi is None else float(dhi), "tasks": tasks, "draws": draws,
    }  # fmt: skip


def differences(summary: Sequence[dict]) -> list[dict]:
    """The paired differences carried by :func:`summarize`'s rows, as rows of
    :data:`DIFFERENCE_COLUMNS` (``method_a``: the reference; ``method_b``: the other method)."""
    dice = {(s["method"], s["dataset"], s["N"]): s["dice"] for s in summary}
    return [
        {
            "scope": s["scope"],
            "dataset": s["dataset"],
            "N": s["N"],
            "method_a": s["paired_ref"],
            "method_b": s["method"],
            "dice_a": dice.get((s["paired_ref"], s["dataset"], s["N"])),
            "dice_b": s["dice"],
            "diff": s["paired_diff"],
            "ci_low": s["paired_ci_low"],
            "ci_high": s["paired_ci_high"],
            "ci_draws_low": s.get("paired_ci_draws_low"),
            "ci_draws_high": s.get("paired_ci_draws_high"),
            "tasks": s["tasks"],
            "draws": s.get("draws"),
        }  # fmt: skip
        for s in summary
        if s.get("paired_ref") is not None
    ]


# ------------------------------------------------------------------------------ markdown


def markdown_table(summary: Sequence[dict], interval: str = "tasks") -> str:
    """Rows (dataset, method), columns N; cells ``Dice x100 [CI low, CI high]``.

    ``interval``: "tasks" (``ci_low``/``ci_high``) or "draws" (``ci_draws_low``/``_high``,
    "n/a" where there is none). ``†`` marks a within-subject dataset, ``⚠`` one that the model
    saw in training.
    """
    if interval not in ("tasks", "draws"):
        raise ValueError(f"interval: 'tasks' or 'draws', got {interval!r}")
    lo_key, hi_key = (
        ("ci_low", "ci_high") if interval == "tasks" else ("ci_draws_low", "ci_draws_high")
    )
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
            cells = ["" if r is None else _cell_text(r["dice"], r.get(lo_key), r.get(hi_key))
                     for r in row]  # fmt: skip
            lines.append(
                "| " + " | ".join([name + mark, m, str(present[0]["tasks"]), *cells]) + " |"
            )
    return "\n".join(lines)


def _interval_text(lo: float | None, hi: float | None) -> str:
    return "[n/a]" if lo is None or hi is None else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def _cell_text(value: float, lo: float | None, hi: float | None, sign: str = "") -> str:
    """``Dice x100 [low, high]`` (``sign="+"``: signed, for differences)."""
    return f"{100 * value:{sign}.1f} {_interval_text(lo, hi)}"


def differences_table(diffs: Sequence[dict]) -> str:
    """Rows (dataset, ``a - b``), columns N; cells ``diff x100 [over tasks]; draws [over
    draws]`` (rows of :data:`DIFFERENCE_COLUMNS`, e.g. from :func:`differences` or
    :func:`~megaseg.evaluation.compare.compare_runs`)."""
    Ns = sorted({x["N"] for x in diffs})
    cell = {(x["dataset"], x["method_a"], x["method_b"], x["N"]): x for x in diffs}
    pairs = _ordered((x["method_a"], x["method_b"]) for x in diffs)
    datasets = _ordered(x["dataset"] for x in diffs if x["dataset"] != MEAN)
    head = ["dataset", "difference", "tasks", *[f"N={n}" for n in Ns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(Ns)) + "|"]
    for d in [*datasets, MEAN]:
        for a, b in pairs:
            row = [cell.get((d, a, b, n)) for n in Ns]
            present = [x for x in row if x is not None]
            if not present:
                continue
            cells = [
                ""
                if x is None
                else _cell_text(x["diff"], x["ci_low"], x["ci_high"], "+")
                + "; draws "
                + _interval_text(x["ci_draws_low"], x["ci_draws_high"])
                for x in row
            ]
            name = f"**{d}**" if d == MEAN else d
            lines.append(
                "| " + " | ".join([name, f"{a} − {b}", str(present[0]["tasks"]), *cells]) + " |"
            )
    return "\n".join(lines)


def interval_notes(summary: Sequence[dict], level: float = DEFAULT_LEVEL) -> list[str]:
    """What each interval of a summary covers, and where the one over tasks is only a range."""
    pct = f"{100 * level:.0f}%"
    notes = [
        f"Interval over tasks (first table, `ci_low`/`ci_high`): {pct} percentile bootstrap "
        "resampling the dataset's tasks; it speaks for other tasks of this kind, and is only as "
        "good as the number of tasks."
    ]
    few = {
        s["dataset"]: s["tasks"]
        for s in summary
        if s["scope"] == "dataset" and is_task_range(s["tasks"], level)
    }
    if few:
        notes.append(
            "With so few tasks the interval over tasks is just the [min, max] of the task means "
            "(one task: zero width), not a "
            + pct
            + " interval: "
            + ", ".join(f"{d} ({n} task{'s' * (n != 1)})" for d, n in few.items())
            + "."
        )
    if any(s.get("ci_draws_low") is not None for s in summary):
        notes.append(
            "Interval over draws (second table, `ci_draws_low`/`ci_draws_high`): the support "
            "draws resampled within each task (stratified by task; a draw = one support set, or "
            "ensemble, with its queries' Dice averaged, one per query in within-subject tasks; "
            "task means weighted by queries). It "
            "covers only the randomness of which support examples were drawn, for these tasks, "
            "query subjects and support subjects, NOT other subjects or tasks; zero width with "
            "one draw per N, and narrow when N approaches the support pool (the draws then "
            "share most examples)."
        )
    if any(s.get("paired_ref") is not None for s in summary):
        notes.append(
            "Paired differences (last table): Dice(a) − Dice(b) on the same tasks, draws and "
            "queries; each interval resamples the same units (tasks, or draws within tasks) for "
            "both methods and takes the difference of the resampled means."
        )
    return notes


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
    ]
    level = meta.get("level", DEFAULT_LEVEL)
    if any(r.get("ci_draws_low") is not None for r in summary):
        lines += [
            f"Dice x100 [{100 * level:.0f}% interval over the support draws within each task "
            "(stratified by task)]:",
            "",
            markdown_table(summary, "draws"),
            "",
        ]
    diffs = differences(summary)
    if diffs:
        lines += [
            f"Paired differences, Dice x100 [{100 * level:.0f}% interval over tasks]; draws "
            "[over draws]:",
            "",
            differences_table(diffs),
            "",
        ]
    lines.append("Notes:")
    notes = interval_notes(summary, level)
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
            "candidate, and repeat the predictions of the smallest N that reached the pool: "
            "the same support sets are not predicted again): "
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
        path = out_dir / f"dice_vs_n_{slug(d)}.png"
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
            drawn = [] if mask is None else [(np.asarray(mask).astype(bool), color)]
            ax.imshow(overlay_rgb(img, drawn, alpha=0.45), interpolation="nearest")
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
    "DIFFERENCE_COLUMNS",
    "differences",
    "differences_table",
    "interval_notes",
    "markdown_report",
    "markdown_table",
    "paired_differences",
    "plot_cases",
    "plot_dice_vs_n",
    "read_csv",
    "summarize",
    "task_means",
    "write_csv",
]
