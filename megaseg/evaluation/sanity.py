"""Sanity suite: simple in-context tasks any useful checkpoint must solve (issue #13).

A fixed, seeded set of easy 2D tasks on noisy, smoothly textured backgrounds: bright and dark
discs, blobs among distractors, a ring, a thin line, two objects of one label, and a disc that
moves and changes size between examples. Each task has ``POOL`` labelled support examples and
``QUERIES`` queries at 128 px (the :class:`~megaseg.inference.Segmenter` resizes to its network).

:func:`run_sanity` scores a checkpoint through ``Segmenter`` at support sizes N (the first N
pool examples), and with K-member ensembles (K random N-subsets of the pool), and checks that an
ensemble never turns a confident prediction empty: when every one of the K members alone
predicts at least ``CONFIDENT_PIXELS`` pixels at probability >= 0.9, the ensemble's mask must
not be empty. Scores are Dice of ``probs > 0.5`` at 128 px, per query, averaged per task.
With ``flips=True`` every prediction (plain, ensemble and member) uses flip test-time
augmentation (:meth:`~megaseg.inference.Segmenter.predict`), at 4x the forward passes.

    from megaseg.evaluation.sanity import run_sanity
    result = run_sanity("checkpoints/megaseg_small_synth64.safetensors")
    print(result.markdown())
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from megaseg.data.synthetic.base import hash_seed, smooth_field
from megaseg.metrics import mask_dice

SIZE = 128
POOL = 32  # support examples per task (N and ensemble subsets are drawn from them)
QUERIES = 8
CONFIDENT_PIXELS = 10  # a member "confidently" predicts foreground: >= this many px at p >= 0.9
CONFIDENT_PROB = 0.9

# name -> one-line description (the order is the table's)
TASKS: dict[str, str] = {
    "bright_disc": "bright disc on a noisy background",
    "dark_disc": "dark disc on a noisy background",
    "bright_blob_distractors": "bright blob among 3 smaller bright discs (unlabelled)",
    "dark_blob_distractors": "dark blob among 3 bright discs (unlabelled)",
    "ring": "bright ring (the ring only, not its inside)",
    "thin_line": "thin bright line (~3 px wide), random orientation",
    "two_discs": "two bright discs, one label",
    "moving_disc": "bright disc anywhere, radius x3 between examples",
}


@dataclass(frozen=True)
class SanityTask:
    """One task: ``images (POOL + QUERIES, H, W)`` float32 in [0, 1], ``labels`` bool, same
    shape; the first ``POOL`` are the support pool, the rest the queries."""

    name: str
    images: Tensor
    labels: Tensor

    @property
    def support(self) -> tuple[Tensor, Tensor]:
        return self.images[:POOL], self.labels[:POOL]

    @property
    def queries(self) -> tuple[Tensor, Tensor]:
        return self.images[POOL:], self.labels[POOL:]


def _coords(size: int) -> tuple[Tensor, Tensor]:
    c = (2 * torch.arange(size) + 1) / size - 1
    return c[None, :].expand(size, -1), c[:, None].expand(-1, size)


def _disc(x: Tensor, y: Tensor, cx: float, cy: float, r: float, wobble=None) -> Tensor:
    dx, dy = x - cx, y - cy
    rho = torch.sqrt(dx * dx + dy * dy) / r
    edge = torch.ones_like(rho)
    if wobble is not None:
        phi = torch.atan2(dy, dx)
        for k, (amp, phase) in enumerate(wobble):
            edge = edge + amp * torch.cos((k + 2) * phi + phase)
    return rho < edge


def _example(name: str, index: int, size: int) -> tuple[Tensor, Tensor]:
    """Image ``(size, size)`` and label ``(size, size)`` bool of example ``index``."""
    gen = torch.Generator().manual_seed(hash_seed("sanity", name, index))
    u = torch.rand(32, generator=gen)  # fixed order of draws, whatever the task uses
    texture = torch.randn(1, 8, 8, generator=gen)
    noise = torch.randn(size, size, generator=gen)
    x, y = _coords(size)
    image = 0.35 + 0.08 * smooth_field(texture, size)[0]
    bright, dark = 0.85, 0.05
    if name in ("bright_disc", "dark_disc"):
        label = _disc(x, y, 0.3 * (2 * u[0] - 1), 0.3 * (2 * u[1] - 1), 0.25 + 0.1 * u[2])
        if name == "dark_disc":
            image += 0.3  # a background well above the dark disc
        image[label] = bright if name == "bright_disc" else dark
    elif name in ("bright_blob_distractors", "dark_blob_distractors"):
        wobble = [(0.15 * u[3 + k].item(), 6.3 * u[7 + k].item()) for k in range(3)]
        label = _disc(x, y, 0.25 * (2 * u[0] - 1), 0.25 * (2 * u[1] - 1), 0.3, wobble)
        distract = torch.zeros_like(label)
        for k in range(3):  # small discs in the corners' band, away from the blob
            angle = 2 * math.pi * (k / 3 + 0.3 * u[12 + k].item())
            cx, cy = 0.72 * math.cos(angle), 0.72 * math.sin(angle)
            distract |= _disc(x, y, cx, cy, 0.12 + 0.06 * u[16 + k].item())
        distract &= ~label
        if name == "bright_blob_distractors":
            image[label | distract] = bright
        else:
            image += 0.25
            image[label] = dark
            image[distract] = bright
    elif name == "ring":
        cx, cy, r = 0.2 * (2 * u[0] - 1), 0.2 * (2 * u[1] - 1), 0.45 + 0.1 * u[2]
        label = _disc(x, y, cx, cy, r) & ~_disc(x, y, cx, cy, r - 0.12)
        image[label] = bright
    elif name == "thin_line":
        angle = math.pi * u[0].item()
        off = 0.3 * (2 * u[1].item() - 1)
        dist = (-math.sin(angle) * x + math.cos(angle) * y - off).abs()
        label = (dist < 0.025) & (x.abs() < 0.85) & (y.abs() < 0.85)
        image[label] = bright
    elif name == "two_discs":
        a = _disc(x, y, -0.45 + 0.1 * u[0], 0.3 * (2 * u[1] - 1), 0.18 + 0.06 * u[2])
        b = _disc(x, y, 0.45 + 0.1 * u[3], 0.3 * (2 * u[4] - 1), 0.18 + 0.06 * u[5])
        label = a | b
        image[label] = bright
    elif name == "moving_disc":
        r = 0.12 * 3 ** u[2].item()  # 0.12 - 0.36
        lim = 0.85 - r
        label = _disc(x, y, lim * (2 * u[0] - 1), lim * (2 * u[1] - 1), r)
        image[label] = bright
    else:
        raise ValueError(f"unknown sanity task {name!r}; known: {', '.join(TASKS)}")
    image = image + 0.08 * noise
    return image.clamp(0, 1), label


def sanity_tasks(size: int = SIZE) -> list[SanityTask]:
    """The fixed suite: one :class:`SanityTask` per entry of :data:`TASKS`, in order."""
    out = []
    for name in TASKS:
        pairs = [_example(name, i, size) for i in range(POOL + QUERIES)]
        out.append(
            SanityTask(name, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        )
    return out


@dataclass
class SanityResult:
    """``dice[(task, N, K)]``: mean Dice over the queries (K = 1: the first N pool examples;
    K > 1: the mean of K random N-subsets' probabilities); ``violations[(task, N, K)]``: queries
    whose K members were each confident but whose ensemble mask is empty;
    ``confident[(task, N, K)]``: queries whose K members were each confident. ``flips``:
    whether every prediction used flip test-time augmentation."""

    ns: tuple[int, ...]
    ensembles: tuple[int, ...]
    flips: bool = False
    dice: dict[tuple[str, int, int], float] = field(default_factory=dict)
    violations: dict[tuple[str, int, int], int] = field(default_factory=dict)
    confident: dict[tuple[str, int, int], int] = field(default_factory=dict)
    predictions: dict[tuple[str, int, int], np.ndarray] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(t for t, _, _ in self.dice))

    def mean(self, n: int, k: int = 1) -> float:
        return float(np.mean([self.dice[(t, n, k)] for t in self.tasks]))

    def ensemble_ok(self) -> bool:
        """True when no ensemble turned a confident prediction empty."""
        return not any(self.violations.values())

    def markdown(self) -> str:
        cols = [
            (n, k) for k in self.ensembles for n in self.ns if (self.tasks[0], n, k) in self.dice
        ]
        head = " | ".join(f"N={n}" + ("" if k == 1 else f" K={k}") for n, k in cols)
        lines = [f"| task | {head} |", "|---" * (len(cols) + 1) + "|"]
        for t in self.tasks:
            row = " | ".join(f"{self.dice[(t, n, k)]:.2f}" for n, k in cols)
            lines.append(f"| {t} | {row} |")
        lines.append(
            "| **mean** | " + " | ".join(f"**{self.mean(n, k):.2f}**" for n, k in cols) + " |"
        )
        checked = [key for key in self.violations if key[2] > 1]
        lines.append("")
        if self.flips:
            lines.append(
                "Flip TTA: every prediction averaged over the identity, horizontal, vertical "
                "and both flips of the task (query and support flipped together)."
            )
        if not checked:
            lines.append("Ensemble check: not run (no ensembles).")
            return "\n".join(lines)
        lines.append(
            f"Ensemble check: {sum(self.violations[c] for c in checked)} of "
            f"{sum(self.confident[c] for c in checked)} queries whose K members were all confident "
            f"(>= {CONFIDENT_PIXELS} px at p >= {CONFIDENT_PROB}) got an empty ensemble mask "
            f"({'PASS' if self.ensemble_ok() else 'FAIL'})."
        )
        return "\n".join(lines)


def _segmenter(segmenter_or_checkpoint, device):
    from megaseg.inference import Segmenter

    if isinstance(segmenter_or_checkpoint, Segmenter):
        return segmenter_or_checkpoint
    return Segmenter.from_checkpoint(segmenter_or_checkpoint, device=device)


def run_sanity(
    segmenter_or_checkpoint,
    ns: Sequence[int] = (1, 4, 16),
    ensembles: Sequence[int] = (4,),
    tasks: Sequence[SanityTask] | None = None,
    seed: int = 0,
    device=None,
    flips: bool = False,
) -> SanityResult:
    """Score a :class:`~megaseg.inference.Segmenter` (or a checkpoint path / model name) on the
    suite. ``ns``: support sizes (each <= :data:`POOL`); ``ensembles``: K values > 1 to also
    run as K-member ensembles of N-subsets (plus the ensemble-never-empties check).
    ``flips``: flip test-time augmentation on every prediction (4x the forward passes).

    Returns a :class:`SanityResult` (``.markdown()`` for the table). Predictions of the plain
    runs are kept in ``result.predictions[(task, N, 1)]`` as ``(QUERIES, H, W)`` bool.
    """
    ns, ensembles = tuple(int(n) for n in ns), tuple(int(k) for k in ensembles if int(k) > 1)
    if not ns or any(not 1 <= n <= POOL for n in ns):
        raise ValueError(f"ns: every support size must be in [1, {POOL}], got {ns}")
    seg = _segmenter(segmenter_or_checkpoint, device)
    tasks = sanity_tasks() if tasks is None else tasks
    result = SanityResult(ns, (1, *ensembles), flips=bool(flips))
    for task in tasks:
        sup_x, sup_y = task.support
        qx, qy = task.queries
        queries = [q.numpy() for q in qx]
        truth = qy.numpy()
        for n in ns:
            seg.set_support(list(sup_x[:n].numpy()), list(sup_y[:n].numpy().astype(np.uint8)))
            preds = seg.predict(queries, flips=flips)
            masks = np.stack([p.mask for p in preds])
            result.predictions[(task.name, n, 1)] = masks
            result.dice[(task.name, n, 1)] = float(
                np.mean([mask_dice(m, t) for m, t in zip(masks, truth, strict=True)])
            )
            for k in ensembles:
                if math.comb(POOL, n) < k:
                    continue
                _ensemble(seg, task, n, k, seed, queries, truth, result, flips)
    return result


def _ensemble(
    seg, task: SanityTask, n: int, k: int, seed: int, queries, truth, result, flips: bool
) -> None:
    """K-member ensemble of N-subsets of the pool, and each member alone (same subsets)."""
    sup_x, sup_y = task.support
    pool_x, pool_y = list(sup_x.numpy()), list(sup_y.numpy().astype(np.uint8))
    seg.set_support(pool_x, pool_y)
    ens = seg.predict(queries, ensemble=k, support_size=n, seed=seed, flips=flips)
    subsets = seg._draw_subsets(k, n, seed)  # the same K subsets the ensemble averaged
    confident = np.ones(len(queries), bool)
    for idx in subsets:
        idx = idx.cpu().tolist()
        seg.set_support([pool_x[i] for i in idx], [pool_y[i] for i in idx])
        member = seg.predict(queries, flips=flips)
        confident &= np.array(
            [(p.probs >= CONFIDENT_PROB).sum() >= CONFIDENT_PIXELS for p in member]
        )
    empty = np.array([not p.mask.any() for p in ens])
    key = (task.name, n, k)
    result.dice[key] = float(
        np.mean([mask_dice(p.mask, t) for p, t in zip(ens, truth, strict=True)])
    )
    result.confident[key] = int(confident.sum())
    result.violations[key] = int((confident & empty).sum())


def sanity_png(
    path, result: SanityResult, tasks: Sequence[SanityTask] | None = None, n: int | None = None
):
    """A grid, one row per task: 3 support examples, then each query with its truth (green)
    and the prediction at support size ``n`` (red; default the largest). Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from megaseg.paths import atomic_write

    tasks = sanity_tasks() if tasks is None else tasks
    n = max(result.ns) if n is None else n
    shown = 4
    fig = Figure(figsize=((3 + shown) * 1.2, len(tasks) * 1.25), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tasks), 3 + shown, squeeze=False)
    for r, task in enumerate(tasks):
        for c in range(3):
            axes[r, c].imshow(task.images[c].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].contour(task.labels[c].numpy(), levels=[0.5], colors="g", linewidths=0.6)
        pred = result.predictions.get((task.name, n, 1))
        for q in range(shown):
            ax = axes[r, 3 + q]
            ax.imshow(task.images[POOL + q].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.contour(task.labels[POOL + q].numpy(), levels=[0.5], colors="g", linewidths=0.6)
            if pred is not None and pred[q].any():
                ax.contour(pred[q], levels=[0.5], colors="r", linewidths=0.6)
        axes[r, 0].set_ylabel(
            f"{task.name}\nDice {result.dice.get((task.name, n, 1), float('nan')):.2f}", fontsize=6
        )
    axes[0, 0].set_title("support", fontsize=7)
    axes[0, 3].set_title(f"queries: truth green, N={n} red", fontsize=7, loc="left")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    atomic_write(path, fig.savefig, suffix=".png")
    return path
