"""Training: the LightningModule, the episode data module, callbacks and export (the commands
that run them: megaseg/cli/train.py); the demo's quick fallback trainer (fallback.py).

Imported only by ``megaseg fit|validate|test`` and by users who train; inference and
evaluation never import it.
"""

from megaseg.training.callbacks import (
    EpisodeLog,
    EpisodeThroughput,
    ExportWeights,
    PredictionWriter,
    ValidationGrid,
)
from megaseg.training.datamodule import EpisodeDataModule, HeldOutError
from megaseg.training.export import build_card, export_weights
from megaseg.training.module import InContextSegModule, WarmupCosine

__all__ = [
    "EpisodeDataModule",
    "EpisodeLog",
    "EpisodeThroughput",
    "ExportWeights",
    "HeldOutError",
    "InContextSegModule",
    "PredictionWriter",
    "ValidationGrid",
    "WarmupCosine",
    "build_card",
    "export_weights",
]
