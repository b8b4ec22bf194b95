"""Model registry and factory: ``create_model("universeg_v1", pretrained=False)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# Weights that megaseg itself trained and ships, by model name then tag; the first tag is the
# default for ``pretrained=True``. Paths are relative to the checkpoints/ folder. This never
# refers to the official UniverSeg release.
_PRETRAINED: dict[str, dict[str, str]] = {
    # 32-feature v1 trained 35 min on a 2-core CPU on synthetic tasks at 64x64; see
    # checkpoints/README.md (its model card) and configs/megaseg_small_synth64.yaml.
    "universeg_v1_small": {"synth64": "megaseg_small_synth64.safetensors"},
}


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
        raise ValueError(
            f"megaseg ships no pretrained weights for {name!r} yet; use pretrained=False, "
            "or load your own file with megaseg.load_checkpoint / Segmenter.from_checkpoint"
        )
    key = next(iter(tags)) if tag is True else tag
    if key not in tags:
        raise ValueError(f"no shipped weights {key!r} for {name!r}; available: {list(tags)}")
    return checkpoints_dir() / tags[key]


def create_model(name: str, pretrained: bool | str = False, **kwargs) -> nn.Module:
    """Build a registered model; ``pretrained=True`` (or a tag) loads megaseg's shipped weights."""
    model = model_builder(name)(**kwargs)
    if pretrained:
        from megaseg.checkpoint import load_state_dict_file

        state, _ = load_state_dict_file(pretrained_path(name, pretrained))
        model.load_state_dict(state, strict=True)
    return model
