"""megaseg: in-context (few-shot) medical image segmentation.

The public names below are imported on first use, so that ``import megaseg.preprocess`` (what
every corpus-build worker needs) does not pay for the network, timm and the evaluation stack.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "UniverSeg": "megaseg.models",
    "create_model": "megaseg.models",
    "list_models": "megaseg.models",
    "load_checkpoint": "megaseg.checkpoint",
    "CheckpointError": "megaseg.checkpoint",
    "save_checkpoint": "megaseg.checkpoint",
    "Prediction": "megaseg.inference",
    "Segmenter": "megaseg.inference",
    "segment": "megaseg.inference",
    "VolumeSession": "megaseg.annotate",
    "evaluate": "megaseg.evaluation",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megaseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
