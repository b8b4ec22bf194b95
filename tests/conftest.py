"""Shared fixtures. Tests run on tiny synthetic inputs on the CPU."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    # CI machines have 2 cores; one thread per test process keeps timings predictable.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
