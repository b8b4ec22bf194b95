"""Training callbacks: weight export, validation pictures, predictions, throughput, episode log."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.cli import SaveConfigCallback

from megaseg.paths import atomic_write
from megaseg.progress import is_terminal
from megaseg.training.export import export_weights


def _run_dir(trainer: pl.Trainer) -> Path:
    """The run's folder: the logger's version folder, else the trainer's root folder."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def resolved_config(trainer: pl.Trainer) -> dict:
    """The run's resolved LightningCLI config as plain data ({} outside the CLI)."""
    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            return yaml.safe_load(cb.parser.dump(cb.config, skip_none=False)) or {}
    return {}


class StepProgressBar(TQDMProgressBar):
    """The training bar counts steps toward ``trainer.max_steps`` (megaseg's runs are measured
    in steps; with Lightning's bars they read "Epoch 0/-2" or count batches of an endless
    epoch). Off a terminal (a job's log file) it is redrawn every :data:`LOG_EVERY` of the run
    at most, not at every step: each redraw is a new line there."""

    LOG_EVERY = 0.05  # of max_steps, off a terminal

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if not is_terminal(sys.stdout) and trainer.max_steps > 0:  # Lightning's bars: stdout
            self._refresh_rate = max(self._refresh_rate, int(trainer.max_steps * self.LOG_EVERY))

    def on_train_epoch_start(self, trainer, *args) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer, *args)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description("steps", refresh=False)
        bar.reset(total=trainer.max_steps)
        bar.n = bar.initial = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(n, bar.total) and not bar.disable:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.n = n
            bar.refresh()


class SaveOnSigterm(pl.Callback):
    """On SIGTERM (a job scheduler's time limit), save a resumable ``last.ckpt`` before the
    run stops. Lightning notices the signal after the current batch and stops the loop with
    ``SIGTERMException``; this saves the state at that step, in the first ``ModelCheckpoint``'s
    folder (else ``ROOT/checkpoints``), where ``--ckpt_path last`` finds it. ``saved``: the
    path written, None until then."""

    def __init__(self):
        self.saved: Path | None = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        from pytorch_lightning.callbacks import ModelCheckpoint
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
            path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        else:
            path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)  # every rank: a collective call under DDP
        if isinstance(ckpt, ModelCheckpoint):
            ckpt.last_model_path = str(path)
        self.saved = path


