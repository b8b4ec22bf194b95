"""Weights on disk: safetensors plus a JSON card, loaded without unpickling arbitrary objects.

A checkpoint is ``NAME.safetensors`` (tensors only) with ``NAME.json`` beside it (the card:
what the model is, how it was trained, how its inputs are preprocessed). A raw state dict saved
with ``torch.save`` is accepted too, read with ``torch.load(weights_only=True)``; a file that
holds anything else than tensors and plain containers is refused.

Loading checks before it allocates: the card is validated, the model it names is built on the
``meta`` device (no memory) and every parameter shape is compared with the tensor shapes in the
safetensors header (read without reading the tensors). Only a card that fits its weights is
materialised, so a card asking for a 100000-feature network fails at once instead of
allocating hundreds of GB. Weights holding NaN or inf are refused (``allow_nonfinite=True``
to load them anyway). Every such refusal is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from megaseg import paths
from megaseg.deprecation import moved

CARD_FORMAT_VERSION = 1
DEFAULT_MODEL = "universeg_v1"
# The largest input size a card may ask for. v1 runs at 128; the cached support alone is
# S*C*R*R*4 bytes (64 examples, 64 features at R=1024: 17 GB), so beyond this a card is
# almost surely wrong and would allocate terabytes at set_support (2**20 -> ~4 TB).
MAX_RESOLUTION = 1024
# No registered model has more than a handful of levels; a longer list in a card's kwargs
# would only make building the (meta) model slow.
MAX_KWARG_SEQUENCE = 64


class CheckpointError(ValueError):
    """A checkpoint or its card cannot be used; the message names the file and the reason."""


def card_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model``'s weights to ``path`` (.safetensors) and ``card`` beside it, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoints are written as .safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    card = {"format_version": CARD_FORMAT_VERSION, **card}
    paths.atomic_write(path, lambda tmp: save_file(state, tmp))
    text = json.dumps(card, indent=2, sort_keys=True, default=str)
    paths.atomic_write(card_path(path), lambda tmp: Path(tmp).write_text(text))
    return path


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def plain_detail(err: BaseException) -> str:
    """A library's error text for a one-line message: terminal colour codes (torch bolds parts
    of its unpickling errors) removed, lines and runs of spaces joined."""
    return " ".join(_ANSI.sub("", str(err)).split())


def _unpickler_detail(err: BaseException) -> str:
    """Of torch's long weights-only refusal, the line that names what was refused."""
    lines = [" ".join(_ANSI.sub("", line).split()) for line in str(err).splitlines()]
    named = [line for line in lines if "WeightsUnpickler error" in line]
    return (named[0] if named else plain_detail(err)).split(". ")[0]


def read_card(weights: str | os.PathLike) -> dict | None:
    """The card beside ``weights`` (a JSON object), or None when there is none.

    Raises:
        CheckpointError: the card is not readable JSON or not an object.
    """
    path = card_path(weights)
    if path == Path(weights) or not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: the checkpoint card is not valid JSON ({plain_detail(e)})"
        ) from e
    if not isinstance(card, dict):
        raise CheckpointError(
            f"{path}: the checkpoint card must be a JSON object, got {type(card).__name__}"
        )
    return card


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading any tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({plain_detail(e)})") from e


def load_state_dict_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """Read weights safely: ``(state_dict, card or None)``. Values are not checked here.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a safetensors file or a tensors-only torch file, or
            its card is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    card = read_card(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path), card
    return load_torch_state_dict(path), card


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a safetensors file (on the CPU)."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({plain_detail(e)})") from e


def load_torch_state_dict(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Tensor]:
    """A state dict saved with ``torch.save``, read with ``weights_only=True`` (no code runs).

    A Lightning-style ``{"state_dict": {...}, ...}`` wrapper is unwrapped. ``map_location=
    "meta"``: shapes only, no tensor data is read (see :func:`torch_shapes`).
    """
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (the legacy format: a pickle, b"\x80..."); anything
    # else is not a weights file, and would otherwise be reported as "pickled objects".
    if not (zipfile.is_zipfile(path) or head.startswith(b"\x80")):
        raise CheckpointError(
            f"{path}: not a readable torch weights file (neither a torch.save archive nor a "
            f"safetensors file; starts with {head!r})"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused, the file holds pickled objects other than tensors "
            "(loading it could run arbitrary code). Re-save it as a plain state dict or "
            f"as safetensors. Detail: {_unpickler_detail(e)}"
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable torch weights file ({plain_detail(e)})"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(obj)


# ------------------------------------------------------------------------------ checks


def model_spec(card: dict | None, path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The ``(name, kwargs)`` a card's ``model`` entry names; no card: a raw v1 state dict."""
    if card is None or "model" not in card:
        return DEFAULT_MODEL, {}
    where = card_path(path)
    spec = card["model"]
    if not isinstance(spec, dict):
        raise CheckpointError(
            f'{where}: \'model\' must be an object {{"name": ..., "kwargs": {{...}}}}, '
            f"got {json.dumps(spec)}"
        )
    name, kwargs = spec.get("name", DEFAULT_MODEL), spec.get("kwargs") or {}
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: model.name must be a string, got {json.dumps(name)}")
    if not isinstance(kwargs, dict):
        raise CheckpointError(
            f"{where}: model.kwargs must be an object of keyword arguments, got "
            f"{json.dumps(kwargs)}"
        )
    for key, value in kwargs.items():
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) > MAX_KWARG_SEQUENCE:
                raise CheckpointError(
                    f"{where}: model.kwargs.{key} has {len(value)} entries (at most "
                    f"{MAX_KWARG_SEQUENCE}); the card is not a model megaseg can build"
                )
    return name, kwargs


