"""Paired comparison of two evaluation folders that used the same support draws.

Two ``megaseg evaluate`` runs replayed on one ``draws.json`` (another checkpoint, the same model
with and without ``--flips``, ...) predicted the same queries from the same support sets, so
their difference is paired: per task and per draw, the same units on both sides::

    from megaseg.evaluation.compare import compare_runs
    from megaseg.evaluation.report import differences_table
    diffs = compare_runs("eval_flips/", "eval_plain/")          # megaseg vs megaseg
    diffs = compare_runs("eval_new/", "eval_old/", method_b="mean_label")
    print(differences_table(diffs))

Only the outputs are read (``draws.json`` and ``predictions.csv``); nothing is predicted again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megaseg.evaluation.defaults import DEFAULT_LEVEL, DEFAULT_RESAMPLES
from megaseg.evaluation.report import paired_differences, read_csv, task_means

# The columns that identify one prediction: the same in both runs for a paired comparison.
ROW_KEY = ("dataset", "task", "N", "r", "seed", "query")


def compare_runs(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    method_a: str = "megaseg",
    method_b: str = "megaseg",
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int | None = None,
) -> list[dict]:
    """Per dataset and N (and the mean over datasets): ``Dice(method_a in dir_a) - Dice(method_b
    in dir_b)`` with both paired intervals, as rows of
    :data:`~megaseg.evaluation.report.DIFFERENCE_COLUMNS` (``method_a``/``method_b`` are then
    ``"<folder>:<method>"``).

    ``diff`` is the mean over tasks of the per-task differences; ``ci_low``/``ci_high`` resample
    the tasks and ``ci_draws_low``/``ci_draws_high`` the support draws within each task, the
    same units on both sides (see :func:`~megaseg.evaluation.report.paired_differences`).
    ``seed``: of the bootstrap; None takes the one recorded in ``dir_a/draws.json`` (as
    ``megaseg evaluate`` does), 0 if none.

    Raises:
        ValueError: naming the files, if a folder lacks ``draws.json`` or ``predictions.csv``,
            the two ``draws.json`` hold different draws (their ``settings``, e.g. ``flips``, may
            differ), a method has no rows in its folder, or the two methods' predictions are not
            the same (dataset, task, N, r, seed, query) keys.
    """
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    draws_a, draws_b = _draws(dir_a), _draws(dir_b)
    if draws_a["draws"] != draws_b["draws"]:
        raise ValueError(
            f"{dir_a / 'draws.json'} and {dir_b / 'draws.json'} hold different draws "
            f"({_first_difference(draws_a['draws'], draws_b['draws'])}): the runs are not paired; "
            "evaluate one of them again with --draws set to the other's draws.json"
        )
    rows_a = _rows(dir_a / "predictions.csv", method_a)
    rows_b = _rows(dir_b / "predictions.csv", method_b)
    keys_a = {tuple(r[k] for k in ROW_KEY) for r in rows_a}
    keys_b = {tuple(r[k] for k in ROW_KEY) for r in rows_b}
    if keys_a != keys_b or len(keys_a) != len(rows_a) or len(keys_b) != len(rows_b):
        only = sorted(keys_a ^ keys_b)[:1]
        example = f" (e.g. {dict(zip(ROW_KEY, only[0], strict=True))})" if only else ""
        raise ValueError(
            f"{dir_a / 'predictions.csv'} ({method_a}: {len(rows_a)} rows) and "
            f"{dir_b / 'predictions.csv'} ({method_b}: {len(rows_b)} rows) are not predictions "
            "of the same draws and queries" + (example or " (duplicate rows)")
        )
    name_a, name_b = f"{dir_a.name}:{method_a}", f"{dir_b.name}:{method_b}"
    if name_a == name_b:
        name_a, name_b = f"{dir_a}:{method_a}", f"{dir_b}:{method_b}"
    for r in rows_a:
        r["method"] = name_a
    for r in rows_b:
        r["method"] = name_b
    if seed is None:
        recorded = draws_a.get("settings", {}).get("seed", 0)
        seed = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else 0
    return paired_differences(task_means(rows_a), task_means(rows_b), resamples, level, seed)


def _draws(folder: Path) -> dict:
    path = folder / "draws.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the draws file ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("draws"), list):
        raise ValueError(f"{path}: not a megaseg draws file (no 'draws' list)")
    return data


def _first_difference(a: list, b: list) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} draws"
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return f"first at draws[{i}]"


def _rows(path: Path, method: str) -> list[dict]:
    """``method``'s rows of a predictions.csv, typed as :func:`task_means` needs them."""
    try:
        raw = read_csv(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the predictions ({e})") from e
    rows = [r for r in raw if r.get("method") == method]
    if not rows:
        methods = sorted({r.get("method") for r in raw if r.get("method")})
        raise ValueError(f"{path}: no rows of method {method!r} (methods there: {methods})")
    out = []
    for i, r in enumerate(rows):
        try:
            out.append({
                **r, "N": int(r["N"]), "r": int(r["r"]), "seed": int(r["seed"]),
                "support_size": int(r["support_size"]), "dice": float(r["dice"]),
                "within_subject": r["within_subject"] == "True", "overlap": r["overlap"] == "True",
            })  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: {method} row {i + 1}: bad or missing field ({e})") from e
    return out


__all__ = ["ROW_KEY", "compare_runs"]
