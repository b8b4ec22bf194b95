"""Synthetic in-context tasks, generated on the fly in torch: one module per generator version.

    base.py      what every version shares: hashed seeds, smooth fields, blur, the task range
                 (:class:`TaskRange`) and the held-out seed range (:data:`HELDOUT_SEED_OFFSET`)
    v1.py        generator v1: space-filling random "anatomies" (SyntheticConfig, SyntheticTasks)
    v2.py        generator v2: objects on backgrounds, per-subject geometry, real label maps
                 (SyntheticV2Config, SyntheticTasksV2)
    versions.py  the version switch: a version's config class, a config from values, its tasks

The names below are imported on first use, so importing the package (or the version switch)
costs no torch. v2's real label maps are given to it as a tensor; ``data_prep.label_maps``
builds the named sets.

Until issue #25 this name was generator v1's module: its other names (``GENERATOR_VERSION``,
``preview_png``, the private helpers) still resolve to :mod:`.v1` for one release, with a
:class:`DeprecationWarning`.
"""

from __future__ import annotations

import importlib

from megaseg.deprecation import moved

_EXPORTS = {
    "HELDOUT_SEED_OFFSET": "base",
    "TaskRange": "base",
    "SyntheticConfig": "v1",
    "SyntheticTasks": "v1",
    "SyntheticV2Config": "v2",
    "SyntheticTasksV2": "v2",
    "SYNTHETIC_VERSIONS": "versions",
    "LABEL_MAPS": "versions",
    "check_version": "versions",
    "config_class": "versions",
    "config_fields": "versions",
    "label_maps_name": "versions",
    "make_config": "versions",
    "make_tasks": "versions",
}
_MODULES = ("base", "v1", "v2", "versions")

__all__ = sorted(_EXPORTS)

_old_v1_names = moved(
    __name__,
    {
        "_hash_seed": "megaseg.data.synthetic.base:hash_seed",
        "_uniform": "megaseg.data.synthetic.base:uniform",
        "_interp_matrix": "megaseg.data.synthetic.base:interp_matrix",
        "_smooth_field": "megaseg.data.synthetic.base:smooth_field",
        "_blur_matrix": "megaseg.data.synthetic.base:blur_matrix",
        "_gaussian_blur": "megaseg.data.synthetic.base:gaussian_blur",
        "_anatomy": "megaseg.data.synthetic.v1:task_anatomy",
    },
    rest="megaseg.data.synthetic.v1",
)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    return _old_v1_names(name, 1)


def __dir__() -> list[str]:
    return sorted([*__all__, *_MODULES])
