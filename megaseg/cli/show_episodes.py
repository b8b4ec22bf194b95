"""``megaseg show-episodes``: a PNG of a few training episodes, augmented as in training.

One row per episode: the query image, the query with its label overlaid, then support examples
with their labels; above each row, the task-level augmentations that were drawn for it. Episodes
come from synthetic tasks (default) or from a corpus built by ``megaseg prep build``. The PNG
goes to ``--out`` (default ``megaseg_work/episodes.png``, see :func:`megaseg.paths.work_dir`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megaseg.overlay import overlay_rgb
from megaseg.paths import work_dir

if TYPE_CHECKING:  # torch is imported where it is used: `--help` does without it
    import torch
    from torch import Tensor

    from megaseg.data.augment import EpisodeParams

_OVERLAY_RGB = (1.0, 0.15, 0.1)  # label colour
_OVERLAY_ALPHA = 0.5


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaseg show-episodes", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help=f"PNG to write (default {work_dir('episodes.png')};"
                   " $MEGASEG_WORK moves megaseg_work)")  # fmt: skip
    p.add_argument("--episodes", type=int, default=4, help="rows")
    p.add_argument("--support", type=int, default=6, help="support examples per episode")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes and augmentations")
    p.add_argument("--no-augment", action="store_true", help="show the episodes as sampled")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--corpus", type=Path, help="a corpus root instead of synthetic tasks")
    p.add_argument(
        "--split", default="train", choices=("train", "val", "test"), help="corpus split"
    )
    return p


def synthetic_episodes(
    num_episodes: int, num_examples: int, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, list[str]]:
    """Episodes of random synthetic tasks: ``images, labels (B, N, 1, H, W)`` and row names."""
    import torch

    from megaseg.data.synthetic import SyntheticConfig, SyntheticTasks

    tasks = SyntheticTasks(num_tasks=1000, config=SyntheticConfig(size=size))
    if num_examples > tasks.config.num_subjects:
        raise ValueError(
            f"--support {num_examples - 1}: a synthetic task has {tasks.config.num_subjects} "
            f"subjects, so at most {tasks.config.num_subjects - 1} support examples"
        )
    images, labels, names = [], [], []
    for _ in range(num_episodes):
        task = int(torch.randint(len(tasks), (), generator=generator))
        label = int(torch.randint(tasks.num_labels(task), (), generator=generator))
        indices = torch.randperm(tasks.config.num_subjects, generator=generator)[:num_examples]
        x, y = tasks.batch(task, label, indices.tolist())
        images.append(x)
        labels.append(y)
        names.append(f"synthetic task {task}, label {label}")
    return torch.stack(images), torch.stack(labels), names


def corpus_episodes(
    root: Path,
    split: str,
    num_episodes: int,
    num_examples: int,
    size: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, list[str]]:
    """Episodes of random corpus tasks with at least ``num_examples`` examples in ``split``."""
    import torch

    from megaseg.data.store import Corpus

    corpus = Corpus(root)
    sizes = {k: corpus.num_examples(k, split) for k in corpus.tasks(split)}
    keys = [k for k, n in sizes.items() if n >= num_examples]
    if not keys:
        largest = max(sizes.values(), default=0)
        hint = (
            f"the largest has {largest}: pass --support {largest - 1} or less"
            if largest >= 2
            else "none has 2 (a query and one support example)"
        )
        raise ValueError(
            f"{root}: no task has {num_examples} examples in split {split!r} (a query and "
            f"--support {num_examples - 1}); {hint}"
        )
    images, labels, names = [], [], []
    for _ in range(num_episodes):
        key = keys[int(torch.randint(len(keys), (), generator=generator))]
        order = torch.randperm(corpus.num_examples(key, split), generator=generator)
        x, y = corpus.load_many(key, order[:num_examples].numpy(), size, split)
        images.append(torch.from_numpy(x))
        labels.append(torch.from_numpy(y))
        names.append(f"{key.dataset} {key.modality} {key.axis} {key.label}")
    return torch.stack(images), torch.stack(labels), names


def overlay(image: Tensor, label: Tensor) -> np.ndarray:
    """Grey ``image (H, W)`` with a soft ``label (H, W)`` tinted on top: ``(H, W, 3)``."""
    return overlay_rgb(image.numpy(), [(label.numpy(), _OVERLAY_RGB)], _OVERLAY_ALPHA)


def render(
    path: Path, images: Tensor, labels: Tensor, names: list[str], params: EpisodeParams | None
) -> Path:
    """Write the grid for ``images, labels (B, N, 1, H, W)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_episodes, num_examples = images.shape[:2]
    cols = num_examples + 1
    fig = Figure(figsize=(1.5 * cols, 1.75 * num_episodes), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        num_episodes, cols, squeeze=False, gridspec_kw={"hspace": 0.3, "wspace": 0.04}
    )
    fig.subplots_adjust(left=0.03, right=0.995, bottom=0.01, top=1 - 0.4 / num_episodes)
    for b in range(num_episodes):
        axes[b, 0].imshow(images[b, 0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        for i in range(num_examples):
            axes[b, i + 1].imshow(overlay(images[b, i, 0], labels[b, i, 0]))
        drawn = ", ".join(params.applied(b)) if params is not None else "not augmented"
        text = f"episode {b}: {names[b]} | task-level: {drawn or 'none'}"
        axes[b, 0].text(0, 1.04, text, fontsize=7, transform=axes[b, 0].transAxes, va="bottom")
    fig.suptitle("columns: query | query + label | support examples + labels", fontsize=8, y=0.998)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.episodes < 1 or args.support < 1:
        raise SystemExit("megaseg show-episodes: --episodes and --support must be >= 1")
    import torch

    from megaseg.data.augment import EpisodeAugment
    from megaseg.data.store import CorpusError

    generator = torch.Generator().manual_seed(args.seed)
    num_examples = 1 + args.support
    try:
        if args.corpus is not None:
            images, labels, names = corpus_episodes(
                args.corpus, args.split, args.episodes, num_examples, args.size, generator
            )
        else:
            images, labels, names = synthetic_episodes(
                args.episodes, num_examples, args.size, generator
            )
    except (ValueError, CorpusError, FileNotFoundError) as e:
        print(f"megaseg show-episodes: {e}", file=sys.stderr)
        return 2
    params = None
    if not args.no_augment:
        augment = EpisodeAugment()
        params = augment.sample(args.episodes, num_examples, generator)
        images, labels = augment.apply(images, labels, params)
    path = render(args.out or work_dir("episodes.png"), images, labels, names, params)
    print(f"megaseg show-episodes wrote: {Path(path).resolve()}")
    return 0
