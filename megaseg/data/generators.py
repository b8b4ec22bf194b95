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


LABEL_MAPS_DIR = "MEGASEG_LABEL_MAPS"  # environment variable: a folder of saved label maps


def label_maps(name: str, size: int):
    """The label maps ``(M, size, size)`` named ``name``: ``"mni152"`` (nilearn's template, 66
    maps) or ``"mni152+spm12"`` (also SPM12's tissue maps and Neuromorphometrics labels from the
    ``spm-runtime`` wheel, fetched on first use: :func:`data_prep.specs.packaged.packaged_label_maps`).

    With ``$MEGASEG_LABEL_MAPS`` set to a folder, the maps are read from
    ``<folder>/<name>_<size>.npy`` when that file exists, and written there when it does not:
    a machine without nilearn, the spm-runtime wheel or internet (an offline GPU node) trains
    on maps saved elsewhere. Unset (the default), they are always built from their sources.
    """
    import os
    from pathlib import Path

    import numpy as np
    import torch

    name = label_maps_name(name)
    folder = os.environ.get(LABEL_MAPS_DIR)
    path = Path(folder) / f"{name}_{size}.npy" if folder else None
    if path is not None:
        for p, what in ((Path(folder), "a folder"), (path, "a .npy file")):
            if p.exists() and not (p.is_dir() if what == "a folder" else p.is_file()):
                raise ValueError(
                    f"{p} (${LABEL_MAPS_DIR}): exists but is not {what}; move it away or point "
                    f"${LABEL_MAPS_DIR} elsewhere"
                )
    if path is not None and path.is_file():
        try:  # mapped: a header declaring more than the file holds fails here, allocating nothing
            maps = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(
                f"{path} (${LABEL_MAPS_DIR}): not a readable .npy file ({e}); delete it to "
                "rebuild it"
            ) from e
        if maps.dtype != np.uint8 or maps.ndim != 3 or maps.shape[1:] != (size, size):
            raise ValueError(
                f"{path} (${LABEL_MAPS_DIR}): expected uint8 label maps of shape (M, {size}, "
                f"{size}), got {maps.dtype} {maps.shape}; delete it to rebuild it"
            )
        return torch.from_numpy(np.array(maps))
    maps = _build_label_maps(name, size)
    if path is not None:
        from megaseg.paths import atomic_write

        atomic_write(path, lambda tmp: np.save(tmp, maps.numpy()), suffix=".npy")
    return maps


def _build_label_maps(name: str, size: int):
    import torch

    from megaseg.data.synthetic_v2 import mni152_label_maps

    maps = mni152_label_maps(size)
    if name == "mni152+spm12":
        from data_prep.specs.packaged import packaged_label_maps

        maps = torch.cat([maps, packaged_label_maps(size)])
    return maps


def make_tasks(
    version: int, num_tasks: int, seed_offset: int, config, real_maps: bool | str = True
):
    """Tasks ``[seed_offset, seed_offset + num_tasks)`` of generator ``version`` with ``config``;
    v2 gets real label maps for its label-to-image tasks: ``real_maps`` True or ``"mni152"``
    (cached per process, ~1 MB at 128 px: read once and inherited by forked workers),
    ``"mni152+spm12"`` (:func:`label_maps`), False: none."""
    if check_version(version) == 1:
        from megaseg.data.synthetic import SyntheticTasks

        return SyntheticTasks(num_tasks, seed_offset, config)
    from megaseg.data.synthetic_v2 import SyntheticTasksV2

    name = label_maps_name(real_maps)
    maps = None if name is None else label_maps(name, config.size)
    return SyntheticTasksV2(num_tasks, seed_offset, config, label_maps=maps)
