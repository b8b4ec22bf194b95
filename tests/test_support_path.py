"""The support set carries the task: the same images, two tasks, told apart only by the labels.

Every image holds a disc and a square at random places and sizes; a task's label is one of the
two shapes. Nothing in the query says which shape is wanted, so a network that segments well
must read it from the support labels. The disc is also brighter than the square (random
intensities in disjoint ranges) so that a tiny network learns the tasks in a few hundred CPU
steps; with overlapping ranges it stays much longer on "segment both shapes" (Dice ~0.67 for
either support, measured).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaseg.models import UniverSeg

SIZE = 32


def _disc_and_square(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images ``(n,1,SIZE,SIZE)`` with a disc mask and a square mask of the same shape."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images, discs, squares = [], [], []
    while len(images) < n:
        r = int(torch.randint(4, 8, (1,), generator=g))
        half = int(torch.randint(4, 8, (1,), generator=g))
        cy, cx, sy, sx = (int(v) for v in torch.randint(8, SIZE - 8, (4,), generator=g))
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).float()
        square = ((yy - sy).abs() <= half).float() * ((xx - sx).abs() <= half).float()
        if (disc * square).sum() > 0:
            continue  # keep the shapes apart so each label is one whole shape
        a = 0.7 + 0.3 * float(torch.rand(1, generator=g))
        b = 0.3 + 0.25 * float(torch.rand(1, generator=g))
        image = 0.15 * torch.rand(SIZE, SIZE, generator=g) + a * disc + b * square
        images.append(image.clamp(0, 1))
        discs.append(disc)
        squares.append(square)
    stack = lambda xs: torch.stack(xs)[:, None]  # noqa: E731
    return stack(images), stack(discs), stack(squares)


def _episodes(batch: int, support: int, g: torch.Generator):
    """Query, support images/labels and query truth; each episode's task is disc or square."""
    images, discs, squares = _disc_and_square(batch * (support + 1), g)
    shape = lambda x: x.view(batch, support + 1, 1, SIZE, SIZE)  # noqa: E731
    images, discs, squares = shape(images), shape(discs), shape(squares)
    want_disc = (torch.rand(batch, generator=g) < 0.5).view(batch, 1, 1, 1, 1)
    labels = torch.where(want_disc, discs, squares)
    other = torch.where(want_disc, squares, discs)
    return images[:, 0], images[:, 1:], labels[:, 1:], labels[:, 0], other[:, 1:]


def _dice(logits: torch.Tensor, truth: torch.Tensor) -> float:
    pred = (logits.sigmoid() > 0.5).float()
    inter = (pred * truth).sum(dim=(1, 2, 3))
    return (
        (2 * inter / (pred.sum(dim=(1, 2, 3)) + truth.sum(dim=(1, 2, 3))).clamp_min(1))
        .mean()
        .item()
    )


@pytest.mark.slow
def test_support_labels_decide_the_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = UniverSeg(encoder_widths=(16, 16, 16))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):
        q, si, sl, truth, _ = _episodes(8, 4, g)
        logits = model(q, si, sl)
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * truth).sum((1, 2, 3)) + 1) / (
            prob.sum((1, 2, 3)) + truth.sum((1, 2, 3)) + 1
        )
        loss = dice.mean() + F.binary_cross_entropy_with_logits(logits, truth)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.eval()
    with torch.no_grad():
        q, si, sl, truth, other = _episodes(64, 4, torch.Generator().manual_seed(123))
        right = _dice(model(q, si, sl), truth)
        swapped = _dice(model(q, si, other), truth)
    print(f"right {right:.3f} swapped {swapped:.3f}")
    assert right >= 0.7, f"Dice with the right support {right:.3f}"
    assert right - swapped >= 0.3, f"right {right:.3f} vs swapped support {swapped:.3f}"
