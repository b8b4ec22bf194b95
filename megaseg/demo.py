"""``megaseg demo``: segment a real brain MRI offline, with no argument and no download.

    megaseg demo                                  # shipped weights, else a 45 s synthetic model
    megaseg demo --checkpoint run/export/final.safetensors --support-size 16 --out demo/

Writes to ``--out`` (default ``megaseg_work/demo``, see :func:`megaseg.paths.work_dir`) and
ends by naming what it wrote.

Data: the MNI152 T1 template with its grey / white matter maps (inside the nilearn wheel, see
:mod:`megaseg.examples`). It is one subject, so the demo is *within-subject*: the support set is
``--support-size`` labelled slices of the volume, the queries are other slices of the same
volume, each between two support slices. Tasks: grey matter and white matter, both from one
support set (integer labels give one binary task per value, see :mod:`megaseg.inference`).

Model: ``--checkpoint``, else the weights megaseg ships (found through the model registry, as
``create_model(name, pretrained=True)`` finds them), else, clearly labelled as such, a small network trained here on synthetic
tasks for ``--train-seconds`` with the training code (:func:`train_synthetic_model`); its Dice is
expected to be low. Output: Dice per task (and of the trivial "mean support label" baseline, to
read it against), and an overlay PNG of query, truth and prediction.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megaseg.metrics import mask_dice as dice
from megaseg.paths import work_dir

if TYPE_CHECKING:  # torch is imported where it is used: `megaseg demo --help` does without
    import torch

DEFAULT_SUPPORT_SIZE = 8
DEFAULT_TRAIN_SECONDS = 45.0
DEFAULT_QUERIES = 3
TASKS = {"grey matter": 1, "white matter": 2}  # the label values of megaseg.examples
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
COLORS = {1: (1.0, 0.55, 0.0), 2: (0.15, 0.6, 1.0)}  # overlay colours of the two tissues

# The fallback network: UniverSeg v1's layout at a quarter of its width, at 64 px, so that a
# 2-core CPU makes 100-300 steps in 45 s (fewer when other jobs share it). Small enough to say what it is: a
# demonstration that the pipeline runs, not a model to judge in-context segmentation by.
FALLBACK_MODEL = "universeg_v1"
FALLBACK_KWARGS = {"encoder_widths": [16, 16, 16, 16]}
FALLBACK_RESOLUTION = 64
FALLBACK_SUPPORT = (2, 4)  # support sizes drawn per batch
FALLBACK_BATCH = 4
FALLBACK_TASKS = 50  # few tasks (5-20 labels each): their label maps are built once, then cached
FALLBACK_LR = 2e-3
FALLBACK_NAME = "synthetic_fallback.safetensors"


@dataclass
class DemoModel:
    """The network the demo runs and how to describe it.

    segmenter: wraps the network at its resolution. description: one line for the output;
    title: a shorter one for the figure. path: its weights on disk (None when only in memory).
    trained_seconds / steps: set for the fallback trained here.
    """

    segmenter: object  # megaseg.inference.Segmenter
    description: str
    title: str
    path: Path | None = None
    trained_seconds: float | None = None
    steps: int | None = None

    @property
    def is_fallback(self) -> bool:
        return self.trained_seconds is not None


# ---------------------------------------------------------------------- models


def shipped_checkpoint() -> tuple[str, Path] | None:
    """``(name, weights path)`` of the weights megaseg ships, None when there are none; the
    name is the weights' own (``"megaseg_generalist"``, their file's stem), which
    ``Segmenter.from_checkpoint`` takes.

    Looked up through the registry (``pretrained_path``), ``universeg_v1`` first, then every
    other registered model; an entry whose file is missing (e.g. an unfetched Git LFS file) is
    skipped with a warning.
    """
    from megaseg.models import list_models
    from megaseg.models.registry import pretrained_path

    names = sorted(list_models(), key=lambda n: n != "universeg_v1")
    for name in names:
        try:
            path = pretrained_path(name)
        except ValueError:  # nothing shipped for this model
            continue
        if path.is_file():
            return path.stem, path
        warnings.warn(
            f"{name}: shipped weights listed at {path}, but the file is missing", stacklevel=2
        )
    return None


def train_synthetic_model(
    seconds: float = DEFAULT_TRAIN_SECONDS,
    out_path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    max_steps: int = -1,
    batch_size: int = FALLBACK_BATCH,
    support_size: tuple[int, int] = FALLBACK_SUPPORT,
    lr: float = FALLBACK_LR,
    loss: torch.nn.Module | None = None,
    log: Callable[[str], None] | None = print,
):
    """Train the small fallback network on synthetic tasks for ``seconds`` of wall time.

    Uses the training code as ``megaseg fit`` does (:class:`~megaseg.training.InContextSegModule`,
    :class:`~megaseg.training.EpisodeDataModule`, a Lightning ``Trainer`` with ``max_time``),
    with :data:`FALLBACK_KWARGS` at :data:`FALLBACK_RESOLUTION` px, Adam with warm-up and
    gradient clipping. ``out_path``: also export the weights there (``.safetensors`` and its JSON
    card, loadable by ``Segmenter.from_checkpoint``). ``log``: progress lines (None: silent).

    Returns:
        ``(network, card, steps, elapsed_seconds)``; the network is in eval mode on the CPU.
    """
    import pytorch_lightning as pl
    import torch

    from megaseg.checkpoint import save_checkpoint
    from megaseg.training import EpisodeDataModule, InContextSegModule, WarmupCosine, build_card

    say = log or (lambda _: None)
    data = EpisodeDataModule(
        resolution=FALLBACK_RESOLUTION,
        support_size=tuple(support_size),
        batch_size=batch_size,
        synthetic_tasks=FALLBACK_TASKS,
        seed=seed,  # the episodes come from the data module's own seeded streams
    )
    progress = _progress_callback(say, every_seconds=10.0)
    # fork_rng: the network is initialized under ``seed``, the caller's random state is kept.
    with (
        torch.random.fork_rng(devices=[]),
        tempfile.TemporaryDirectory(prefix="megaseg_demo_") as root,
        _quiet_lightning(),
    ):
        torch.manual_seed(seed)
        module = InContextSegModule(
            FALLBACK_MODEL,
            dict(FALLBACK_KWARGS),
            optimizer=partial(torch.optim.Adam, lr=lr),
            lr_scheduler=partial(WarmupCosine, warmup_steps=20, total_steps=None),
            loss=loss,
            resolution=FALLBACK_RESOLUTION,
            support_size=list(support_size),
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_time={"seconds": float(seconds)},
            max_steps=max_steps,
            gradient_clip_val=1.0,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[progress],
            default_root_dir=root,
        )
        start = time.perf_counter()
        with _cpu_threads():
            trainer.fit(module, datamodule=data)
        elapsed = time.perf_counter() - start
    steps = trainer.global_step
    card = build_card(module, trainer, weights="raw")
    card["description"] = (
        f"megaseg demo fallback: {FALLBACK_MODEL} {FALLBACK_KWARGS} trained on synthetic tasks "
        f"only, {steps} steps in {elapsed:.0f} s on a CPU; a demonstration, not a usable model"
    )
    if out_path is not None:
        save_checkpoint(out_path, module.net, card)
    say(f"  trained {steps} steps in {elapsed:.0f} s (final loss {progress.last_loss:.3f})")
    return module.net.eval(), card, steps, elapsed


def _progress_callback(log: Callable[[str], None], every_seconds: float):
    """A Lightning callback that reports the training loss every ``every_seconds``; its
    ``last_loss`` is the loss of the last step. (Built here: Lightning is imported lazily.)"""
    import pytorch_lightning as pl

    class Progress(pl.Callback):
        def __init__(self):
            self.last_loss = float("nan")
            self._start = self._next = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if self._start is None:
                self._start, self._next = now, now + every_seconds
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.last_loss = float(loss)
            if now >= self._next:
                self._next = now + every_seconds
                log(
                    f"  {now - self._start:4.0f} s  step {trainer.global_step:4d}  "
                    f"soft Dice loss {self.last_loss:.3f}"
                )

    return Progress()


@contextmanager
def _quiet_lightning():
    """Silence Lightning's start-up banner and its advice on data loaders for the demo."""
    loggers = [
        logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="pytorch_lightning")
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load_demo_model(
    checkpoint: str | os.PathLike | None = None,
    train_seconds: float = DEFAULT_TRAIN_SECONDS,
    out_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = print,
    device: str | torch.device | None = None,
) -> DemoModel:
    """The model the demo runs: ``checkpoint`` (a file, shipped weights' or a model's name), else the
    shipped weights, else the synthetic fallback (trained on the CPU for ``train_seconds`` and
    exported to ``out_dir/synthetic_fallback.safetensors`` when ``out_dir`` is given).
    ``device``: where the Segmenter runs (None: CUDA when available, else the CPU)."""
    from megaseg.inference import Segmenter

    say = log or (lambda _: None)
    if checkpoint is not None:
        seg = Segmenter.from_checkpoint(checkpoint, device)
        described = (seg.card or {}).get("description")
        text = f"checkpoint {checkpoint}" + (f" ({described})" if described else "")
        path = Path(checkpoint) if Path(checkpoint).is_file() else None
        return DemoModel(seg, text, f"checkpoint {Path(checkpoint).name}", path)
    shipped = shipped_checkpoint()
    if shipped is not None:
        name, path = shipped
        seg = Segmenter.from_checkpoint(name, device)
        return DemoModel(seg, f"shipped {name} ({path})", f"shipped {name} weights", path)
    if train_seconds <= 0:
        raise ValueError(
            "no shipped checkpoint and --train-seconds 0: give --checkpoint PATH, or a positive "
            "training budget for the synthetic fallback"
        )
    say(
        f"no shipped checkpoint: training a small model on synthetic tasks for {train_seconds:.0f} s "
        "(expect low Dice)"
    )
    out_path = None if out_dir is None else Path(out_dir) / FALLBACK_NAME
    net, card, steps, elapsed = train_synthetic_model(train_seconds, out_path, log=say)
    seg = Segmenter(net, FALLBACK_RESOLUTION, device, card=card)
    text = (
        f"no shipped checkpoint: trained a small model on synthetic tasks for {elapsed:.0f} s "
        f"({steps} steps, {FALLBACK_MODEL} widths {FALLBACK_KWARGS['encoder_widths']}, "
        f"{FALLBACK_RESOLUTION} px); expect low Dice"
    )
    title = f"small model trained {elapsed:.0f} s on synthetic tasks only (expect low Dice)"
    return DemoModel(seg, text, title, out_path, trained_seconds=elapsed, steps=steps)


