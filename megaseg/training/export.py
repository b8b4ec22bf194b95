"""Export trained weights as safetensors plus a JSON card (see :mod:`megaseg.checkpoint`).

The card says what the model is (registry name and builder kwargs, so ``megaseg.load_checkpoint``
rebuilds it with no pickle), what it expects (resolution; preprocessing as fields the Segmenter
reads, :func:`megaseg.preprocess.card_fields`), which weights these
are (EMA or raw) and what it saw (datasets with the corpus manifest checksum, synthetic
generator version and seed range, held-out datasets), with the resolved config, step and seed.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

import megaseg
from megaseg.checkpoint import save_checkpoint
from megaseg.preprocess import card_fields


def git_revision(path: str | Path | None = None) -> str | None:
    """``git describe``-like revision of the megaseg source tree: commit, ``+dirty`` if edited;
    None outside a git checkout."""
    cwd = Path(path or Path(megaseg.__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _jsonable(x: Any) -> Any:
    """Tuples -> lists, paths and other objects -> str, recursively."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def build_card(
    module: pl.LightningModule,
    trainer: pl.Trainer | None = None,
    config: dict | None = None,
    weights: str = "ema",
) -> dict:
    """The card of ``module``'s network; ``weights``: "ema" or "raw" (which ones are saved)."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    data = datamodule.describe() if hasattr(datamodule, "describe") else {}
    resolution = int(getattr(module, "resolution", data.get("resolution", 128)))
    return _jsonable({
        "megaseg_version": megaseg.__version__,
        "git_revision": git_revision(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {"name": module.model_name, "kwargs": module.model_kwargs},
        "resolution": resolution,
        "preprocessing": {
            **card_fields(resolution),  # the fields the Segmenter reads
            "intensity": "grayscale, windowed to [0, 1] per modality (normalization: CT "
            "ct_window in HU; MR mr_percentiles of nonzero voxels; else min-max), padded "
            "square, resized",
            "labels": "binary or soft masks in [0, 1], one structure per task",
        },
        "weights": weights,
        "ema_decay": getattr(module, "hparams", {}).get("ema_decay"),
        "training": {
            "step": None if trainer is None else trainer.global_step,
            "epoch": None if trainer is None else trainer.current_epoch,
            "support_size": getattr(module, "support_size", None),
            "data": data,
        },
        "held_out": data.get("held_out", []),
        "seed": data.get("seed"),
        "config": config or {},
    })  # fmt: skip


def export_weights(
    path: str | Path,
    module: pl.LightningModule,
    trainer: pl.Trainer | None = None,
    config: dict | None = None,
    ema: bool | None = None,
) -> Path:
    """Write ``module``'s network (the EMA copy when it has one, unless ``ema=False``) to
    ``path`` (.safetensors) with its card beside it (.json)."""
    use_ema = getattr(module, "ema", None) is not None if ema is None else ema
    if use_ema and getattr(module, "ema", None) is None:
        raise ValueError("ema=True but the module keeps no EMA of its weights")
    net = module.ema.module if use_ema else module.net
    card = build_card(module, trainer, config, weights="ema" if use_ema else "raw")
    return save_checkpoint(path, net, card)
