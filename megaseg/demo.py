"""What ``megaseg demo`` (megaseg/cli/demo.py) and the notebooks run: its data, model, scores
and figure. Segments a real brain MRI offline, with no download.

Data: the MNI152 T1 template with its grey / white matter maps (inside the nilearn wheel, see
:mod:`megaseg.examples`). It is one subject, so the demo is *within-subject*: the support set is
``--support-size`` labelled slices of the volume, the queries are other slices of the same
volume, each between two support slices. Tasks: grey matter and white matter, both from one
support set (integer labels give one binary task per value, see :mod:`megaseg.inference`).

Model: ``--checkpoint``, else the weights megaseg ships (found through the model registry, as
``create_model(name, pretrained=True)`` finds them), else, clearly labelled as such, a small network trained here on synthetic
tasks for ``--train-seconds`` with the training code
(:func:`megaseg.training.fallback.train_synthetic_model`); its Dice is
expected to be low. Output: Dice per task (and of the trivial "mean support label" baseline, to
read it against), and an overlay PNG of query, truth and prediction.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megaseg.deprecation import moved
from megaseg.metrics import mask_dice as dice

if TYPE_CHECKING:  # torch is imported where it is used: `megaseg demo --help` does without
    import torch

DEFAULT_SUPPORT_SIZE = 8
DEFAULT_TRAIN_SECONDS = 45.0
DEFAULT_QUERIES = 3
TASKS = {"grey matter": 1, "white matter": 2}  # the label values of megaseg.examples
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
COLORS = {1: (1.0, 0.55, 0.0), 2: (0.15, 0.6, 1.0)}  # overlay colours of the two tissues

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
    from megaseg.training.fallback import (
        FALLBACK_KWARGS,
        FALLBACK_MODEL,
        FALLBACK_RESOLUTION,
        train_synthetic_model,
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
    from megaseg.overlay import overlay_rgb

    turn = np.rot90 if upright else np.asarray
    lo, hi = np.percentile(image, (0.5, 99.5))
    tissues = [] if label_map is None else [(label_map == v, c) for v, c in COLORS.items()]
    rgb = overlay_rgb(image, tissues, alpha=0.5, window=(lo, max(hi, lo + 1e-6)))
    ax.imshow(turn(rgb), interpolation="nearest")
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


__all__ = [
    "DemoModel",
    "load_demo_model",
    "pick_slices",
    "plot_demo",
    "score",
    "shipped_checkpoint",
]

# moved by issue #25: the command to megaseg/cli/demo.py, the fallback trainer to training/
__getattr__ = moved(
    __name__,
    {
        "main": "megaseg.cli.demo:main",
        "train_synthetic_model": "megaseg.training.fallback:train_synthetic_model",
    },
)
