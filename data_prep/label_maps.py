"""The real label-map sets that synthetic tasks v2 draw label-to-image tasks from, by name.

``"mni152"`` is nilearn's MNI152 template (:func:`megaseg.data.synthetic.v2.mni152_label_maps`);
``"mni152+spm12"`` adds SPM12's tissue maps and Neuromorphometrics labels, a package-shipped
dataset of data_prep (:func:`data_prep.specs.packaged.packaged_label_maps`). The generators
(:mod:`megaseg.data.synthetic`) take the maps as a tensor and never import data_prep: this
module builds a named set and feeds it in (:func:`make_tasks`), for training, evaluation and
``prep synth``.
"""

from __future__ import annotations

import os
from pathlib import Path

from megaseg.data.synthetic import versions
from megaseg.data.synthetic.versions import label_maps_name
from megaseg.paths import atomic_write

LABEL_MAPS_DIR = "MEGASEG_LABEL_MAPS"  # environment variable: a folder of saved label maps


def label_maps(name: str, size: int):
    """The label maps ``(M, size, size)`` named ``name``: ``"mni152"`` (nilearn's template, 66
    maps) or ``"mni152+spm12"`` (also SPM12's tissue maps and Neuromorphometrics labels from the
    ``spm-runtime`` wheel, fetched on first use: :func:`data_prep.specs.packaged.packaged_label_maps`);
    ``True`` names ``"mni152"``.

    With ``$MEGASEG_LABEL_MAPS`` set to a folder, the maps are read from
    ``<folder>/<name>_<size>.npy`` when that file exists, and written there when it does not:
    a machine without nilearn, the spm-runtime wheel or internet (an offline GPU node) trains
    on maps saved elsewhere. Unset (the default), they are always built from their sources.
    """
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
        atomic_write(path, lambda tmp: np.save(tmp, maps.numpy()), suffix=".npy")
    return maps


def _build_label_maps(name: str, size: int):
    import torch

    from data_prep.specs import packaged
    from megaseg.data.synthetic import v2

    maps = v2.mni152_label_maps(size)
    if name == "mni152+spm12":
        maps = torch.cat([maps, packaged.packaged_label_maps(size)])
    return maps


def make_tasks(
    version: int, num_tasks: int, seed_offset: int, config, real_maps: bool | str | None = True
):
    """:func:`megaseg.data.synthetic.versions.make_tasks` with v2's label maps named:
    ``real_maps`` True or ``"mni152"`` (cached per process, ~1 MB at 128 px: read once and
    inherited by forked workers), ``"mni152+spm12"`` (:func:`label_maps`), False or None: none.
    v1 takes no label maps (``real_maps`` is ignored)."""
    if versions.check_version(version) == 1:
        return versions.make_tasks(1, num_tasks, seed_offset, config)
    name = label_maps_name(real_maps)
    maps = None if name is None else label_maps(name, config.size)
    return versions.make_tasks(version, num_tasks, seed_offset, config, label_maps=maps)
