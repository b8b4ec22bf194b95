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
  column and the used size as ``support_size``), with one warning listing the tasks.

A draw's randomness is a pure function of ``(seed, dataset, task, N, r)`` (plus the query for
within-subject draws), so adding a dataset or an N leaves every other draw unchanged. All draws
are written to ``draws.json`` (:meth:`DrawSet.save`); evaluating with ``draws=`` replays
exactly those draws, so two checkpoints or methods are compared on the same support sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megaseg.evaluation.sources import EvalTask, Source

DRAWS_FORMAT = "megaseg-draws"
DRAWS_VERSION = 1
DEFAULT_SUPPORT_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_DRAWS_PER_N = 5
TRUTH_THRESHOLD = 0.5


class ProtocolError(AssertionError):
    """A draw breaks the protocol (support and query share a subject, a query in its own
    support, an id that is not in the task's pools)."""


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
        return cls(
            dataset=str(d["dataset"]),
            task=str(d["task"]),
            N=int(d["N"]),
            r=int(d["r"]),
            seed=int(d["seed"]),
            queries=tuple(str(q) for q in d["queries"]),
            support=tuple(tuple(str(i) for i in s) for s in d["support"]),
            within_subject=bool(d.get("within_subject", False)),
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

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": DRAWS_FORMAT,
            "version": DRAWS_VERSION,
            "settings": self.settings,
            "sources": self.sources,
            "tasks": self.tasks,
            "skipped": self.skipped,
            "draws": [d.to_json() for d in self.draws],
        }
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DrawSet:
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
        return cls(
            settings=data["settings"],
            sources=data["sources"],
            draws=[Draw.from_json(d) for d in data["draws"]],
            tasks=data.get("tasks", {}),
            skipped=data.get("skipped", []),
        )

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d.dataset for d in self.draws))


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
    capped: list[str] = []
    for source in sources:
        for task in source.tasks():
            key = f"{task.dataset}/{task.name}"
            queries, excluded, reason = _usable_queries(source, task, resolution)
            pool = len(task.support_pool) - (1 if task.within_subject else 0)
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
                capped.append(f"{key} (pool {pool}: N={task_capped})")
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
    if capped:
        warnings.warn(
            f"{len(capped)} task(s) have fewer support candidates than the requested N; N is "
            f"capped to what the task has: {'; '.join(capped)}",
            stacklevel=2,
        )
    if out.skipped:
        warnings.warn(
            f"{len(out.skipped)} task(s) skipped: "
            + "; ".join(f"{s['dataset']}/{s['task']}: {s['reason']}" for s in out.skipped),
            stacklevel=2,
        )
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
    """Raise ValueError unless ``sources`` are the data ``draws`` were made on.

    Each dataset of the draws needs a source whose :meth:`describe` equals the recorded one
    (same corpus index checksum, same synthetic generator and seeds, same arrays). A different
    resolution is allowed (the same examples, seen at another size) with a warning.
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


def _comparable(desc: dict) -> dict:
    # The corpus folder may have moved; its checksum identifies it.
    return {k: v for k, v in desc.items() if k != "root"}


# ------------------------------------------------------------------------------ scoring


def dice(probs: Tensor, truth: Tensor) -> Tensor:
    """Dice of ``probs > 0.5`` against boolean ``truth``, both ``(B, 1, H, W)`` -> ``(B,)``.

    MONAI's ``compute_dice`` on one foreground channel; truth is never empty here (empty
    queries are excluded), so the score is always defined.
    """
    from monai.metrics import compute_dice

    pred = (probs > 0.5).float()
    return compute_dice(pred, truth.float(), include_background=True)[:, 0].double()


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