# ---------------------------------------------------------------------- data


def pick_slices(
    labels: np.ndarray, axis: int, support_size: int, queries: int = DEFAULT_QUERIES
) -> tuple[list[int], list[int]]:
    """``(support, query)`` slice indices along ``axis``, within the brain.

    The support slices are evenly spaced (at ``(i + 0.5) / S`` of the brain's extent); each
    query lies halfway between two neighbouring support slices, as far from both as the
    spacing allows, near 30 %, 50 % and 70 % of the extent. Queries are never support slices.
    """
    from megaseg.examples import brain_extent

    if support_size < 1:
        raise ValueError(f"--support-size must be >= 1, got {support_size}")
    lo, hi = brain_extent(labels, axis)
    n = hi - lo
    if support_size + queries > n:
        raise ValueError(
            f"--support-size {support_size}: the brain spans {n} slices along this axis; at most "
            f"{n - queries} support slices leave room for {queries} queries"
        )
    support = [lo + int((i + 0.5) * n / support_size) for i in range(support_size)]
    between = [lo + int(i * n / support_size) for i in range(1, support_size)] or [lo + n // 2]
    targets = np.linspace(0.3, 0.7, queries) if queries > 1 else [0.5]
    query = []
    for t in targets:
        for c in sorted(between, key=lambda b, t=t: abs(b - (lo + t * n))):
            if c not in query and c not in support:
                query.append(c)
                break
    # With a dense support set, fill any remaining query from the free slices nearest the targets.
    free = [i for i in range(lo, hi) if i not in support and i not in query]
    for t in targets[len(query) :]:
        query.append(min(free, key=lambda i, t=t: abs(i - (lo + t * n))))
        free.remove(query[-1])
    return support, sorted(query)


# ---------------------------------------------------------------------- plotting


def overlay(
    image: np.ndarray, label_map: np.ndarray | None, ax, title: str = "", upright: bool = True
) -> None:
    """Draw ``image (H, W)`` in grey on matplotlib axes ``ax``, with ``label_map``'s tissues
    (1 GM orange, 2 WM blue) in colour. ``upright``: rotate by 90 degrees, so that a slice of an
    ``(X, Y, Z)`` RAS volume shows head (or nose) up."""
    turn = np.rot90 if upright else np.asarray
    lo, hi = np.percentile(image, (0.5, 99.5))
    ax.imshow(turn(image), cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
    if label_map is not None:
        rgba = np.zeros((*label_map.shape, 4))
        for value, color in COLORS.items():
            rgba[label_map == value] = (*color, 0.5)
        ax.imshow(turn(rgba), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def plot_demo(
    path: Path,
    queries: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    preds: Sequence[dict[int, np.ndarray]],
    row_labels: Sequence[str],
    row_dice: Sequence[dict[str, float]],
    title: str,
) -> Path:
    """One row per query: the image, the truth (GM orange, WM blue), then each task's
    predicted mask (``preds[r][value]``, boolean ``(H, W)``) with its Dice."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n, cols = len(queries), 2 + len(TASKS)
    fig = Figure(figsize=(2.6 * cols, 2.9 * n + 1.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, cols, squeeze=False)
    for r in range(n):
        overlay(queries[r], None, axes[r, 0], "query")
        overlay(queries[r], truths[r], axes[r, 1], "truth")
        for c, (name, value) in enumerate(TASKS.items(), start=2):
            mask = np.where(preds[r][value], value, 0)
            overlay(queries[r], mask, axes[r, c], f"predicted {name}\nDice {row_dice[r][name]:.2f}")
        axes[r, 0].set_ylabel(row_labels[r], fontsize=8)
    handles = [Patch(color=COLORS[v], label=k) for k, v in TASKS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=8.5)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------- command


@contextmanager
def _cpu_threads():
    """Use as many torch threads as there are idle cores (at least 1): on a shared, busy CPU,
    threads that wait for each other make small networks several times slower than one."""
    import torch

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    torch.set_num_threads(max(1, min(before, round((cores or 1) - load))))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _parser() -> argparse.ArgumentParser:
    from megaseg.helpformat import DefaultsHelpFormatter

    p = argparse.ArgumentParser(
        prog="megaseg demo",
        description="Segment grey and white matter in the MNI152 brain template (shipped inside "
        "nilearn; no download) from a few labelled slices of the same volume, print the Dice "
        "and write an overlay PNG.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", help="weights to run (.safetensors with its card, or a "
                   "registered model name); default: the shipped weights, else a small model "
                   "trained on synthetic tasks")  # fmt: skip
    p.add_argument("--support-size", type=int, default=DEFAULT_SUPPORT_SIZE,
                   help=f"labelled slices in the support set (default {DEFAULT_SUPPORT_SIZE})")  # fmt: skip
    p.add_argument("--out", help=f"output folder (default {work_dir('demo')}/; "
                   "$MEGASEG_WORK moves megaseg_work)")  # fmt: skip
    p.add_argument("--train-seconds", type=float, default=DEFAULT_TRAIN_SECONDS,
                   help="training budget of the synthetic fallback, when no checkpoint is "
                   f"given or shipped (default {DEFAULT_TRAIN_SECONDS:.0f})")  # fmt: skip
    p.add_argument("--axis", choices=list(AXES), default="axial",
                   help="slicing plane of the support and query slices (default axial)")  # fmt: skip
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="query slices (default 3)")
    return p


def score(preds, truths, support_labels) -> tuple[list[dict], list[dict], list[dict]]:
    """Per query: ``(masks, dice, baseline)``, each a list of one dict per query.

    ``masks[q][value]``: the task's own predicted mask ``label_probs[k] > 0.5`` (not the
    merged label map, where one tissue can hide the other); ``dice[q][name]``: its Dice against
    ``truth == value``; ``baseline[q][name]``: the Dice of the trivial "mean support label"
    prediction (the support slices are the same size as the queries: slices of one volume).
    """
    masks, scores, baseline = [], [], []
    for pred, truth in zip(preds, truths, strict=True):
        values = list(pred.labels)
        masks.append({v: pred.label_probs[values.index(v)] > 0.5 for v in TASKS.values()})
        scores.append({n: dice(masks[-1][v], truth == v) for n, v in TASKS.items()})
        trivial = {
            v: np.mean([s == v for s in support_labels], axis=0) > 0.5 for v in TASKS.values()
        }
        baseline.append({n: dice(trivial[v], truth == v) for n, v in TASKS.items()})
    return masks, scores, baseline


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.queries < 1:
        print("megaseg demo: --queries must be >= 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out, plane = Path(args.out or work_dir("demo")), args.axis
    try:
        from megaseg.examples import MNI152_REFERENCE, mni152_slices, mni152_volume

        t1, labels, _ = mni152_volume()
        support, query = pick_slices(labels, AXES[plane], args.support_size, args.queries)
    except FileNotFoundError as e:
        print(f"megaseg demo: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"megaseg demo: {e}", file=sys.stderr)
        return 2
    print(f"megaseg demo: {MNI152_REFERENCE}")
    print("  one subject, so this is WITHIN-SUBJECT segmentation: support and queries are "
          "different slices of the same volume (easier than a new subject)")  # fmt: skip
    print(f"  support: {len(support)} {plane} slices {support} (grey and white matter labelled)")
    print(f"  queries: {len(query)} other {plane} slices {query}")

    with _cpu_threads():
        try:
            model = load_demo_model(args.checkpoint, args.train_seconds, out)
        except (FileNotFoundError, ValueError) as e:
            print(f"megaseg demo: {e}", file=sys.stderr)
            return 1
        seg = model.segmenter
        sup_images, sup_labels = mni152_slices(t1, labels, AXES[plane], support)
        q_images, q_truth = mni152_slices(t1, labels, AXES[plane], query)
        seg.set_support(sup_images, sup_labels, modality="MR")
        t0 = time.perf_counter()
        preds = seg.predict(q_images)
        predict_seconds = time.perf_counter() - t0
    masks, scores, baseline = score(preds, q_truth, sup_labels)

    title = (
        f"megaseg demo, MNI152 T1 (one subject: within-subject), {plane} slices.\n"
        f"support: {len(support)} labelled slices {support}; model: {model.title}"
    )
    png = plot_demo(
        out / f"mni152_{plane}_overlay.png",
        q_images,
        q_truth,
        masks,
        [f"{plane} slice {i}" for i in query],
        scores,
        _wrap(title, 110),
    )

    print(f"  model: {model.description}")
    if model.path is not None:
        print(f"  weights: {model.path.resolve()}")
        if model.is_fallback:
            print(f"    (run again without training: megaseg demo --checkpoint {model.path})")
    print(f"  predicted in {predict_seconds:.1f} s at {seg.resolution} px")
    print("  Dice per task (mean over the query slices):")
    for name in TASKS:
        per = ", ".join(f"{row[name]:.3f}" for row in scores)
        trivial = np.mean([row[name] for row in baseline])
        print(
            f"    {name:<13} Dice {np.mean([row[name] for row in scores]):.3f}   (per slice: "
            f"{per}; mean-support-label baseline {trivial:.3f})"
        )
    if model.is_fallback:
        print("  (a minute of training on synthetic tasks only: expect low Dice; the baseline "
              "predicts the average of the support labels, with no learning at all)")  # fmt: skip
    print(f"  total {time.perf_counter() - start:.0f} s")
    print("megaseg demo wrote:")
    print(f"  overlay PNG: {png.resolve()}")
    if model.is_fallback and model.path is not None and model.path.is_file():
        print(f"  weights:     {model.path.resolve()} (+ .json card)")
    return 0


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(
        textwrap.fill(line, width, subsequent_indent="  ") for line in text.splitlines()
    )


__all__ = [
    "DemoModel",
    "load_demo_model",
    "main",
    "pick_slices",
    "score",
    "shipped_checkpoint",
    "train_synthetic_model",
]