class ExportWeights(pl.Callback):
    """Export the network as safetensors + JSON card whenever a ``.ckpt`` is saved
    (``last.safetensors``) and when fitting ends (``final.safetensors``).

    Files go to ``dirpath`` (default: ``export/`` beside the checkpoints of the first
    ``ModelCheckpoint``, else in the run folder). The EMA weights are exported when the module
    keeps an EMA; ``raw=True`` also writes the raw weights (``*_raw.safetensors``);
    ``every_n_steps``: also keep ``step{N}.safetensors`` at the first save at or after each
    multiple of N steps (to score checkpoints along a run).
    """

    def __init__(self, dirpath: str | None = None, raw: bool = False, every_n_steps: int = 0):
        self.dirpath, self.raw, self.every_n_steps = dirpath, raw, every_n_steps
        self._kept_step = -1
        self._config: dict | None = None
        self.exported: Path | None = None  # the last file written

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath).parent / "export"
        return _run_dir(trainer) / "export"

    def export(self, trainer: pl.Trainer, module: pl.LightningModule, name: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        if self._config is None:
            self._config = resolved_config(trainer)
        out = self._dir(trainer)
        path = export_weights(out / f"{name}.safetensors", module, trainer, self._config)
        if self.raw and getattr(module, "ema", None) is not None:
            export_weights(
                out / f"{name}_raw.safetensors", module, trainer, self._config, ema=False
            )
        self.exported = path
        return path

    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed run: the run that saved its checkpoint kept the multiples up to that step.
        self._kept_step = trainer.global_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.export(trainer, pl_module, "last")
        n, step = self.every_n_steps, trainer.global_step
        if n > 0 and step // n > max(self._kept_step, 0) // n:
            self._kept_step = step
            self.export(trainer, pl_module, f"step{step:07d}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module, "final")


class ValidationGrid(pl.Callback):
    """Every ``every_n_steps`` training steps, a PNG of the first validation batch of each
    validation set: one row per episode (query, first support example with its label outline,
    truth, prediction), written to ``<run>/val_examples/step{N}_{set}.png``."""

    def __init__(self, every_n_steps: int = 500, max_rows: int = 4):
        self.every_n_steps, self.max_rows = every_n_steps, max_rows
        self._last_step = -1

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if dataloader_idx == 0:
            if self._last_step >= 0 and step - self._last_step < self.every_n_steps:
                self._skip = True
                return
            self._skip, self._last_step = False, step
        if getattr(self, "_skip", False) or not isinstance(outputs, dict):
            return
        names = getattr(trainer.datamodule, "eval_names", {}).get("val", [])
        name = names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx)
        path = _run_dir(trainer) / "val_examples" / f"step{step:07d}_{name}.png"
        save_grid(path, batch, outputs["logits"], self.max_rows, outputs.get("dice"))


def save_grid(path: Path, batch: dict, logits: torch.Tensor, max_rows: int = 4, dice=None) -> Path:
    """Write a (query | support 0 | truth | prediction) grid for the first ``max_rows`` episodes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = min(max_rows, logits.shape[0])
    fig = Figure(figsize=(4 * 1.6, rows * 1.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 4, squeeze=False)
    cpu = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    for r in range(rows):
        query = cpu(batch["query"][r, 0])
        support, support_label = (
            cpu(batch["support_images"][r, 0, 0]),
            cpu(batch["support_labels"][r, 0, 0]),
        )
        truth, pred = cpu(batch["query_label"][r, 0]), cpu(logits[r, 0] > 0)
        axes[r, 0].imshow(query, cmap="gray", vmin=0, vmax=1)
        axes[r, 1].imshow(support, cmap="gray", vmin=0, vmax=1)
        axes[r, 1].contour(support_label, levels=[0.5], colors="r", linewidths=0.7)
        axes[r, 2].imshow(truth, cmap="gray", vmin=0, vmax=1)
        axes[r, 3].imshow(pred, cmap="gray", vmin=0, vmax=1)
        if dice is not None:
            axes[r, 3].set_ylabel(f"Dice {float(dice[r]):.2f}", fontsize=7)
    for c, title in enumerate(("query", "support 0", "truth", "prediction")):
        axes[0, c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


class PredictionWriter(pl.Callback):
    """Writes each ``megaseg predict`` batch as it comes: ``{set}_batch{i:04d}.npz`` (query,
    support images and labels, ``probs``, and ``query_label`` / ``dice`` when known) and a PNG
    grid of its first episodes, under ``dirpath`` (default ``<default_root_dir>/predictions``).
    Each file is written to a temporary name and renamed: an interrupted run leaves whole files.

    A plain callback, not Lightning's ``BasePredictionWriter``: that one asks the loader for
    each batch's sample indices, which episode streams (``batch_size=None``) do not have, and
    warns on every run; the file names here use the batch index instead.
    """

    def __init__(self, dirpath: str | None = None, max_rows: int = 4):
        self.dirpath, self.max_rows = dirpath, max_rows

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "predictions")

    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.write_on_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch, batch_idx, dataloader_idx=0
    ) -> None:
        out = self._dir(trainer)  # atomic_write makes the folder
        stem = f"{prediction['set']}_batch{batch_idx:04d}"
        if trainer.world_size > 1:
            stem += f"_rank{trainer.global_rank}"
        arrays = {
            k: batch[k].detach().float().cpu().numpy()
            for k in ("query", "support_images", "support_labels", "query_label")
            if k in batch
        }
        arrays["probs"] = prediction["probs"].detach().cpu().numpy()
        if "dice" in prediction:
            arrays["dice"] = prediction["dice"].detach().cpu().numpy()

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez_compressed(f, **arrays)

        atomic_write(out / f"{stem}.npz", write_npz)
        if "query_label" in batch:  # save_grid thresholds at 0: pass p - 0.5
            grid = lambda tmp: save_grid(  # noqa: E731
                Path(tmp), batch, prediction["probs"] - 0.5, self.max_rows, prediction.get("dice")
            )
            atomic_write(out / f"{stem}.png", grid)


class EpisodeThroughput(pl.Callback):
    """Logs training ``perf/episodes_per_s`` (queries) and ``perf/images_per_s`` (queries and
    support examples) at each logging step, averaged since the previous one; data loading is
    included, validation and the first batch after it are not.

    Lightning's ``ThroughputMonitor`` wants a FLOP count and a 100-batch window before its first
    number; this one counts episodes and images and reports from the first logging step.
    """

    def __init__(self):
        self._t0: float | None = None
        self._episodes = self._images = 0

    def _reset(self) -> None:
        self._t0, self._episodes, self._images = time.perf_counter(), 0, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t0 = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:  # the first batch pays for warm-up and loader start: not counted
            self._reset()
            return
        B, S = batch["support_images"].shape[:2]
        self._episodes += B
        self._images += B * (S + 1)
        if trainer._logger_connector.should_update_logs or trainer.is_last_batch:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - self._t0
            pl_module.log_dict(
                {"perf/episodes_per_s": self._episodes / dt, "perf/images_per_s": self._images / dt},
                on_step=True, on_epoch=False, batch_size=B,
            )  # fmt: skip
            self._reset()


class EpisodeLog(pl.Callback):
    """Appends, per training batch, ``{"rank", "global_step", "index", "task"}`` to
    ``<dirpath or run folder>/episodes_rank{R}.jsonl``: which episodes each rank trained on."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rank = trainer.global_rank
        path = Path(self.dirpath or _run_dir(trainer)) / f"episodes_rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "global_step": trainer.global_step,
                  "index": batch["index"].tolist(), "task": list(batch["task"])}  # fmt: skip
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
