"""The synthetic task generators by version: one place that maps a version to its config class
and builds its task set, for training (``megaseg.training.datamodule``) and held-out evaluation
(``megaseg.evaluation.sources``). Torch is imported only when a generator is built."""

from __future__ import annotations

import dataclasses
from typing import Any

SYNTHETIC_VERSIONS = (1, 2)  # 1: megaseg.data.synthetic, 2: megaseg.data.synthetic_v2


def check_version(version: Any, what: str = "synthetic generator version") -> int:
    """``version`` if megaseg has that generator, else a ValueError naming ``what``."""
    if version not in SYNTHETIC_VERSIONS:
        raise ValueError(f"{what} must be one of {SYNTHETIC_VERSIONS}, got {version!r}")
    return version


def config_class(version: int) -> type:
    """``SyntheticConfig`` (v1) or ``SyntheticV2Config`` (v2)."""
    if check_version(version) == 1:
        from megaseg.data.synthetic import SyntheticConfig

        return SyntheticConfig
    from megaseg.data.synthetic_v2 import SyntheticV2Config

    return SyntheticV2Config


def config_fields(version: int) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class(version))}


def make_config(version: int, values: dict | None = None, **fixed):
    """The config of ``version`` from ``values`` (lists, as YAML and JSON give them, become
    tuples) and ``fixed`` on top; a field the config does not have is a ValueError naming it."""
    cls = config_class(version)
    values = {**(values or {}), **fixed}
    unknown = sorted(set(values) - config_fields(version))
    if unknown:
        raise ValueError(f"synthetic_config: {unknown} are not fields of {cls.__name__}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def make_tasks(version: int, num_tasks: int, seed_offset: int, config, real_maps: bool = True):
    """Tasks ``[seed_offset, seed_offset + num_tasks)`` of generator ``version`` with ``config``;
    v2 gets the MNI152 label maps for its label-to-image tasks unless ``real_maps`` is False
    (cached per process, ~1 MB at 128 px: read once and inherited by forked workers)."""
    if check_version(version) == 1:
        from megaseg.data.synthetic import SyntheticTasks

        return SyntheticTasks(num_tasks, seed_offset, config)
    from megaseg.data.synthetic_v2 import SyntheticTasksV2, mni152_label_maps

    maps = mni152_label_maps(config.size) if real_maps else None
    return SyntheticTasksV2(num_tasks, seed_offset, config, label_maps=maps)
