"""``evaluate()``: a model and its baselines on held-out datasets, on the same support draws.

    from megaseg.evaluation import evaluate, corpus_sources, SyntheticSource
    result = evaluate("run/export/final.safetensors",
                      corpus_sources("corpus/", ["ACDC", "WBC"]) + [SyntheticSource(50)],
                      support_sizes=(1, 2, 4, 8, 16), draws_per_n=3, out_dir="eval/")
    print(result.table)               # dataset x N, Dice [95% CI], every method
    result.dice("megaseg", "mean", 16)

    # another checkpoint on exactly the same draws:
    evaluate("other.safetensors", sources, draws="eval/draws.json", out_dir="eval_other/")
    # the same model with flip test-time augmentation, on the same draws (a paired ablation):
    evaluate("run/export/final.safetensors", sources, draws="eval/draws.json", flips=True)

The protocol (what is drawn, what is excluded) is in :mod:`megaseg.evaluation.protocol`, the
intervals in :mod:`megaseg.evaluation.stats`, the outputs in :mod:`megaseg.evaluation.report`.
Outputs replace only files an earlier evaluation wrote and nobody changed since
(:mod:`megaseg.outputs`), checked before anything runs; never the draws file being replayed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from megaseg.checkpoint import CheckpointError, card_path
from megaseg.evaluation import report
from megaseg.evaluation.baselines import MeanLabel, Method, ModelMethod, SupervisedUNet, random_init
from megaseg.evaluation.defaults import DEFAULT_METHODS
from megaseg.evaluation.overlap import (
    CardFieldError,
    OverlapError,
    card_training_datasets,
    find_overlaps,
)
from megaseg.evaluation.protocol import (
    DEFAULT_DRAWS_PER_N,
    DEFAULT_SUPPORT_SIZES,
    DrawSet,
    binarize,
    check_draw,
    dice,
    ensemble_predict,
    make_draws,
    replay_check,
)
from megaseg.evaluation.sources import Source
from megaseg.evaluation.stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES
from megaseg.inference import FLIPS, Segmenter, flip_tta
from megaseg.outputs import check_replaceable
from megaseg.outputs import record as record_outputs
from megaseg.paths import atomic_write, slug

MODEL_METHOD = "megaseg"
# What ``out_dir`` receives: these files, and PNGs named by these patterns.
OUTPUT_FILES = ("draws.json", "predictions.csv", "tasks.csv", "summary.csv", "summary.md",
                "summary.json")  # fmt: skip
OUTPUT_PLOTS = ("dice_vs_n_*.png", "cases_*.png")


class FlipTTA:
    """A method under flip test-time augmentation (:func:`~megaseg.inference.flip_tta`): its
    probabilities averaged over the identity, horizontal, vertical and both flips of the task
    (query and support flipped together, each output flipped back); 4 calls per support set."""

    def __init__(self, method: Method):
        self.method = method
        self.name = method.name

    def predict(
        self, query: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor,
        *, seed: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        return flip_tta(
            lambda q, images, labels: self.method.predict(q, images, labels, seed=seed),
            query,
            support_images,
            support_labels,
        )


@dataclass
class EvaluationResult:
    """Everything an evaluation produced.

    rows: one dict per prediction (see :data:`~megaseg.evaluation.report.PREDICTION_COLUMNS`).
    tasks: per (method, task, N) mean Dice. summary: per (method, dataset or "mean", N) Dice
    with its bootstrap interval. table: the markdown table; report: the whole summary.md.
    draws: the draws used (write them with ``draws.save``). paths: the files written (empty
    without ``out_dir``). meta: settings, model, training datasets, overlaps, timings.
    """

    rows: list[dict]
    tasks: list[dict]
    summary: list[dict]
    table: str
    report: str
    draws: DrawSet
    meta: dict
    paths: dict[str, Path | list[Path]] = field(default_factory=dict)

    def row(
        self, method: str = MODEL_METHOD, dataset: str = report.MEAN, N: int | None = None
    ) -> dict:
        """The summary row of ``method`` on ``dataset`` ("mean": over datasets) at N (default: largest)."""
        rows = [s for s in self.summary if s["method"] == method and s["dataset"] == dataset]
        if not rows:
            raise KeyError(f"no summary for method {method!r} on {dataset!r}")
        N = max(r["N"] for r in rows) if N is None else N
        for r in rows:
            if r["N"] == N:
                return r
        raise KeyError(f"no summary for method {method!r} on {dataset!r} at N={N}")

    def dice(
        self, method: str = MODEL_METHOD, dataset: str = report.MEAN, N: int | None = None
    ) -> float:
        """Mean Dice (see :meth:`row`)."""
        return self.row(method, dataset, N)["dice"]

    def ci(
        self, method: str = MODEL_METHOD, dataset: str = report.MEAN, N: int | None = None
    ) -> tuple[float, float]:
        """The bootstrap interval of :meth:`dice`."""
        r = self.row(method, dataset, N)
        return r["ci_low"], r["ci_high"]


def _load_model(checkpoint_or_model, resolution, device) -> tuple[Segmenter, dict | None, str]:
    """A checkpoint path / model name, a Segmenter or a network -> (Segmenter, card, description)."""
    if isinstance(checkpoint_or_model, Segmenter):
        seg = checkpoint_or_model
        if resolution is not None and resolution != seg.resolution:
            raise ValueError(
                f"resolution: {resolution} given, but the Segmenter runs at {seg.resolution}"
            )
        return seg, seg.card, f"Segmenter({type(seg.model).__name__})"
    if isinstance(checkpoint_or_model, nn.Module):
        seg = Segmenter(checkpoint_or_model, resolution or 128, device)
        return seg, None, f"in-memory {type(checkpoint_or_model).__name__}"
    if isinstance(checkpoint_or_model, str | os.PathLike):
        seg = Segmenter.from_checkpoint(checkpoint_or_model, device, resolution=resolution)
        return seg, seg.card, str(checkpoint_or_model)
    raise TypeError(
        f"checkpoint_or_model: expected a checkpoint path, a Segmenter or an nn.Module, got "
        f"{type(checkpoint_or_model).__name__}"
    )


def _methods(
    names: Sequence[str | Method],
    seg: Segmenter,
    seed: int,
    supervised_steps: int,
    model_label: str,
    flips: bool = False,
) -> list[Method]:
    out: list[Method] = []
    for m in names:
        if not isinstance(m, str):
            out.append(m)
        elif m == MODEL_METHOD:
            model = ModelMethod(seg, name=model_label)
            out.append(FlipTTA(model) if flips else model)
        elif m == "mean_label":
            out.append(MeanLabel())
        elif m == "supervised":
            out.append(SupervisedUNet(steps=supervised_steps, device=seg.device))
        elif m == "random_init":
            out.append(random_init(seg, seed=seed))
        else:
            raise ValueError(
                f"methods: unknown method {m!r}; known: {', '.join(DEFAULT_METHODS)} (or pass an "
                "object with .name and .predict)"
            )
    names_ = [m.name for m in out]
    if len(set(names_)) != len(names_):
        raise ValueError(f"methods: names must be unique, got {names_}")
    if not out:
        raise ValueError("methods: at least one method")
    return out


def evaluate(
    checkpoint_or_model,
    sources: Source | Sequence[Source],
    *,
    support_sizes: Sequence[int] = DEFAULT_SUPPORT_SIZES,
    draws_per_n: int = DEFAULT_DRAWS_PER_N,
    ensemble: int = 1,
    flips: bool | None = None,
    methods: Sequence[str | Method] = DEFAULT_METHODS,
    out_dir: str | os.PathLike | None = None,
    draws: str | os.PathLike | DrawSet | None = None,
    seed: int = 0,
    allow_overlap: bool = False,
    resolution: int | None = None,
    device: str | torch.device | None = None,
    supervised_steps: int = 300,
    max_queries: int | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    model_label: str = MODEL_METHOD,
    training_datasets: Sequence[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    scheduler: str | None = None,
) -> EvaluationResult:
    """Evaluate a model and baselines on held-out sources (see the module docstring).

    Args:
        checkpoint_or_model: a checkpoint file (or shipped model name), a
            :class:`~megaseg.inference.Segmenter`, or a network (run at ``resolution``,
            default 128).
        sources: datasets to evaluate on (:mod:`megaseg.evaluation.sources`).
        support_sizes, draws_per_n, ensemble, seed, max_queries: the sweep (see
            :func:`~megaseg.evaluation.protocol.make_draws`); ignored when ``draws`` is given.
        flips: flip test-time augmentation of the "megaseg" method (:class:`FlipTTA`: 4x its
            forward passes); the baselines and method objects are unaffected. None: the value
            recorded in ``draws`` (False for a file without it), else False; True or False
            overrides it, so one model can be compared with and without flips on the same
            draws. Recorded as ``settings["flips"]`` in draws.json and the meta.
        methods: names among "megaseg", "mean_label", "supervised", "random_init", or method
            objects (``.name``, ``.predict``). The model's own rows are named ``model_label``.
        out_dir: write the CSVs, summary.md / .json, draws.json and plots there (None: write
            nothing). A file of those names that an earlier evaluation did not write (or that
            was changed since) is refused before anything runs, unless ``overwrite``; the
            replayed draws file never.
        draws: a draws.json (or DrawSet) to replay exactly.
        allow_overlap: evaluate even on datasets the card lists as training data; a loud
            warning, and every output is flagged.
        training_datasets: overrides the card's list (needed to check a bare network).
        supervised_steps: training steps of the supervised baseline per support set.
        resamples, level: the bootstrap over tasks.
        scheduler: a Dask scheduler address or ``local:N`` (:mod:`megaseg.cluster`): each
            (task, N, draw) is one task on its workers, which receive the methods and sources
            once (a corpus is read by them: the same absolute path on a shared filesystem).
            The numbers are the local run's; only the timings differ.

    Raises:
        OverlapError: a dataset the model was trained on, without ``allow_overlap``.
        ProtocolError: a draw that breaks the protocol (e.g. a replayed, edited file).
        FileExistsError: ``out_dir`` holds a file of an output's name megaseg did not write.
        CheckpointError: a card whose training fields are malformed (names the card).
        megaseg.cluster.SchedulerError: the scheduler cannot be reached or was lost (nothing
            is written).
    """
    if out_dir is not None:
        _check_out_dir(Path(out_dir), draws, overwrite)
    seg, card, model_desc = _load_model(checkpoint_or_model, resolution, device)
    R = seg.resolution
    sources = [sources] if not isinstance(sources, Sequence) else list(sources)
    if not sources:
        raise ValueError("sources: nothing to evaluate on")
    descriptions = [s.describe() for s in sources]

    where = card_path(seg.weights_path) if seg.weights_path else "the model's card"
    try:
        trained = (
            list(training_datasets)
            if training_datasets is not None
            else card_training_datasets(card)
        )
        check_card = card if training_datasets is None else {"training_datasets": trained}
        overlaps = find_overlaps(check_card, descriptions)
    except CardFieldError as e:
        raise CheckpointError(f"{where}: {e}") from e
    notes: list[str] = []
    if overlaps and not allow_overlap:
        raise OverlapError(
            "refusing to evaluate on data the model was trained on (this would not be a "
            "held-out evaluation):\n  "
            + "\n  ".join(overlaps)
            + "\nEvaluate on other datasets, or pass allow_overlap=True (--allow-overlap) to "
            "run anyway with every output flagged."
        )
    if overlaps:
        msg = "NOT HELD OUT (allow_overlap): " + "; ".join(overlaps)
        warnings.warn(msg, stacklevel=2)
    if trained is None:
        notes.append(
            "the model has no card listing its training datasets: held-out status not checked"
        )
        warnings.warn(notes[-1], stacklevel=2)
    overlapping = {o.split(":", 1)[0] for o in overlaps}

    if flips is not None and not isinstance(flips, bool):
        raise ValueError(f"flips: expected True, False or None, got {flips!r}")
    if flips and MODEL_METHOD not in [m for m in methods if isinstance(m, str)]:
        raise ValueError(
            f"flips: flip test-time augmentation applies to the {MODEL_METHOD!r} method, which "
            f"is not among the methods {[getattr(m, 'name', m) for m in methods]}"
        )
    replayed = draws is not None
    if replayed:
        drawset = draws if isinstance(draws, DrawSet) else DrawSet.load(draws)
        recorded = _recorded_flips(drawset)
        replay_check(drawset, sources, R)
    else:
        drawset = make_draws(sources, R, support_sizes, draws_per_n, ensemble, seed, max_queries)
        recorded = False
    flips = recorded if flips is None else flips
    # Recorded beside the draws (a copy: a DrawSet passed in is left as it is), so that
    # replaying the written draws.json predicts the same way.
    drawset = dataclasses.replace(drawset, settings={**drawset.settings, "flips": flips})

    method_objs = _methods(methods, seg, seed, supervised_steps, model_label, flips)
    primary = method_objs[0].name
    rows, cases, seconds = _run(
        drawset, sources, method_objs, R, overlapping, primary, progress, scheduler
    )

    tasks = report.task_means(rows)
    summary = report.summarize(tasks, resamples, level, drawset.settings.get("seed", seed))
    timings = {}
    for m in method_objs:
        if seconds[m.name]:
            detail = f"{m.steps} training steps each" if isinstance(m, SupervisedUNet) else ""
            if isinstance(m, FlipTTA):
                detail = f"flip TTA: {len(FLIPS)} flipped views each"
            timings[m.name] = {"mean_seconds": float(np.mean(seconds[m.name])),
                               "calls": len(seconds[m.name]), "detail": detail}  # fmt: skip
    meta = {
        "model": model_desc,
        "card_model": (card or {}).get("model"),
        "training_datasets": trained,
        "datasets": [s.dataset for s in sources if s.dataset in drawset.datasets],
        "sources": descriptions,
        "settings": drawset.settings,
        "replayed": replayed,
        "methods": [m.name for m in method_objs],
        "overlap": overlaps,
        "allow_overlap": allow_overlap,
        "tasks": drawset.tasks,
        "skipped": drawset.skipped,
        "timings": timings,
        "warnings": notes,
        "resamples": resamples,
        "level": level,
    }
    result = EvaluationResult(
        rows=rows,
        tasks=tasks,
        summary=summary,
        table=report.markdown_table(summary),
        report=report.markdown_report(summary, meta),
        draws=drawset,
        meta=meta,
    )
    if out_dir is not None:
        result.paths = _write(result, Path(out_dir), sources, cases, primary, R)
    return result


def _recorded_flips(drawset: DrawSet) -> bool:
    """``settings["flips"]`` of a draws file; absent (files written before flip TTA): False."""
    value = drawset.settings.get("flips", False)
    if not isinstance(value, bool):
        raise ValueError(
            f"{drawset.path or 'draws'}: settings: 'flips' must be true or false, got {value!r}"
        )
    return value


def _run(drawset, sources, methods, R, overlapping, primary, progress, scheduler=None):
    """Predict every draw with every method -> (rows, best/median/worst candidates, timings).

    Each draw is one unit (:func:`_predict_draw`), run here in order or, with ``scheduler``,
    as a task on a Dask cluster (:mod:`megaseg.cluster`); rows come out in the same order
    either way, from the same tensors, so the numbers are the same.
    """
    from tqdm.auto import tqdm

    from megaseg.progress import progress_options

    by_name = {s.dataset: s for s in sources}
    task_of = {}
    for s in sources:
        if s.dataset in drawset.datasets:
            task_of |= {(t.dataset, t.name): t for t in s.tasks()}
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for d in drawset.draws:
        groups[(d.dataset, d.task)].append(d)
    max_n = max(d.N for d in drawset.draws)
    # Draws of a capped N (N above the task's pool) hold the same support sets as the draw of
    # the smallest N that reached the pool size: such a draw is predicted once, and its
    # outputs serve the other Ns (the same input; only the N column differs).
    units = []  # (position, dataset, task, the task's example ids, draw, pack the masks)
    entries: list[tuple] = []  # per draw: (draw, position of the unit that predicts it, first)
    for (dataset, name), draws in groups.items():
        task = task_of.get((dataset, name))
        if task is None:
            raise ValueError(f"draws: task {dataset}/{name} is not in the source {dataset!r}")
        ids = tuple(
            dict.fromkeys(
                i for d in draws for i in (*d.queries, *(x for s in d.support for x in s))
            )
        )
        first: dict[tuple, int] = {}
        for d in draws:
            check_draw(d, task)
            key = (d.r, d.queries, tuple(sorted(tuple(sorted(s)) for s in d.support)))
            if key in first:
                entries.append((d, first[key], False))
                if d.N == max_n:  # the best/median/worst plot needs the masks
                    units[first[key]] = (*units[first[key]][:5], True)
                continue
            first[key] = len(units)
            entries.append((d, len(units), True))
            units.append((len(units), dataset, name, ids, d, d.N == max_n))
    predictor = _Predictor(by_name, methods, R, primary)
    bar = tqdm(total=len(units) * len(methods), desc="evaluate", unit="draw",
               disable=not progress, leave=False, **progress_options())  # fmt: skip
    outputs: list = [None] * len(units)
    for unit, out in _predictions(predictor, units, scheduler):
        outputs[unit[0]] = out
        bar.update(len(methods))
    bar.close()
    _LOADED.clear()

    rows: list[dict] = []
    cases: list[dict] = []  # primary method at the largest N: packed predictions
    seconds: dict[str, list[float]] = {m.name: [] for m in methods}
    for d, pos, computed in entries:
        dataset, name = d.dataset, d.task
        task = task_of[(dataset, name)]
        for m, (elapsed, scores, truth_pixels, pred_pixels, packed) in zip(
            methods, outputs[pos], strict=True
        ):
            if computed:
                seconds[m.name].append(elapsed / d.ensemble)
            if d.N != max_n:
                packed = None
            for b, q in enumerate(d.queries):
                rows.append({
                    "method": m.name, "dataset": dataset, "task": name, "query": q,
                    "subject": task.subjects[q], "N": d.N, "support_size": d.support_size,
                    "r": d.r, "ensemble": d.ensemble, "seed": d.seed, "dice": scores[b],
                    "truth_pixels": truth_pixels[b], "pred_pixels": pred_pixels[b],
                    "within_subject": d.within_subject, "overlap": dataset in overlapping,
                    "call_seconds": elapsed,
                })  # fmt: skip
                if packed is not None:
                    cases.append({"row": len(rows) - 1, "pred": packed[b]})
    return rows, cases, seconds


def _check_out_dir(out: Path, draws, overwrite: bool) -> None:
    """Before anything runs: ``out`` is a folder (or absent), its files of output names are
    megaseg's (or ``overwrite``), and its draws.json is not the file being replayed."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; out_dir (--out) names the folder "
                         "the results are written to")  # fmt: skip
    replayed = draws.path if isinstance(draws, DrawSet) else draws
    if replayed is not None and Path(replayed).exists():
        target = out / "draws.json"
        if target.exists() and os.path.samefile(replayed, target):
            raise ValueError(
                f"{target}: is the draws file this evaluation replays; its results would replace "
                "it and the results of the run that made it: choose another out_dir (--out)"
            )
    if not out.is_dir():
        return
    existing = [out / n for n in OUTPUT_FILES] + [p for g in OUTPUT_PLOTS for p in out.glob(g)]
    for path in existing:
        check_replaceable(path, overwrite, hint="pass overwrite=True (--overwrite)")


