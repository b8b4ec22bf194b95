"""The evaluation protocol: which support sets are drawn for which queries, and how it is scored.

For every task, every support size N of the sweep and every repetition ``r < draws_per_n``
one *draw* is made: ``K = ensemble`` support sets of ``n = min(N, available)`` examples each,
drawn without replacement from the task's support pool, and the queries they serve.

- Standard task: the support pool is the train split, the queries are the whole test split
  (minus empty ones, see below); one draw serves all queries of the task. Support and query
  subjects are disjoint, which :func:`check_draw` verifies for every draw.
- Within-subject task (a single-subject dataset): one draw per query, its support drawn from
  the task's other examples; :func:`check_draw` verifies the query is not in its support.
- Truth is binarized at 0.5 (``label > 0.5``, as predictions are ``prob > 0.5``); queries whose
  binarized truth is empty are excluded before drawing, and counted.
- N larger than the pool is capped to the pool's size (the row keeps the requested N as its
  column and the used size as ``support_size``), with one logged line per dataset naming the
  capped Ns and the pool sizes (the per-task detail is in ``draws.json``). The draws of a
  capped N hold the same support sets as those of the smallest N that reached the pool, so
  the runner predicts them once and repeats the outputs under each capped N.

A draw's randomness is a pure function of ``(seed, dataset, task, N, r)`` (plus the query for
within-subject draws), so adding a dataset or an N leaves every other draw unchanged. All draws
are written to ``draws.json`` (:meth:`DrawSet.save`); evaluating with ``draws=`` replays
exactly those draws, so two checkpoints or methods are compared on the same support sets.
A replayed file is checked in full before any example is loaded (:func:`replay_check`): every
field's type, every N, r, ensemble and support size against the file's own settings and the
task's pool, every id against the task's pools, and the protocol rules (:func:`check_draw`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megaseg.evaluation.defaults import DEFAULT_DRAWS_PER_N, DEFAULT_SUPPORT_SIZES
from megaseg.evaluation.sources import EvalTask, Source
from megaseg.metrics import batch_dice
from megaseg.paths import atomic_write

DRAWS_FORMAT = "megaseg-draws"
DRAWS_VERSION = 1
TRUTH_THRESHOLD = 0.5

# Capped N and skipped tasks are reported as one plain line per dataset on this logger (with
# no logging configured, Python prints WARNING lines to stderr as they are).
log = logging.getLogger("megaseg.evaluation")


class ProtocolError(ValueError):
    """A draw breaks the protocol (support and query share a subject, a query in its own
    support, an id that is not in the task's pools) or a draws file is not consistent."""


@dataclass(frozen=True)
class Draw:
    """K support sets of one task at one (N, r), and the queries they are used for.

    ``support[k]`` are example ids of the k-th ensemble member; ``seed`` is the draw's own seed
    (it also seeds methods that train, e.g. the supervised baseline).
    """

    dataset: str
    task: str
    N: int
    r: int
    seed: int
    queries: tuple[str, ...]
    support: tuple[tuple[str, ...], ...]
    within_subject: bool = False

    @property
    def support_size(self) -> int:
        return len(self.support[0])

    @property
    def ensemble(self) -> int:
        return len(self.support)

    def to_json(self) -> dict:
        d = asdict(self)
        d["queries"], d["support"] = list(self.queries), [list(s) for s in self.support]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Draw:
        """Parse one recorded draw, strictly: ValueError naming the field that is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"expected an object, got {type(d).__name__}")
        ids = _field(d, "queries", list)
        support = _field(d, "support", list)
        if not ids or not all(isinstance(q, str) for q in ids):
            raise ValueError(f"'queries' must be a non-empty list of example ids, got {ids!r}")
        if not support or not all(
            isinstance(s, list) and s and all(isinstance(i, str) for i in s) for s in support
        ):
            raise ValueError(
                f"'support' must be a non-empty list of non-empty lists of example ids, got "
                f"{support!r}"
            )
        within = d.get("within_subject", False)
        if not isinstance(within, bool):
            raise ValueError(f"'within_subject' must be true or false, got {within!r}")
        return cls(
            dataset=_field(d, "dataset", str),
            task=_field(d, "task", str),
            N=_field(d, "N", int, minimum=1),
            r=_field(d, "r", int, minimum=0),
            seed=_field(d, "seed", int, minimum=0),
            queries=tuple(ids),
            support=tuple(tuple(s) for s in support),
            within_subject=within,
        )


@dataclass
class DrawSet:
    """Every draw of an evaluation plus what is needed to check a replay uses the same data.

    ``tasks``: per ``"dataset/task"``: ``queries`` (used), ``excluded_empty`` (queries with
    empty truth), ``support_pool`` size, ``within_subject``, ``capped`` (the Ns that were
    capped). ``skipped``: tasks that could not be evaluated, with the reason.
    """

    settings: dict[str, Any]
    sources: list[dict]
    draws: list[Draw]
    tasks: dict[str, dict] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    path: Path | None = field(default=None, compare=False)  # the file it was loaded from

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        data = {
            "format": DRAWS_FORMAT,
            "version": DRAWS_VERSION,
            "settings": self.settings,
            "sources": self.sources,
            "tasks": self.tasks,
            "skipped": self.skipped,
            "draws": [d.to_json() for d in self.draws],
        }
        text = json.dumps(data, indent=1) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DrawSet:
        """Read a draws file, checking every field's type and the draws against the file's
        own settings (ValueError naming the file, the draw and the reason). Whether the draws
        fit the data is checked by :func:`replay_check`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the draws file ({e})") from e
        if not isinstance(data, dict) or data.get("format") != DRAWS_FORMAT:
            raise ValueError(f"{path}: not a megaseg draws file (no format: {DRAWS_FORMAT!r})")
        if data.get("version") != DRAWS_VERSION:
            raise ValueError(
                f"{path}: draws format version {data.get('version')}, this code reads {DRAWS_VERSION}"
            )
        try:
            settings = _settings(_field(data, "settings", dict))
            sources = _field(data, "sources", list)
            for i, s in enumerate(sources):
                if not isinstance(s, dict) or not isinstance(s.get("dataset"), str):
                    raise ValueError(f"sources[{i}]: expected an object with a 'dataset' name")
            tasks = data.get("tasks", {})
            skipped = data.get("skipped", [])
            if not isinstance(tasks, dict) or not isinstance(skipped, list):
                raise ValueError("'tasks' must be an object and 'skipped' a list")
            raw = _field(data, "draws", list)
            if not raw:
                raise ValueError("'draws' is empty")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        draws = []
        for i, d in enumerate(raw):
            try:
                draw = Draw.from_json(d)
                _check_against_settings(draw, settings)
            except ValueError as e:
                raise ValueError(f"{path}: draws[{i}]: {e}") from e
            draws.append(draw)
        return cls(settings, sources, draws, tasks, skipped, path=path)

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d.dataset for d in self.draws))


