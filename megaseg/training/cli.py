"""``megaseg fit|validate|test|predict --config configs/....yaml``: the LightningCLI.

The data module is the authority on the values it shares with the model: ``data.resolution``
and ``data.support_size`` are linked to ``model.resolution`` and ``model.support_size``.

Every run under ``trainer.default_root_dir`` (ROOT):

- ``ROOT/checkpoints/``: Lightning's resumable ``.ckpt`` files (a ``ModelCheckpoint`` without a
  ``dirpath`` is pointed here, so ``--ckpt_path last`` finds them from one run to the next);
- ``ROOT/export/{last,final}.safetensors`` + ``.json`` cards (:class:`ExportWeights`, always on);
- ``ROOT/predictions/`` (``megaseg predict``): per test-episode batch an ``.npz`` with the
  probabilities and a PNG (:class:`PredictionWriter`);
- ``ROOT/lightning_logs/version_N/``: ``metrics.csv`` (and TensorBoard events when tensorboard
  is installed), the resolved ``config.yaml``, ``val_examples/*.png``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from megaseg.training.callbacks import EpisodeThroughput, ExportWeights, PredictionWriter
from megaseg.training.datamodule import EpisodeDataModule
from megaseg.training.module import InContextSegModule


def default_loggers(root: str) -> list:
    """CSV always; TensorBoard too (same version folder) when it is installed."""
    csv = CSVLogger(root, name="lightning_logs")
    loggers = [csv]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(root, name="lightning_logs", version=csv.version))
    return loggers


class MegasegCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.resolution", "model.resolution")
        parser.link_arguments("data.support_size", "model.support_size")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd())
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        root = Path(self.trainer.default_root_dir)
        for cb in self.trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = os.path.realpath(root / "checkpoints")

    def before_predict(self) -> None:
        # Without a writer of the user's, each batch's predictions are written as they come.
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())


def lightning_main(argv: list[str] | None = None) -> int:
    """Run the Lightning CLI on ``argv`` (``[subcommand, --config, ...]``); returns 0."""
    if argv is not None and list(argv) == sys.argv[1:]:
        argv = None  # the command line itself: let LightningCLI read sys.argv
    MegasegCLI(
        InContextSegModule,
        EpisodeDataModule,
        args=argv,
        trainer_defaults={"callbacks": [ExportWeights(), EpisodeThroughput()]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    return 0
