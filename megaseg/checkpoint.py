"""Weights on disk: safetensors plus a JSON card, loaded without unpickling arbitrary objects.

A checkpoint is ``NAME.safetensors`` (tensors only) with ``NAME.json`` beside it (the card:
what the model is, how it was trained, how its inputs are preprocessed). A raw state dict saved
with ``torch.save`` is accepted too, read with ``torch.load(weights_only=True)``; a file that
holds anything else than tensors and plain containers is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CARD_FORMAT_VERSION = 1


def card_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model``'s weights to ``path`` (.safetensors) and ``card`` beside it, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoints are written as .safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    card = {"format_version": CARD_FORMAT_VERSION, **card}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    text = json.dumps(card, indent=2, sort_keys=True, default=str)
    atomic_write(card_path(path), lambda tmp: Path(tmp).write_text(text))
    return path


def load_state_dict_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """Read weights safely: ``(state_dict, card or None)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a safetensors file or a tensors-only torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    card = None
    if card_path(path).is_file() and card_path(path) != path:
        card = json.loads(card_path(path).read_text())
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), card
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused, the file holds pickled objects other than tensors "
            "(loading it could run arbitrary code). Re-save it as a plain state dict or "
            f"as safetensors. Detail: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch weights file ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(obj), card


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None
) -> tuple[nn.Module, dict]:
    """Build the model the card names (or use ``model``) and load the weights, strictly.

    A file without a card is taken to be a raw ``universeg_v1`` state dict.
    """
    from megaseg.models import create_model

    state, card = load_state_dict_file(path)
    card = card or {"model": {"name": "universeg_v1", "kwargs": {}}}
    if model is None:
        spec = card.get("model", {})
        model = create_model(spec.get("name", "universeg_v1"), **spec.get("kwargs", {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model: {e}") from e
    return model, card
