"""Moved: the version switch is :mod:`megaseg.data.synthetic.versions`, and the named label-map
sets of v2 are built by :mod:`data_prep.label_maps` (issue #25). These names are served here for
one release, with a DeprecationWarning; ``make_tasks`` keeps its old calling convention (label
maps by name), as ``data_prep.label_maps.make_tasks`` does."""

from megaseg.deprecation import moved

__getattr__ = moved(
    __name__,
    {
        "LABEL_MAPS_DIR": "data_prep.label_maps:LABEL_MAPS_DIR",
        "label_maps": "data_prep.label_maps:label_maps",
        "make_tasks": "data_prep.label_maps:make_tasks",
    },
    rest="megaseg.data.synthetic.versions",
)
