"""Helpers for the tests that train a network and check that it learned.

Such a test must pass on any CPU: a different float32 summation order (AVX2 vs AVX-512
kernels, 1 vs 2 threads, the fast vs the published forward path) changes the last bits of the
first step, and training amplifies that into a different run. ``perturb_`` makes exactly that
kind of difference on purpose, so a test (and ``benchmarks/learning_margins.py``) can see how
far its bound lies from the spread of such runs.
"""

from __future__ import annotations

import torch


def perturb_(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Add N(0, (scale * std)^2) to every parameter tensor in place, std of that tensor (its
    largest magnitude, at least 1e-3, where it is constant, e.g. a zero bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().flatten()
            ref = flat.std() if flat.numel() > 1 and flat.std() > 0 else flat.abs().max()
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * ref.clamp_min(1e-3))
