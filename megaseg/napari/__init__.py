"""napari plugin: annotate a volume from a few painted slices (``pip install 'megaseg[napari]'``).

The npe2 manifest ``napari.yaml`` beside this file registers the dock widget
:class:`~megaseg.napari._widget.AnnotateWidget` (menu *Plugins > Annotate volume (megaseg)*).
"""

from __future__ import annotations


def __getattr__(name: str):
    # Imported on use: napari (and Qt) load only when the widget is asked for.
    if name == "AnnotateWidget":
        from megaseg.napari._widget import AnnotateWidget

        return AnnotateWidget
    raise AttributeError(f"module 'megaseg.napari' has no attribute {name!r}")


__all__ = ["AnnotateWidget"]