def _field(d: dict, key: str, kind: type, minimum: int | None = None):
    """``d[key]``, which must be of ``kind`` (an int is not a bool, nor a string of digits)."""
    if key not in d:
        raise ValueError(f"missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key!r} must be {kind.__name__}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key!r} must be >= {minimum}, got {value!r}")
    return value


def _settings(settings: dict) -> dict:
    """Check the types of a draws file's ``settings``; returns them."""
    sizes = _field(settings, "support_sizes", list)
    if not sizes or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes
    ):
        raise ValueError(f"settings: 'support_sizes' must be integers >= 1, got {sizes!r}")
    _field(settings, "draws_per_n", int, minimum=1)
    _field(settings, "ensemble", int, minimum=1)
    _field(settings, "seed", int)
    for key in ("max_queries", "resolution"):
        value = settings.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"settings: {key!r} must be an integer >= 1 or null, got {value!r}")
    return settings


def _check_against_settings(draw: Draw, settings: dict) -> None:
    """A draw must be one the file's own settings make: its N among the sweep's sizes, r below
    ``draws_per_n``, ``ensemble`` support sets of one size, at most N."""
    if draw.N not in settings["support_sizes"]:
        raise ValueError(
            f"N={draw.N} is not one of the file's support sizes {settings['support_sizes']}"
        )
    if draw.r >= settings["draws_per_n"]:
        raise ValueError(f"r={draw.r}, but the file has draws_per_n={settings['draws_per_n']}")
    if draw.ensemble != settings["ensemble"]:
        raise ValueError(
            f"{draw.ensemble} support set(s), but the file's ensemble is {settings['ensemble']}"
        )
    sizes = {len(s) for s in draw.support}
    if len(sizes) != 1 or draw.support_size > draw.N:
        raise ValueError(f"support sets of sizes {sorted(sizes)} for N={draw.N}")
    if draw.within_subject and len(draw.queries) != 1:
        raise ValueError(f"a within-subject draw serves one query, got {len(draw.queries)}")


