"""Leakage check: near-duplicate slices across datasets and across splits, plus known overlaps.

Every stored image is reduced to a 32x32 thumbnail, centred and scaled to unit norm, so the
dot product of two thumbnails is their Pearson correlation. All pairs are compared with
chunked matrix products (``chunk x N`` at a time); a pair above :data:`THRESHOLD` is reported
when its two images come from different datasets, or from one dataset's different splits.
Constant thumbnails (blank slices) have no correlation and are counted, not compared.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megaseg.data.store import EXAMPLE_COLUMNS, SPLITS

THRESHOLD = 0.98
THUMB = 32
_IMAGE_ROW, _SPLIT, _SUBJECT = (EXAMPLE_COLUMNS.index(c) for c in ("image_row", "split", "subject"))


@dataclass(frozen=True, order=True)
class ImageRef:
    """One stored image: dataset, its row in ``images_R.npy``, its subject and split."""

    dataset: str
    row: int
    subject: str
    split: str


@dataclass(frozen=True)
class NearDuplicate:
    kind: str  # "cross-dataset" or "cross-split"
    a: ImageRef
    b: ImageRef
    correlation: float


def thumbnails(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``(n, R, R)`` uint8 -> ``(n, 32*32)`` float16 rows, zero-mean and unit-norm (zeros if
    constant). float16 halves the memory of a large corpus; correlations are computed in float32."""
    n, r = images.shape[0], images.shape[-1]
    out = np.empty((n, THUMB * THUMB), np.float16)
    for start in range(0, n, chunk):
        x = np.asarray(images[start : start + chunk], np.float32)
        if r % THUMB == 0:  # block mean: exact area average
            f = r // THUMB
            x = x.reshape(len(x), THUMB, f, THUMB, f).mean(axis=(2, 4))
        else:
            import torch

            from megaseg.preprocess import resize

            x = resize(torch.from_numpy(x), THUMB).numpy()
        x = x.reshape(len(x), -1)
        x -= x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + len(x)] = np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-6)
    return out


def corpus_thumbnails(root: str | Path) -> tuple[np.ndarray, list[ImageRef]]:
    """Thumbnails of every image of the corpus at ``root`` and what each one is."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    thumbs, refs = [], []
    for name in sorted(manifest["datasets"]):
        folder = root / "datasets" / name
        index = json.loads((folder / "index.json").read_text())
        examples = np.load(folder / "examples.npy")
        res = min(
            (r for r in index["resolutions"] if r >= THUMB), default=max(index["resolutions"])
        )
        images = np.load(folder / f"images_{res}.npy", mmap_mode="r")
        owner = np.full(images.shape[0], -1, np.int64)
        owner[examples[:, _IMAGE_ROW]] = np.arange(len(examples))
        subjects = index["subjects"]
        for row in range(images.shape[0]):
            ex = examples[owner[row]]
            refs.append(ImageRef(name, row, subjects[ex[_SUBJECT]], SPLITS[ex[_SPLIT]]))
        thumbs.append(thumbnails(images))
    return (np.concatenate(thumbs) if thumbs else np.zeros((0, THUMB * THUMB), np.float32)), refs


def near_duplicates(
    thumbs: np.ndarray,
    refs: list[ImageRef],
    threshold: float = THRESHOLD,
    chunk: int = 4096,
    device: str | None = None,
) -> list[NearDuplicate]:
    """Pairs ``(i < j)`` with correlation > ``threshold`` across datasets or across splits.

    ``thumbs (n, 1024)`` from :func:`thumbnails`, compared ``chunk x chunk`` blocks at a time
    with torch matrix products on ``device`` (default: CUDA when available, else the CPU).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.from_numpy(np.ascontiguousarray(thumbs, np.float32)).to(device)
    dataset = np.unique([r.dataset for r in refs], return_inverse=True)[1]
    split = np.array([SPLITS.index(r.split) for r in refs])
    found = []
    n = len(x)
    for a0 in range(0, n, chunk):
        for b0 in range(a0, n, chunk):
            corr = x[a0 : a0 + chunk] @ x[b0 : b0 + chunk].T
            hits = torch.nonzero(corr > threshold).cpu().numpy()
            if not hits.size:
                continue
            values = corr[hits[:, 0], hits[:, 1]].cpu().numpy()
            i, j = hits[:, 0] + a0, hits[:, 1] + b0
            keep = (j > i) & ((dataset[i] != dataset[j]) | (split[i] != split[j]))
            for p, q, c in zip(i[keep], j[keep], values[keep], strict=True):
                kind = "cross-dataset" if dataset[p] != dataset[q] else "cross-split"
                found.append(NearDuplicate(kind, refs[p], refs[q], round(float(c), 4)))
    return sorted(found, key=lambda d: (-d.correlation, d.a, d.b))


def leakage_report(root: str | Path, threshold: float = THRESHOLD) -> dict:
    """Near-duplicates and the declared overlaps (``KNOWN_OVERLAPS``) among the corpus's datasets."""
    from data_prep.specs import overlaps_among

    thumbs, refs = corpus_thumbnails(root)
    pairs = near_duplicates(thumbs, refs, threshold)
    names = sorted({r.dataset for r in refs})
    return {
        "threshold": threshold,
        "images": len(refs),
        "blank_images": int((np.abs(thumbs).sum(axis=1) == 0).sum()),
        "cross_dataset": sum(p.kind == "cross-dataset" for p in pairs),
        "cross_split": sum(p.kind == "cross-split" for p in pairs),
        "pairs": [asdict(p) for p in pairs],
        "known_overlaps": [asdict(o) for o in overlaps_among(names)],
    }
