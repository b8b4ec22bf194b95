"""The synthetic task generators by version: one place that maps a version to its config class
and builds its task set, for training (``megaseg.training.datamodule``), held-out evaluation
(``megaseg.evaluation.sources``) and stored corpora (``data_prep.synth``). Torch is imported
only when a generator is built.

v2's real label maps are given to :func:`make_tasks` as a tensor: this package names the sets
(:data:`LABEL_MAPS`) but does not build them, since one of them comes from a package-shipped
dataset of data_prep (``data_prep.label_maps`` builds a named set)."""

from __future__ import annotations

import dataclasses
from typing import Any

SYNTHETIC_VERSIONS = (1, 2)  # 1: megaseg.data.synthetic.v1, 2: megaseg.data.synthetic.v2
# What a stored corpus records as its generator's source (dataset spec ``source``). Kept as
# they were before the generators became one package: the spec enters the build key, so a
# rerun of ``prep synth`` resumes a store written before.
SOURCES = {1: "megaseg.data.synthetic", 2: "megaseg.data.synthetic_v2"}


def check_version(version: Any, what: str = "synthetic generator version") -> int:
    """``version`` if megaseg has that generator, else a ValueError naming ``what``."""
    if version not in SYNTHETIC_VERSIONS:
        raise ValueError(f"{what} must be one of {SYNTHETIC_VERSIONS}, got {version!r}")
    return version


def config_class(version: int) -> type:
    """``SyntheticConfig`` (v1) or ``SyntheticV2Config`` (v2)."""
    if check_version(version) == 1:
        from megaseg.data.synthetic.v1 import SyntheticConfig

        return SyntheticConfig
    from megaseg.data.synthetic.v2 import SyntheticV2Config

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


LABEL_MAPS = ("mni152", "mni152+spm12")  # names of the real label-map sets v2 can be given


def label_maps_name(real_maps: bool | str | None) -> str | None:
    """The name of a label-map set (:data:`LABEL_MAPS`) from a ``real_maps`` setting: True is
    ``"mni152"``, False or None is no maps (recorded as None)."""
    if real_maps is True:
        return "mni152"
    if real_maps is False or real_maps is None:
        return None
    if real_maps not in LABEL_MAPS:
        raise ValueError(
            f"real label maps must be true, false or one of {LABEL_MAPS}, got {real_maps!r}"
        )
    return real_maps


def make_tasks(version: int, num_tasks: int, seed_offset: int, config, label_maps=None):
    """Tasks ``[seed_offset, seed_offset + num_tasks)`` of generator ``version`` with ``config``.

    ``label_maps``: v2's real label maps ``(M, size, size)`` for its label-to-image tasks (e.g.
    ``data_prep.label_maps.label_maps(name, config.size)``), or None: none. v1 takes none."""
    if check_version(version) == 1:
        if label_maps is not None:
            raise ValueError("synthetic generator v1 takes no label maps (v2 does)")
        from megaseg.data.synthetic.v1 import SyntheticTasks

        return SyntheticTasks(num_tasks, seed_offset, config)
    from megaseg.data.synthetic.v2 import SyntheticTasksV2

    return SyntheticTasksV2(num_tasks, seed_offset, config, label_maps=label_maps)
