"""LightningModule: trains an in-context segmentation network on batches of episodes.

The network itself knows nothing of training. It is built by the model registry from
``model_name`` and ``model_kwargs`` (so an exported card always names a model that
``megaseg.create_model`` can rebuild); the optimizer and learning-rate schedule are callables that
LightningCLI configures with ``class_path`` / ``init_args``.

Batches are the dicts of :meth:`megaseg.data.tasks.EpisodeSampler.batch`: ``query``,
``query_label`` ``(B,1,H,W)``; ``support_images``, ``support_labels`` ``(B,S,1,H,W)``; for
evaluation also ``other_support_*`` (another task's support, for the support-swap gap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from monai.losses import DiceLoss
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from megaseg.metrics import batch_dice
from megaseg.models import create_model

# A WarmupCosine over trainer.max_time re-estimates its total steps every this many steps,
# once this fraction of the time has passed (earlier, start-up costs distort the rate).
TIME_BUDGET_EVERY = 20
TIME_BUDGET_FROM = 0.1


class WarmupCosine(LambdaLR):
    """Linear warm-up from ``start_factor * lr`` to ``lr`` over ``warmup_steps``, then cosine
    decay to ``min_factor * lr`` at ``total_steps``. Step it every optimizer step.

    ``total_steps=None``: the trainer's number of optimizer steps (``trainer.max_steps``),
    filled in by :class:`InContextSegModule` when training starts, so that
    ``--trainer.max_steps 100`` shortens the whole schedule. A run with no step limit but a
    time limit (``trainer.max_time``, e.g. a GPU lease) decays over its time instead: from a
    tenth of the time on, the module sets the total to the steps the measured rate reaches by
    the deadline (:data:`TIME_BUDGET_EVERY`). With neither limit: constant after warm-up.
    Warm-up is capped to ``max_warmup_fraction`` of the total, so a short run leaves it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 1000,
        total_steps: int | None = None,
        start_factor: float = 0.01,
        min_factor: float = 0.0,
        max_warmup_fraction: float = 0.2,
        last_epoch: int = -1,
    ):
        if not 0.0 <= max_warmup_fraction <= 1.0:
            raise ValueError(f"max_warmup_fraction must be in [0, 1], got {max_warmup_fraction}")
        self.warmup_steps, self.total_steps = warmup_steps, None
        self.start_factor, self.min_factor = start_factor, min_factor
        self.max_warmup_fraction = max_warmup_fraction
        super().__init__(optimizer, self.factor, last_epoch)
        if total_steps is not None:
            self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        """Decay to ``min_factor`` at ``total_steps``; warm-up capped to its fraction of it;
        the optimizer's learning rates follow at once."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = min(self.warmup_steps, int(self.max_warmup_fraction * self.total_steps))
        factor = self.factor(max(0, self.last_epoch))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1 - self.start_factor) * step / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    def describe(self) -> str:
        if self.total_steps is None:
            return f"WarmupCosine: {self.warmup_steps} warm-up steps, then constant"
        return (
            f"WarmupCosine: {self.warmup_steps} warm-up steps, cosine decay to "
            f"{self.min_factor:g} x lr at step {self.total_steps}"
        )


def episode_metrics(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Hard Dice per episode and whether each prediction is empty.

    ``logits, target (B,1,H,W)`` (target soft, binarized at 0.5) -> ``dice (B,)``
    (:func:`megaseg.metrics.batch_dice`: 1 when both masks are empty), ``empty (B,)`` bool.
    """
    pred = logits.float() > 0  # sigmoid(logits) > 0.5
    return batch_dice(pred, target > 0.5), pred.flatten(1).sum(1) == 0