def _written_files(paths: dict) -> list[Path]:
    files: list[Path] = []
    for value in paths.values():
        files += [Path(v) for v in value] if isinstance(value, list) else [Path(value)]
    return files


@dataclass
class _Predictor:
    """What predicting a draw needs: sources by dataset name, the methods, the resolution;
    copied once to each Dask worker. ``token`` keys the per-process cache of loaded tasks."""

    sources: dict[str, Source]
    methods: list[Method]
    R: int
    primary: str
    token: str = field(default_factory=lambda: os.urandom(8).hex())


# (token, dataset, task) -> (images, labels) of the tasks loaded last in this process: draws
# of one task come one after another, so each task is loaded once locally (and about once per
# worker on a cluster).
_LOADED: OrderedDict = OrderedDict()
_LOADED_TASKS = 2


def _task_examples(predictor: _Predictor, dataset: str, name: str, ids: tuple[str, ...]):
    """``(images, labels)`` ``(len(ids), 1, R, R)`` of a task's examples ``ids``, cached."""
    key = (predictor.token, dataset, name)
    if key not in _LOADED:
        _LOADED[key] = predictor.sources[dataset].load(name, list(ids), predictor.R)
        while len(_LOADED) > _LOADED_TASKS:
            _LOADED.popitem(last=False)
    return _LOADED[key]


