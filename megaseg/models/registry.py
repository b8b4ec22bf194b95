"""The model registry, a leaf: model names -> builders, and the weights megaseg ships.

Builders register with ``@register_model`` (``universeg.py``); :func:`model_builder` looks one
up. Building a model with its weights is the factory's job (``factory.create_model``), and
loading weights is ``megaseg.checkpoint``'s: this module imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from megaseg.deprecation import moved

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# Weights that megaseg itself trained and ships, by model name then tag; the first tag is the
# default for ``pretrained=True``. Paths are relative to the checkpoints/ folder. This never
# refers to the official UniverSeg release (that is ``pretrained="official"``, megaseg.hub).
_PRETRAINED: dict[str, dict[str, str]] = {
    # 32-feature v1 networks; model cards in checkpoints/README.md.
    # "generalist": issue #13's campaign (synthetic tasks v2 + packaged real tasks with
    # cross-subject brain-mask episodes): 12000 steps at 64 px and 2000 at 128 px on a CPU
    # (configs/generalist_cpu.yaml, generalist_cpu_128.yaml + generalist_cpu_128_heads.yaml),
    # then 5.5 minutes on an H200 at 128 px (configs/generalist_gpu.yaml), the default;
    # "cpu": the same before the GPU minutes (the default until then); "phase2": the CPU
    # recipe without the cross-subject tasks; "synth64": the first model (synthetic tasks v1,
    # 35 min on a CPU; configs/megaseg_small_synth64.yaml).
    "universeg_v1_small": {
        "generalist": "megaseg_generalist.safetensors",
        "cpu": "megaseg_generalist_cpu.safetensors",
        "phase2": "megaseg_generalist_p2.safetensors",
        "synth64": "megaseg_small_synth64.safetensors",
    },
}


def shipped_weights() -> dict[str, tuple[str, str]]:
    """The shipped weights by name (the file's stem, e.g. ``"megaseg_generalist"``, as the
    README and the model cards call them) -> ``(model name, tag)`` for :func:`pretrained_path`."""
    return {
        Path(file).stem: (model, tag)
        for model, tags in _PRETRAINED.items()
        for tag, file in tags.items()
    }


# The name of the default weights, as the README and checkpoints/README.md call them; the model
# name "universeg_v1_small" (their architecture) loads them too.
DEFAULT_SHIPPED = "megaseg_generalist"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_builder(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _MODELS[name]


def checkpoints_dir() -> Path:
    """The folder of shipped weights (``$MEGASEG_CHECKPOINTS`` or the repository's)."""
    import os

    env = os.environ.get("MEGASEG_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "checkpoints"


def pretrained_path(name: str, tag: str | bool = True) -> Path:
    """Path of the weights megaseg ships for ``name`` (``tag=True``: the default tag)."""
    tags = _PRETRAINED.get(name, {})
    if not tags:
        official = (
            "; the UniverSeg authors' weights for it load with Segmenter.from_pretrained("
            "'universeg-v1-official', accept_license=True) or create_model('universeg_v1', "
            "pretrained='official', accept_license=True) (research-only licence)"
            if name == "universeg_v1"
            else ""
        )
        raise ValueError(
            f"megaseg ships no pretrained weights for {name!r} yet{official}; megaseg's own "
            f"load with Segmenter.from_checkpoint({DEFAULT_SHIPPED!r}); or use "
            "pretrained=False, or load your own file with megaseg.load_checkpoint / "
            "Segmenter.from_checkpoint"
        )
    key = next(iter(tags)) if tag is True else tag
    if key not in tags:
        raise ValueError(f"no shipped weights {key!r} for {name!r}; available: {list(tags)}")
    return checkpoints_dir() / tags[key]


__getattr__ = moved(__name__, {"create_model": "megaseg.models.factory:create_model"})
