"""megaseg: in-context (few-shot) medical image segmentation."""

__version__ = "0.1.0"

from megaseg.checkpoint import load_checkpoint, save_checkpoint
from megaseg.evaluation import evaluate
from megaseg.inference import Prediction, Segmenter, segment
from megaseg.models import UniverSeg, create_model, list_models

__all__ = [
    "Prediction",
    "Segmenter",
    "UniverSeg",
    "__version__",
    "create_model",
    "evaluate",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
    "segment",
]
