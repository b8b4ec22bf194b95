"""A small network trained on synthetic tasks in about a minute on a CPU: ``megaseg demo``'s
model when no checkpoint is given or shipped (:func:`megaseg.demo.load_demo_model`).

It uses the training code as ``megaseg fit`` does (:class:`~megaseg.training.InContextSegModule`,
:class:`~megaseg.training.EpisodeDataModule`, a Lightning ``Trainer`` with ``max_time``). A
demonstration that the pipeline runs end to end, not a model to judge in-context segmentation by.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

from megaseg.cpu import idle_threads

if TYPE_CHECKING:
    import torch

DEFAULT_SECONDS = 45.0
# The fallback network: UniverSeg v1's layout at a quarter of its width, at 64 px, so that a
# 2-core CPU makes 100-300 steps in 45 s (fewer when other jobs share it). Small enough to say what it is: a
# demonstration that the pipeline runs, not a model to judge in-context segmentation by.
FALLBACK_MODEL = "universeg_v1"
FALLBACK_KWARGS = {"encoder_widths": [16, 16, 16, 16]}
FALLBACK_RESOLUTION = 64
FALLBACK_SUPPORT = (2, 4)  # support sizes drawn per batch
FALLBACK_BATCH = 4
FALLBACK_TASKS = 50  # few tasks (5-20 labels each): their label maps are built once, then cached
FALLBACK_LR = 2e-3


def train_synthetic_model(
    seconds: float = DEFAULT_SECONDS,
    out_path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    max_steps: int = -1,
    batch_size: int = FALLBACK_BATCH,
    support_size: tuple[int, int] = FALLBACK_SUPPORT,
    lr: float = FALLBACK_LR,
    loss: torch.nn.Module | None = None,
    log: Callable[[str], None] | None = print,
):
    """Train the small fallback network on synthetic tasks for ``seconds`` of wall time.

    Uses the training code as ``megaseg fit`` does (:class:`~megaseg.training.InContextSegModule`,
    :class:`~megaseg.training.EpisodeDataModule`, a Lightning ``Trainer`` with ``max_time``),
    with :data:`FALLBACK_KWARGS` at :data:`FALLBACK_RESOLUTION` px, Adam with warm-up and
    gradient clipping. ``out_path``: also export the weights there (``.safetensors`` and its JSON
    card, loadable by ``Segmenter.from_checkpoint``). ``log``: progress lines (None: silent).

    Returns:
        ``(network, card, steps, elapsed_seconds)``; the network is in eval mode on the CPU.
    """
    import pytorch_lightning as pl
    import torch

    from megaseg.checkpoint import save_checkpoint
    from megaseg.training import EpisodeDataModule, InContextSegModule, WarmupCosine, build_card

    say = log or (lambda _: None)
    data = EpisodeDataModule(
        resolution=FALLBACK_RESOLUTION,
        support_size=tuple(support_size),
        batch_size=batch_size,
        synthetic_tasks=FALLBACK_TASKS,
        seed=seed,  # the episodes come from the data module's own seeded streams
    )
    progress = _progress_callback(say, every_seconds=10.0)
    # fork_rng: the network is initialized under ``seed``, the caller's random state is kept.
    with (
        torch.random.fork_rng(devices=[]),
        tempfile.TemporaryDirectory(prefix="megaseg_demo_") as root,
        _quiet_lightning(),
    ):
        torch.manual_seed(seed)
        module = InContextSegModule(
            FALLBACK_MODEL,
            dict(FALLBACK_KWARGS),
            optimizer=partial(torch.optim.Adam, lr=lr),
            lr_scheduler=partial(WarmupCosine, warmup_steps=20, total_steps=None),
            loss=loss,
            resolution=FALLBACK_RESOLUTION,
            support_size=list(support_size),
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_time={"seconds": float(seconds)},
            max_steps=max_steps,
            gradient_clip_val=1.0,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[progress],
            default_root_dir=root,
        )
        start = time.perf_counter()
        with idle_threads():
            trainer.fit(module, datamodule=data)
        elapsed = time.perf_counter() - start
    steps = trainer.global_step
    card = build_card(module, trainer, weights="raw")
    card["description"] = (
        f"megaseg demo fallback: {FALLBACK_MODEL} {FALLBACK_KWARGS} trained on synthetic tasks "
        f"only, {steps} steps in {elapsed:.0f} s on a CPU; a demonstration, not a usable model"
    )
    if out_path is not None:
        save_checkpoint(out_path, module.net, card)
    say(f"  trained {steps} steps in {elapsed:.0f} s (final loss {progress.last_loss:.3f})")
    return module.net.eval(), card, steps, elapsed


def _progress_callback(log: Callable[[str], None], every_seconds: float):
    """A Lightning callback that reports the training loss every ``every_seconds``; its
    ``last_loss`` is the loss of the last step. (Built here: Lightning is imported lazily.)"""
    import pytorch_lightning as pl

    class Progress(pl.Callback):
        def __init__(self):
            self.last_loss = float("nan")
            self._start = self._next = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if self._start is None:
                self._start, self._next = now, now + every_seconds
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.last_loss = float(loss)
            if now >= self._next:
                self._next = now + every_seconds
                log(
                    f"  {now - self._start:4.0f} s  step {trainer.global_step:4d}  "
                    f"soft Dice loss {self.last_loss:.3f}"
                )

    return Progress()


@contextmanager
def _quiet_lightning():
    """Silence Lightning's start-up banner and its advice on data loaders for the demo."""
    loggers = [
        logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="pytorch_lightning")
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


__all__ = ["DEFAULT_SECONDS", "FALLBACK_KWARGS", "FALLBACK_MODEL", "FALLBACK_RESOLUTION",
           "train_synthetic_model"]  # fmt: skip