def _predict_draw(predictor: _Predictor, unit) -> list[tuple]:
    """One draw, every method -> per method ``(seconds, dice per query, truth pixels per
    query, predicted pixels per query, packed predicted masks or None)``; the masks only for
    the primary method when the unit's ``pack`` is set (it serves the largest N: the best /
    median / worst plot)."""
    _, dataset, name, ids, d, pack = unit
    images, labels = _task_examples(predictor, dataset, name, ids)
    index = {i: k for k, i in enumerate(ids)}
    q_rows = torch.tensor([index[q] for q in d.queries])
    queries, truth = images[q_rows], binarize(labels[q_rows])
    out = []
    for m in predictor.methods:
        start = time.perf_counter()
        probs = ensemble_predict(m, queries, images, labels, d, index)
        elapsed = time.perf_counter() - start
        pred = probs > 0.5
        packed = None
        if m.name == predictor.primary and pack:
            packed = [np.packbits(p[0].numpy()) for p in pred]
        out.append((
            elapsed, dice(probs, truth).tolist(), truth.flatten(1).sum(1).tolist(),
            pred.flatten(1).sum(1).tolist(), packed,
        ))  # fmt: skip
    return out


def _predictions(predictor: _Predictor, units: list, scheduler: str | None):
    """Yield ``(unit, output of _predict_draw)``: in order here, as they finish on a cluster."""
    if scheduler is None:
        for unit in units:
            yield unit, _predict_draw(predictor, unit)
        return
    from concurrent.futures import CancelledError

    from megaseg.cluster import SchedulerError, as_finished, connect

    with connect(scheduler) as cluster:
        shared = cluster.share(predictor)  # the model: sent once to each worker
        died = (cluster.worker_died, CancelledError)
        done = as_finished(cluster.executor, _predict_draw, units, shared, survive=died)
        try:
            for unit, out in done:
                if isinstance(out, BaseException) and cluster.client.status == "running":
                    _, dataset, name, _, d, _ = unit
                    raise SchedulerError(
                        f"--scheduler {scheduler}: workers died running the draw {dataset}/"
                        f"{name} N={d.N} r={d.r}, or every worker holding the model did "
                        f"({type(out).__name__}; out of memory?); nothing was written"
                    )
                if isinstance(out, BaseException):
                    raise out
                yield unit, out
        finally:
            done.close()


