"""Model registry and factory: ``create_model("universeg_v1", pretrained=False)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

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


def create_model(
    name: str, pretrained: bool | str = False, *, accept_license: bool = False, **kwargs
) -> nn.Module:
    """Build a registered model, optionally with weights.

    ``pretrained``: False (random init), True or a tag (weights megaseg ships, see
    :func:`pretrained_path`), or ``"official"`` for ``universeg_v1``: the weights released by
    the UniverSeg authors, downloaded once to a cache (:mod:`megaseg.hub`); their licence is
    research-only, so they load only with ``accept_license=True``.

    Raises:
        ValueError: unknown model or tag; megaseg.checkpoint.CheckpointError (a ValueError)
            for weights that do not fit or hold NaN/inf.
    """
    if pretrained == "official":
        from megaseg.hub import load_official

        return load_official(name, accept_license=accept_license, **kwargs)
    if accept_license:
        raise ValueError("accept_license: only used with pretrained='official'")
    if not pretrained:
        return model_builder(name)(**kwargs)
    from megaseg.checkpoint import load_checkpoint

    model, _ = load_checkpoint(pretrained_path(name, pretrained), model_builder(name)(**kwargs))
    return model