def build_model(
    name: str, kwargs: Mapping[str, Any], path: str | os.PathLike, device: str = "cpu"
) -> nn.Module:
    """The registered model ``name`` built with ``kwargs`` on ``device`` ("meta": shapes only,
    no memory), without weights, with any failure turned into a :class:`CheckpointError`
    naming the card. Looks the builder up in the registry (a leaf), not through
    ``create_model``, whose weight loading comes back here."""
    from megaseg.models.registry import model_builder

    try:
        with torch.device(device):
            return model_builder(name)(**kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(
            f"{card_path(path)}: cannot build model {name!r} with kwargs {json.dumps(kwargs)}: {plain_detail(e)}"
        ) from e


def torch_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``torch.save`` state dict, read on the ``meta`` device: no
    storage is read, so a file whose entries are deflated does not inflate here. Refuses
    tensors backed by storages far larger than themselves (the real load allocates storages)."""
    state = load_torch_state_dict(path, map_location="meta")
    if not zipfile.is_zipfile(path):  # the legacy format holds its data inline, in the file
        return state_shapes(state)
    with zipfile.ZipFile(path) as zf:  # one "<archive>/data/<key>" entry per storage
        held = sum(i.file_size for i in zf.infolist() if "/data/" in i.filename)
    needed = sum(v.numel() * v.element_size() for v in state.values())
    if held > 4 * needed + 2**20:
        raise CheckpointError(
            f"{path}: its tensors ({needed / 2**20:.1f} MB) are views into storages of "
            f"{held / 2**20:.1f} MB that loading would allocate; re-save the state dict with "
            "each tensor cloned"
        )
    return state_shapes(state)


def state_shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a state dict (what :func:`check_shapes` compares)."""
    return {k: tuple(v.shape) for k, v in state.items()}


def check_shapes(
    model: nn.Module, shapes: Mapping[str, Sequence[int]], path: str | os.PathLike
) -> None:
    """Raise :class:`CheckpointError` unless ``shapes`` (name -> shape of every tensor in the
    file) are exactly ``model``'s state-dict names and shapes. Works on a meta model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    parts = shape_mismatches(expected, shapes)
    if not parts:
        return
    raise CheckpointError(
        f"{path}: weights do not fit the model its card describes "
        f"({type(model).__name__}, {sum(math.prod(s) for s in expected.values()):,} "
        f"parameters): " + " | ".join(parts)
    )


def shape_mismatches(
    expected: Mapping[str, Sequence[int]], shapes: Mapping[str, Sequence[int]]
) -> list[str]:
    """``["missing: ...", "unexpected: ...", "shape: name: file (..), model (..)"]`` (at most
    5 names each) between a model's and a file's tensor shapes; [] when they are the same."""
    expected = {k: tuple(v) for k, v in expected.items()}
    got = {k: tuple(v) for k, v in shapes.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = [
        f"{k}: file {got[k]}, model {expected[k]}"
        for k in expected.keys() & got.keys()
        if got[k] != expected[k]
    ]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", sorted(wrong))):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{what}: {'; '.join(items[:5])}{more}")
    return parts


def check_finite(state: Mapping[str, Tensor], path: str | os.PathLike, allow: bool = False) -> None:
    """Refuse weights holding NaN or inf (a diverged run): such a model predicts nothing
    useful. ``allow=True`` turns the error into a warning."""
    bad = {}
    for k, v in state.items():
        if v.is_floating_point() or v.is_complex():
            n = int((~torch.isfinite(v)).sum())
            if n:
                bad[k] = n
    if not bad:
        return
    names = ", ".join(f"{k} ({n} of {state[k].numel()})" for k, n in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    msg = f"{path}: {len(bad)} tensor(s) hold NaN or inf values: {names}{more}"
    if not allow:
        raise CheckpointError(
            msg + "; the weights are unusable (did training diverge?). Pass "
            "allow_nonfinite=True to load them anyway."
        )
    warnings.warn(msg + " (loaded because allow_nonfinite=True)", stacklevel=3)


def card_resolution(card: dict | None, path: str | os.PathLike) -> int | None:
    """The card's input size (``resolution``, or ``preprocessing.resolution`` / ``.size``),
    checked to be an integer in ``[1, MAX_RESOLUTION]``; None when the card has none."""
    card = card or {}
    pre = card.get("preprocessing")
    pre = pre if isinstance(pre, dict) else {}
    value = card.get("resolution", pre.get("resolution", pre.get("size")))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RESOLUTION:
        raise CheckpointError(
            f"{card_path(path)}: resolution must be an integer from 1 to {MAX_RESOLUTION}, got "
            f"{json.dumps(value)}"
        )
    return value


def card_preprocessing(card: dict | None, path: str | os.PathLike) -> dict[str, Any]:
    """The card's ``preprocessing`` object (:func:`megaseg.preprocess.card_fields`) with the
    fields the Segmenter reads checked, as far as they are given: ``modality`` (a string),
    ``window`` and ``normalization.ct_window`` (``[low, high]``, finite, low < high), and the
    rest of ``normalization`` being what :mod:`megaseg.preprocess` does (a card asking for
    other MR percentiles or another range is refused: they would be silently ignored); {}
    when absent."""
    pre = (card or {}).get("preprocessing")
    if pre is None:
        return {}
    where = card_path(path)
    if not isinstance(pre, dict):
        raise CheckpointError(f"{where}: preprocessing must be an object, got {json.dumps(pre)}")
    modality = pre.get("modality")
    if modality is not None and not isinstance(modality, str):
        raise CheckpointError(
            f'{where}: preprocessing.modality must be a string (e.g. "CT"), got '
            f"{json.dumps(modality)}"
        )
    _check_window(pre.get("window"), f"{where}: preprocessing.window")
    norm = pre.get("normalization")
    if norm is None:
        return pre
    if not isinstance(norm, dict):
        raise CheckpointError(
            f"{where}: preprocessing.normalization must be an object, got {json.dumps(norm)}"
        )
    _check_window(norm.get("ct_window"), f"{where}: preprocessing.normalization.ct_window")
    from megaseg.preprocess import card_fields

    supported = card_fields(1)["normalization"]
    for key in ("range", "mr_percentiles", "other"):
        if key in norm and norm[key] != supported[key]:
            raise CheckpointError(
                f"{where}: preprocessing.normalization.{key} is {json.dumps(norm[key])}, but "
                f"this megaseg applies {json.dumps(supported[key])} (megaseg/preprocess.py)"
            )
    return pre


def _check_window(window, what: str) -> None:
    if window is not None and not (
        isinstance(window, list)
        and len(window) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in window)
        and all(math.isfinite(v) for v in window)
        and window[0] < window[1]
    ):
        raise CheckpointError(
            f"{what} must be [low, high], two finite numbers with low < high, got "
            f"{json.dumps(window)}"
        )


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None, *, allow_nonfinite: bool = False
) -> tuple[nn.Module, dict]:
    """Build the model the card names (or use ``model``) and load the weights, strictly.

    A file without a card is taken to be a raw ``universeg_v1`` state dict. The card and the
    weights are checked against each other before anything large is allocated (see the
    module docstring).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError (a ValueError): unreadable or unsafe file, malformed card, a model the
            card cannot build, weights that do not fit it, NaN/inf weights (unless
            ``allow_nonfinite``), a resolution out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    card = read_card(path)
    if path.suffix == ".safetensors":
        shapes = safetensors_shapes(path)
    else:  # read on "meta": a deflated torch file would inflate before any shape is checked
        shapes = torch_shapes(path)
    card_resolution(card, path)
    if model is None:
        name, kwargs = model_spec(card, path)
        check_shapes(build_model(name, kwargs, path, device="meta"), shapes, path)
        model = build_model(name, kwargs, path)
    else:
        check_shapes(model, shapes, path)
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        state = load_torch_state_dict(path)
    check_finite(state, path, allow_nonfinite)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a dtype the parameter cannot take
        raise CheckpointError(f"{path}: weights do not fit the model: {plain_detail(e)}") from e
    return model, card or {"model": {"name": DEFAULT_MODEL, "kwargs": {}}}


__getattr__ = moved(__name__, {"atomic_write": "megaseg.paths:atomic_write"})