# ------------------------------------------------------------------------------ seeds


def draw_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``(seed, *parts)``, stable across processes and versions."""
    text = "\0".join(str(p) for p in ("megaseg-eval", seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def binarize(labels: Tensor) -> Tensor:
    """Soft labels ``(..., H, W)`` -> bool truth, ``label > 0.5``."""
    return labels > TRUTH_THRESHOLD


# ------------------------------------------------------------------------------ drawing


def make_draws(
    sources: Sequence[Source],
    resolution: int,
    support_sizes: Sequence[int] = DEFAULT_SUPPORT_SIZES,
    draws_per_n: int = DEFAULT_DRAWS_PER_N,
    ensemble: int = 1,
    seed: int = 0,
    max_queries: int | None = None,
) -> DrawSet:
    """Draw the support sets of the whole sweep (see the module docstring).

    ``max_queries``: use at most this many (non-empty) queries per task, picked at random by
    the seed; None: all of them.
    """
    support_sizes = sorted({int(n) for n in support_sizes})
    if not support_sizes or support_sizes[0] < 1:
        raise ValueError(f"support_sizes: need sizes >= 1, got {support_sizes}")
    if draws_per_n < 1 or ensemble < 1:
        raise ValueError(f"need draws_per_n >= 1 and ensemble >= 1, got {draws_per_n}, {ensemble}")
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries: need >= 1 or None, got {max_queries}")
    names = [s.dataset for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"sources: each dataset once, got {names}")
    settings = {
        "support_sizes": support_sizes,
        "draws_per_n": draws_per_n,
        "ensemble": ensemble,
        "seed": seed,
        "max_queries": max_queries,
        "resolution": resolution,
        "truth_threshold": TRUTH_THRESHOLD,
    }
    out = DrawSet(settings, [s.describe() for s in sources], [])
    capped: dict[str, list[tuple[int, list[int]]]] = {}  # dataset -> (pool, capped Ns) per task
    for source in sources:
        for task in source.tasks():
            key = f"{task.dataset}/{task.name}"
            queries, excluded, reason = _usable_queries(source, task, resolution)
            pool = task.candidates
            if reason is None and pool < 1:
                reason = (
                    "a single example: nothing left for the support"
                    if task.within_subject
                    else "no support candidates (empty train split)"
                )
            if reason is not None:
                out.skipped.append({"dataset": task.dataset, "task": task.name, "reason": reason})
                continue
            if max_queries is not None and len(queries) > max_queries:
                rng = np.random.default_rng(draw_seed(seed, task.dataset, task.name, "queries"))
                keep = set(rng.choice(len(queries), max_queries, replace=False).tolist())
                queries = [q for i, q in enumerate(queries) if i in keep]
            task_capped = [N for N in support_sizes if N > pool]
            if task_capped:
                capped.setdefault(task.dataset, []).append((pool, task_capped))
            out.tasks[key] = {
                "queries": len(queries),
                "excluded_empty": excluded,
                "support_pool": pool,
                "within_subject": task.within_subject,
                "capped": task_capped,
            }
            for N in support_sizes:
                n = min(N, pool)
                for r in range(draws_per_n):
                    for d in _draw(task, queries, N, n, r, ensemble, seed):
                        check_draw(d, task)  # e.g. a source whose splits are not by subject
                        out.draws.append(d)
    for dataset, items in capped.items():
        pools = sorted({p for p, _ in items})
        Ns = sorted({n for _, ns in items for n in ns})
        span = f"{pools[0]}" if len(pools) == 1 else f"{pools[0]}-{pools[-1]}"
        total = sum(k.startswith(f"{dataset}/") for k in out.tasks)
        log.warning(
            "%s: N=%s capped to the support pool (%s examples) in %d of %d task(s)",
            dataset, ",".join(map(str, Ns)), span, len(items), total,
        )  # fmt: skip
    skipped: dict[str, dict[str, int]] = {}
    for s in out.skipped:
        reasons = skipped.setdefault(s["dataset"], {})
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    for dataset, reasons in skipped.items():
        log.warning(
            "%s: %d task(s) skipped: %s",
            dataset, sum(reasons.values()), "; ".join(f"{r} ({n})" for r, n in reasons.items()),
        )  # fmt: skip
    if not out.draws:
        raise ValueError("no task could be evaluated (see the skipped tasks above)")
    return out


def _usable_queries(
    source: Source, task: EvalTask, resolution: int
) -> tuple[list[str], int, str | None]:
    """Queries with non-empty truth, the number excluded, and a reason when none is left."""
    if not task.query_pool:
        return [], 0, "no queries (empty test split)"
    _, labels = source.load(task.name, task.query_pool, resolution)
    nonempty = binarize(labels).flatten(1).any(dim=1).tolist()
    queries = [q for q, ok in zip(task.query_pool, nonempty, strict=True) if ok]
    excluded = len(task.query_pool) - len(queries)
    if not queries:
        return (
            [],
            excluded,
            f"every query ({excluded}) has an empty truth at resolution {resolution}",
        )
    return queries, excluded, None


def _draw(
    task: EvalTask, queries: list[str], N: int, n: int, r: int, ensemble: int, seed: int
) -> list[Draw]:
    """The draw(s) of one task at one (N, r): one for all queries, or one per query."""
    if not task.within_subject:
        s = draw_seed(seed, task.dataset, task.name, N, r)
        rng = np.random.default_rng(s)
        pool = task.support_pool
        support = tuple(
            tuple(pool[i] for i in rng.choice(len(pool), n, replace=False)) for _ in range(ensemble)
        )
        return [Draw(task.dataset, task.name, N, r, s, tuple(queries), support)]
    draws = []
    for q in queries:
        s = draw_seed(seed, task.dataset, task.name, N, r, q)
        rng = np.random.default_rng(s)
        pool = [i for i in task.support_pool if i != q]
        support = tuple(
            tuple(pool[i] for i in rng.choice(len(pool), n, replace=False)) for _ in range(ensemble)
        )
        draws.append(Draw(task.dataset, task.name, N, r, s, (q,), support, within_subject=True))
    return draws


def check_draw(draw: Draw, task: EvalTask) -> None:
    """Raise :class:`ProtocolError` unless the draw respects the protocol for ``task``.

    Every id is in the task's pools; no query is in its own support; for a standard task no
    support subject is a query subject; a within-subject draw belongs to a within-subject task.
    """
    where = f"draw {draw.dataset}/{draw.task} N={draw.N} r={draw.r}"
    if draw.within_subject != task.within_subject:
        raise ProtocolError(
            f"{where}: drawn as {'within' if draw.within_subject else 'across'}-subject, but the "
            f"task is {'within' if task.within_subject else 'across'}-subject in this data"
        )
    queries, pool, qpool = set(draw.queries), set(task.support_pool), set(task.query_pool)
    if not draw.queries or not draw.support or any(not s for s in draw.support):
        raise ProtocolError(f"{where}: empty queries or support")
    if not queries <= qpool:
        raise ProtocolError(
            f"{where}: queries not in the task's query pool: {sorted(queries - qpool)}"
        )
    for k, support in enumerate(draw.support):
        if len(set(support)) != len(support):
            raise ProtocolError(f"{where}: support set {k} repeats an example")
        if not set(support) <= pool:
            raise ProtocolError(
                f"{where}: support ids not in the task's support pool: {sorted(set(support) - pool)}"
            )
        if queries & set(support):
            raise ProtocolError(
                f"{where}: query in its own support: {sorted(queries & set(support))}"
            )
        if not task.within_subject:
            shared = {task.subjects[i] for i in support} & {task.subjects[q] for q in queries}
            if shared:
                raise ProtocolError(f"{where}: support and query share subject(s) {sorted(shared)}")


def replay_check(draws: DrawSet, sources: Sequence[Source], resolution: int) -> None:
    """Raise ValueError unless ``sources`` are the data ``draws`` were made on and every draw
    fits them; nothing is loaded before this passes.

    Each dataset of the draws needs a source whose :meth:`describe` equals the recorded one
    (same corpus index checksum, same synthetic generator and seeds, same arrays). A different
    resolution is allowed (the same examples, seen at another size) with a warning. Then every
    draw must name a task of its source, pass :func:`check_draw` (ids in the pools, no shared
    subject) and use ``min(N, pool)`` examples per support set (:class:`ProtocolError`).
    """
    have = {s.dataset: s.describe() for s in sources}
    recorded = {d["dataset"]: d for d in draws.sources}
    for name in draws.datasets:
        if name not in have:
            raise ValueError(
                f"draws: dataset {name!r} is in the draws file but not among the sources "
                f"({', '.join(have) or 'none'})"
            )
        if name in recorded and _comparable(recorded[name]) != _comparable(have[name]):
            raise ValueError(
                f"draws: dataset {name!r} differs from the data the draws were made on:\n"
                f"  recorded {recorded[name]}\n  now      {have[name]}"
            )
    extra = set(have) - set(draws.datasets)
    if extra:
        warnings.warn(
            f"draws: sources {sorted(extra)} have no draws in the file and are not evaluated",
            stacklevel=3,
        )
    if draws.settings.get("resolution") not in (None, resolution):
        warnings.warn(
            f"draws were made at resolution {draws.settings['resolution']}, evaluating at "
            f"{resolution}: same examples, different pixels",
            stacklevel=3,
        )
    where = draws.path or "draws"
    tasks = {
        (t.dataset, t.name): t for s in sources if s.dataset in draws.datasets for t in s.tasks()
    }
    for i, d in enumerate(draws.draws):
        task = tasks.get((d.dataset, d.task))
        if task is None:
            raise ProtocolError(
                f"{where}: draws[{i}]: task {d.task!r} is not in the source {d.dataset!r}"
            )
        try:
            check_draw(d, task)
        except ProtocolError as e:
            raise ProtocolError(f"{where}: draws[{i}]: {e}") from e
        pool = task.candidates
        if d.support_size != min(d.N, pool):
            raise ProtocolError(
                f"{where}: draws[{i}] {d.dataset}/{d.task}: support sets of {d.support_size} "
                f"examples, but N={d.N} on a pool of {pool} candidates gives {min(d.N, pool)}"
            )


def _comparable(desc: dict) -> dict:
    # The corpus folder may have moved; its checksum identifies it.
    return {k: v for k, v in desc.items() if k != "root"}


# ------------------------------------------------------------------------------ scoring


def dice(probs: Tensor, truth: Tensor) -> Tensor:
    """Dice of ``probs > 0.5`` against boolean ``truth``, both ``(B, 1, H, W)`` -> ``(B,)``
    float64 (:func:`megaseg.metrics.batch_dice`; truth is never empty here: empty queries are
    excluded, so its empty-mask rule never applies)."""
    return batch_dice(probs > 0.5, truth).double()


def ensemble_predict(
    method, queries: Tensor, images: Tensor, labels: Tensor, draw: Draw, index: dict[str, int]
) -> Tensor:
    """Average ``method``'s probabilities over the draw's K support sets -> ``(B, 1, R, R)``."""
    total = None
    for k, support in enumerate(draw.support):
        rows = torch.tensor([index[i] for i in support])
        probs = method.predict(queries, images[rows], labels[rows], seed=draw.seed + k)
        total = probs.float() if total is None else total + probs.float()
    return total / draw.ensemble


__all__ = [
    "DEFAULT_DRAWS_PER_N",
    "DEFAULT_SUPPORT_SIZES",
    "Draw",
    "DrawSet",
    "ProtocolError",
    "binarize",
    "check_draw",
    "dice",
    "draw_seed",
    "ensemble_predict",
    "make_draws",
    "replay_check",
]