def _write(result: EvaluationResult, out: Path, sources, cases, primary, R) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {
        "draws": result.draws.save(out / "draws.json"),
        "predictions": report.write_csv(
            out / "predictions.csv", result.rows, report.PREDICTION_COLUMNS
        ),
        "tasks": report.write_csv(out / "tasks.csv", result.tasks, report.TASK_COLUMNS),
        "summary_csv": report.write_csv(
            out / "summary.csv", result.summary, report.SUMMARY_COLUMNS
        ),
    }
    record = {
        "meta": result.meta,
        "summary": result.summary,
        "differences": report.differences(result.summary),
    }
    text = json.dumps(record, indent=1, default=str)
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(result.report))
    paths["summary_md"] = out / "summary.md"
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    paths["summary_json"] = out / "summary.json"
    paths["plots"] = report.plot_dice_vs_n(result.summary, out)
    if cases:
        paths["cases"] = _plot_cases(result, cases, sources, primary, R, out)
    record_outputs(_written_files(paths), by="megaseg evaluate")
    return paths


def _plot_cases(result, cases, sources, primary, R, out: Path) -> Path:
    """Best, median and worst predictions of the primary method at its largest N."""
    order = sorted(cases, key=lambda c: (result.rows[c["row"]]["dice"], c["row"]))
    picks = [("worst", order[0]), ("median", order[len(order) // 2]), ("best", order[-1])]
    by_name = {s.dataset: s for s in sources}
    panels = []
    for what, c in reversed(picks):
        row = result.rows[c["row"]]
        image, label = by_name[row["dataset"]].load(row["task"], [row["query"]], R)
        pred = np.unpackbits(c["pred"])[: R * R].reshape(R, R)
        panels.append({
            "image": image[0, 0].numpy(), "truth": binarize(label[0, 0]).numpy(), "pred": pred,
            "label": f"{what}: Dice {row['dice']:.3f}\n{row['dataset']}\n{row['task']}\n"
                     f"query {row['query']}, N={row['support_size']}, r={row['r']}",
        })  # fmt: skip
    N = result.rows[picks[0][1]["row"]]["N"]
    used = sorted({result.rows[c["row"]]["support_size"] for c in cases})
    sizes = f"{used[0]}" if len(used) == 1 else f"{used[0]}-{used[-1]}"
    title = f"{primary}: best, median and worst predictions at N={N}"
    if used != [N]:  # capped to small pools: name the support sizes the rows really used
        title = f"{primary}: best, median and worst predictions at N={N} (support sizes {sizes})"
    return report.plot_cases(panels, out / f"cases_{slug(primary)}.png", title=title)


__all__ = ["DEFAULT_METHODS", "EvaluationResult", "FlipTTA", "OverlapError", "evaluate"]
