"""Per-dataset card (markdown) and preview (PNG grid of images with label overlays).

Both are written from a dataset's ``index.json`` and arrays while it is consolidated, and are
part of its checksummed files: they hold no timestamps and no absolute output paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megaseg.data.store import SPLITS
from megaseg.paths import atomic_write

PREVIEW_TASKS = 8  # rows of the preview grid
PREVIEW_EXAMPLES = 4  # columns


def write_card(path: Path, index: dict) -> None:
    """``card.md``: provenance, pipeline settings, counts, realized split fractions, skips."""
    info, spec = index["info"], index["info"]["spec"]
    lines = [f"# {index['dataset']}", ""]
    lines += ["## Provenance", "", "| | |", "|---|---|"]
    for key in ("source", "version", "licence", "citation"):
        lines.append(f"| {key} | {spec.get(key) or '(not given)'} |")
    lines += ["", "Check the licence before redistributing anything built from this dataset.", ""]
    lines += ["## Pipeline", "", "| | |", "|---|---|"]
    for key in ("reader", "modality", "planes", "window", "spacing_mm", "subject_regex", "group"):
        value = spec.get(key)
        if key == "modality" and value is None:  # e.g. an ad-hoc spec: the files name it
            value = f"{', '.join(info['modalities'])} (from the dataset's files)"
        lines.append(f"| {key} | {value} |")
    lines.append(f"| resolutions | {', '.join(map(str, index['resolutions']))} |")
    lines.append(f"| seed | {info['seed']} |")
    lines.append(
        f"| storage | images {index['image_dtype']}, labels {index['label_dtype']} (x255) |"
    )
    lines += ["", "## Counts", ""]
    c = info["cases"]
    lines.append(f"Cases found {c['found']}, written {c['written']}, skipped {c['skipped']}. "
                 f"{len(index['tasks'])} tasks, {info['num_images']} images, {info['num_labels']} label slices.")  # fmt: skip
    lines += ["", "| split | subjects | realized fraction | examples |", "|---|---|---|---|"]
    for s in SPLITS:
        lines.append(
            f"| {s} | {info['subjects'][s]} | {info['split_fractions'][s]:.3f} | {info['examples'][s]} |"
        )
    empty = [s for s in SPLITS if info["subjects"][s] == 0]
    if empty:
        lines += ["", f"**Warning:** no subject in {', '.join(empty)} (fewer than 3 subjects)."]
    lines += ["", f"Modalities: {', '.join(info['modalities'])}. Axes: {', '.join(info['axes'])}.",
              f"Labels: {', '.join(info['labels'])}.", ""]  # fmt: skip
    lines += ["## Skipped cases", ""]
    lines += [f"- `{s['case_id']}`: {s['reason']}" for s in info["skipped"]] or ["None."]
    lines += ["", "## Preview", "", "![preview](preview.png)", ""]
    text = "\n".join(lines)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.encode()))


def write_preview(path: Path, folder: Path, index: dict) -> None:
    """``preview.png``: first examples of the first tasks, label outlined in red over the image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = 128 if 128 in index["resolutions"] else min(index["resolutions"])
    images = np.load(folder / f"images_{res}.npy", mmap_mode="r")
    labels = np.load(folder / f"labels_{res}.npy", mmap_mode="r")
    examples = np.load(folder / "examples.npy")
    tasks = index["tasks"][:PREVIEW_TASKS]
    fig = Figure(figsize=(1.6 * PREVIEW_EXAMPLES, 1.7 * len(tasks)), dpi=80)
    for row, task in enumerate(tasks):
        picks = [i for s in SPLITS for i in range(*task["ranges"][s])][:PREVIEW_EXAMPLES]
        for col in range(PREVIEW_EXAMPLES):
            ax = fig.add_subplot(len(tasks), PREVIEW_EXAMPLES, row * PREVIEW_EXAMPLES + col + 1)
            ax.set_axis_off()
            if col >= len(picks):
                continue
            ex = examples[picks[col]]
            ax.imshow(images[ex[4]], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            label = labels[ex[5]] / 255.0
            if label.max() > 0:  # a tiny structure may stay below 0.5 at this resolution
                level = min(0.5, label.max() / 2)
                ax.contour(label, levels=[level], colors="red", linewidths=0.8)
            if col == 0:
                ax.set_title(
                    f"{task['modality']} {task['axis']} {task['label']}"[:40],
                    fontsize=7,
                    loc="left",
                )
    fig.tight_layout(pad=0.3)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