def freeze_unused_parameters(net: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on parameters no output depends on; returns their names.

    In UniverSeg v1 the last decoder block's support branch computes features nothing reads.
    Without a gradient they would make DDP wait for a reduction that never comes (or need
    ``find_unused_parameters``); they stay in the state dict. Found with one tiny forward.
    """
    size = 2 ** (getattr(net, "depth", 4) - 1)
    g = torch.Generator().manual_seed(0)  # leaves the global random state alone
    x = torch.rand(1, 1, size, size, generator=g)
    s = torch.rand(2, 1, 1, 1, size, size, generator=g)
    net.zero_grad(set_to_none=True)
    net(x, s[0], s[1]).sum().backward()
    unused = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in net.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


def _time_limit(trainer: pl.Trainer):
    """The trainer's ``Timer`` callback when it has a duration (``trainer.max_time``), else None."""
    from pytorch_lightning.callbacks import Timer

    for cb in trainer.callbacks:
        if isinstance(cb, Timer) and cb.time_remaining() is not None:
            return cb
    return None


class InContextSegModule(pl.LightningModule):
    """Episodic training of an in-context segmentation network.

    Args:
        model_name: registered model (``megaseg.list_models()``), e.g. "universeg_v1".
        model_kwargs: keyword arguments of the model builder (e.g. ``encoder_widths``, ``fast``).
        optimizer: ``params -> Optimizer`` (default Adam, lr 1e-4); any torch or timm optimizer
            class via ``class_path`` / ``init_args``.
        lr_scheduler: ``optimizer -> LRScheduler``, stepped every optimizer step (default: none;
            the configs use :class:`WarmupCosine`).
        loss: ``(logits (B,1,H,W), target (B,1,H,W)) -> scalar``; default MONAI soft Dice,
            ``DiceLoss(sigmoid=True)``; ``monai.losses.DiceCELoss`` adds cross-entropy.
        ema_decay: keep an EMA of the weights (timm ``ModelEmaV3``) with this decay; it is
            used for validation and exported (None: no EMA).
        compile: ``torch.compile`` the network in place (state-dict names unchanged).
        init_weights: start from these weights (safetensors + card, or a tensors-only file).
        resolution, support_size: what the data serves (linked from the data module by the
            CLI); recorded in the exported card.
    """

    def __init__(
        self,
        model_name: str = "universeg_v1",
        model_kwargs: dict | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        loss: nn.Module | None = None,
        ema_decay: float | None = None,
        compile: bool = False,
        init_weights: str | None = None,
        resolution: int = 128,
        support_size: int | Sequence[int] = 64,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["loss"])
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        self.net = create_model(model_name, **self.model_kwargs)
        if init_weights:
            self._load_init_weights(init_weights)
        self.frozen = freeze_unused_parameters(self.net)
        self.optimizer_fn, self.lr_scheduler_fn = optimizer, lr_scheduler
        self.loss_fn = loss if loss is not None else DiceLoss(sigmoid=True)
        self.ema = None
        if ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.net, decay=ema_decay)
        self.compile_net = compile
        self._time_budget: tuple = (None, None)  # (WarmupCosine, Timer) of a max_time run
        self.resolution, self.support_size = resolution, support_size
        self.init_weights = init_weights

    def _load_init_weights(self, path: str) -> None:
        # The card's model name first (a clearer error than mismatched shapes), then the
        # checks of any checkpoint: safe read, shapes, finite values (CheckpointError, a
        # ValueError).
        from megaseg.checkpoint import load_checkpoint, read_card

        spec = (read_card(path) or {}).get("model", {})
        if spec and spec.get("name") != self.model_name:
            raise ValueError(
                f"{path}: weights of model {spec.get('name')!r}, not {self.model_name!r}"
            )
        load_checkpoint(path, self.net)

    def configure_model(self) -> None:
        if self.compile_net and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    @property
    def eval_net(self) -> nn.Module:
        """The network evaluated and exported: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.net

    def forward(self, query: Tensor, support_images: Tensor, support_labels: Tensor) -> Tensor:
        """``query (B,1,H,W)``, ``support_* (B,S,1,H,W)`` -> logits ``(B,1,H,W)``."""
        return self.net(query, support_images, support_labels)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self.net(batch["query"], batch["support_images"], batch["support_labels"])
        loss = self.loss_fn(logits.float(), batch["query_label"])
        B = batch["query"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/support_size", float(batch["support_images"].shape[1]), batch_size=B)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.net, step=self.global_step)
        self._follow_time_budget()

    def _follow_time_budget(self) -> None:
        """A :class:`WarmupCosine` of a run limited by ``trainer.max_time`` alone: set its total
        to the steps the rate so far reaches by the deadline (the time is the trainer's
        ``Timer``, which a resumed run restores)."""
        scheduler, timer = self._time_budget
        step = self.global_step
        if scheduler is None or step == 0 or step % TIME_BUDGET_EVERY:
            return
        elapsed = timer.time_elapsed("train")
        duration = elapsed + timer.time_remaining("train")
        fraction = elapsed / duration if duration > 0 else 1.0
        if fraction >= TIME_BUDGET_FROM:
            scheduler.set_total_steps(max(step + 1, round(step / min(fraction, 1.0))))

    def _evaluate(self, batch: dict, stage: str, dataloader_idx: int) -> dict:
        name = self._eval_name(stage, dataloader_idx)
        net = self.eval_net
        logits = net(batch["query"], batch["support_images"], batch["support_labels"])
        target = batch["query_label"]
        dice, empty = episode_metrics(logits, target)
        has_fg = (target > 0.5).flatten(1).any(1)
        B = target.shape[0]
        log = {
            f"{stage}/{name}/loss": self.loss_fn(logits.float(), target),
            f"{stage}/{name}/dice": dice.mean(),
        }
        if has_fg.any():
            log[f"{stage}/{name}/empty_pred"] = empty[has_fg].float().mean()
        if "other_support_images" in batch:
            swapped = net(
                batch["query"], batch["other_support_images"], batch["other_support_labels"]
            )
            dice_swapped, _ = episode_metrics(swapped, target)
            log[f"{stage}/{name}/dice_swapped"] = dice_swapped.mean()
            log[f"{stage}/{name}/swap_gap"] = (dice - dice_swapped).mean()
        self.log_dict(log, batch_size=B, add_dataloader_idx=False, sync_dist=True)
        return {"logits": logits, "dice": dice}

    def _eval_name(self, stage: str, dataloader_idx: int) -> str:
        """The data module's name of evaluation set ``dataloader_idx`` (its index otherwise)."""
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "eval_names", {}).get(stage, [])
        return names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._evaluate(batch, "val", dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._evaluate(batch, "test", dataloader_idx)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Probabilities for an episode batch (``megaseg predict``): ``{"probs" (B,1,H,W),
        "set"}``, plus the hard ``"dice"`` per episode when the batch holds the query labels."""
        logits = self.eval_net(batch["query"], batch["support_images"], batch["support_labels"])
        out = {
            "probs": torch.sigmoid(logits.float()),
            "set": self._eval_name("predict", dataloader_idx),
        }
        if "query_label" in batch:
            out["dice"] = episode_metrics(logits, batch["query_label"])[0]
        return out

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = (
            self.optimizer_fn(params) if self.optimizer_fn else torch.optim.Adam(params, lr=1e-4)
        )
        if self.lr_scheduler_fn is None:
            return optimizer
        scheduler = self.lr_scheduler_fn(optimizer)
        if isinstance(scheduler, WarmupCosine):
            trainer = self._trainer  # None when called outside a Trainer
            if scheduler.total_steps is None and trainer is not None:
                total = trainer.estimated_stepping_batches
                if math.isfinite(total) and total > 0:
                    scheduler.set_total_steps(int(total))
                else:
                    timer = _time_limit(trainer)
                    if timer is not None:
                        self._time_budget = (scheduler, timer)
            rank_zero_info(
                f"megaseg: learning-rate schedule {scheduler.describe()}"
                + (" until the cosine over trainer.max_time starts" if self._time_budget[0] else "")
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
