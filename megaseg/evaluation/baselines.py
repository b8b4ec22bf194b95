"""Methods the evaluation compares, all with one interface::

    method.predict(query (B,1,R,R), support_images (S,1,R,R), support_labels (S,1,R,R), *, seed=0)
        -> probabilities (B,1,R,R) float32 on the CPU

- :class:`ModelMethod` ("megaseg"): an in-context network (a checkpoint, a model, a Segmenter);
- :class:`MeanLabel` ("mean_label"): the mean support label, thresholded at 0.5, whatever the
  query: what "no learning at all" scores;
- :class:`SupervisedUNet` ("supervised"): a small MONAI ``BasicUNet`` trained from scratch on
  the N support examples only (Dice + BCE, Adam, random flips), per support set;
- :func:`random_init` ("random_init"): the same network as the checkpoint with random weights,
  a sanity floor for the in-context model.

``seed`` makes methods that draw random numbers (the supervised baseline) deterministic; the
protocol passes each draw's seed. Methods hold no state between calls except timings.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from megaseg.inference import Segmenter


class Method(Protocol):
    """Anything with a ``name`` and :meth:`predict` (see the module docstring)."""

    name: str

    def predict(
        self, query: Tensor, support_images: Tensor, support_labels: Tensor, *, seed: int = 0
    ) -> Tensor: ...


def _check(query: Tensor, images: Tensor, labels: Tensor) -> None:
    if query.dim() != 4 or query.shape[1] != 1:
        raise ValueError(f"query must be (B,1,R,R), got {tuple(query.shape)}")
    if images.dim() != 4 or images.shape[1] != 1 or labels.shape != images.shape:
        raise ValueError(
            f"support_images and support_labels must both be (S,1,R,R), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if images.shape[-2:] != query.shape[-2:]:
        raise ValueError(
            f"support size {tuple(images.shape[-2:])} != query size {tuple(query.shape[-2:])}"
        )


class ModelMethod:
    """An in-context network as a method; queries run in chunks that fit the memory budget.

    ``model``: a :class:`~megaseg.inference.Segmenter` (its device and budget are used) or a
    network (wrapped in one at ``resolution`` on ``device``).
    """

    def __init__(
        self,
        model: nn.Module | Segmenter,
        resolution: int | None = None,
        device: str | torch.device | None = None,
        name: str = "megaseg",
    ):
        if isinstance(model, Segmenter):
            self.segmenter = model
        else:
            self.segmenter = Segmenter(model, resolution or 128, device)
        self.name = name

    @property
    def model(self) -> nn.Module:
        return self.segmenter.model

    def predict(
        self, query: Tensor, support_images: Tensor, support_labels: Tensor, *, seed: int = 0
    ) -> Tensor:
        _check(query, support_images, support_labels)
        seg, device = self.segmenter, self.segmenter.device
        images = support_images[None].to(device, torch.float32)  # (1, S, 1, R, R)
        labels = support_labels[None].to(device, torch.float32)
        chunk = seg.batch_size(images.shape[1])
        out = torch.empty(query.shape, dtype=torch.float32)
        with torch.inference_mode():
            term = None
            if getattr(self.model, "fast", False) and hasattr(self.model, "support_term"):
                term = self.model.support_term(images, labels)  # reused by every chunk
            for start in range(0, query.shape[0], chunk):
                q = query[start : start + chunk].to(device, torch.float32)
                kwargs = {} if term is None else {"support_term": term}
                logits = self.model(q, images, labels, **kwargs)
                out[start : start + chunk] = torch.sigmoid(logits.float()).cpu()
        return out


def random_init(
    model: nn.Module | Segmenter,
    seed: int = 0,
    resolution: int | None = None,
    name: str = "random_init",
) -> ModelMethod:
    """The same architecture with fresh random weights (its own init, seeded): a sanity floor.

    ``model`` is copied, never changed. ``resolution`` is needed for a bare network only.
    """
    from megaseg.models.universeg import UniverSeg, init_weights

    seg = model if isinstance(model, Segmenter) else None
    net = copy.deepcopy(seg.model if seg else model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(net, UniverSeg):
            init_weights(net)
        else:
            for m in net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    if seg is not None:
        return ModelMethod(Segmenter(net, seg.resolution, seg.device, max_batch=seg.max_batch,
                                     memory_budget_mb=seg.memory_budget_mb), name=name)  # fmt: skip
    return ModelMethod(net, resolution=resolution, name=name)


class MeanLabel:
    """Predict the pixel-wise mean of the support labels, thresholded at 0.5, for every query."""

    name = "mean_label"

    def predict(
        self, query: Tensor, support_images: Tensor, support_labels: Tensor, *, seed: int = 0
    ) -> Tensor:
        _check(query, support_images, support_labels)
        mean = support_labels.float().mean(dim=0, keepdim=True)  # (1, 1, R, R)
        return (mean > 0.5).float().expand(query.shape[0], -1, -1, -1).cpu().clone()


class SupervisedUNet:
    """A MONAI ``BasicUNet`` trained from scratch on the support set, then applied to the queries.

    Per call: a fresh network (initialized under ``seed``), ``steps`` Adam steps on mini-batches
    of ``min(S, batch_size)`` support examples with random horizontal / vertical flips,
    ``DiceCELoss`` (soft Dice + BCE on the logits). Wall time of each call (training and
    prediction) is kept in :attr:`timings` (and the last one in :attr:`last_seconds`).

    The resolution must be divisible by 16 (four 2x poolings).
    """

    name = "supervised"

    def __init__(
        self,
        steps: int = 300,
        lr: float = 1e-3,
        batch_size: int = 8,
        features: Sequence[int] = (16, 16, 32, 64, 128, 16),
        device: str | torch.device | None = None,
        name: str = "supervised",
    ):
        if steps < 1 or batch_size < 1:
            raise ValueError(f"need steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
        self.steps, self.lr, self.batch_size = steps, lr, batch_size
        self.features = tuple(features)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.name = name
        self.timings: list[float] = []
        self.last_seconds = 0.0

    def _network(self) -> nn.Module:
        from monai.networks.nets import BasicUNet

        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=self.features)

    def fit(self, images: Tensor, labels: Tensor, seed: int = 0) -> nn.Module:
        """Train a fresh network on ``images``, ``labels`` ``(S,1,R,R)``; returns it (eval mode)."""
        from monai.losses import DiceCELoss

        if images.shape[-1] % 16 or images.shape[-2] % 16:
            raise ValueError(
                f"supervised baseline: resolution must be divisible by 16, got {tuple(images.shape[-2:])}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = self._network().to(self.device)
        gen = torch.Generator().manual_seed(seed)
        images = images.to(self.device, torch.float32)
        labels = labels.to(self.device, torch.float32)
        loss_fn = DiceCELoss(sigmoid=True)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        S, b = images.shape[0], min(images.shape[0], self.batch_size)
        net.train()
        for _ in range(self.steps):
            idx = torch.randperm(S, generator=gen)[:b]
            flips = torch.rand(b, 2, generator=gen) < 0.5
            x, y = _flip(images[idx], flips), _flip(labels[idx], flips)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
        return net.eval()

    def predict(
        self, query: Tensor, support_images: Tensor, support_labels: Tensor, *, seed: int = 0
    ) -> Tensor:
        _check(query, support_images, support_labels)
        start = time.perf_counter()
        net = self.fit(support_images, support_labels, seed)
        out = torch.empty(query.shape, dtype=torch.float32)
        with torch.inference_mode():
            for i in range(0, query.shape[0], 32):
                q = query[i : i + 32].to(self.device, torch.float32)
                out[i : i + 32] = torch.sigmoid(net(q).float()).cpu()
        self.last_seconds = time.perf_counter() - start
        self.timings.append(self.last_seconds)
        return out


def _flip(x: Tensor, flips: Tensor) -> Tensor:
    """Flip each ``x[i] (1,H,W)`` along W where ``flips[i, 0]`` and along H where ``flips[i, 1]``."""
    f = flips.to(x.device)
    x = torch.where(f[:, 0, None, None, None], x.flip(-1), x)
    return torch.where(f[:, 1, None, None, None], x.flip(-2), x)


BASELINES = ("mean_label", "supervised", "random_init")

__all__ = ["BASELINES", "MeanLabel", "Method", "ModelMethod", "SupervisedUNet", "random_init"]
