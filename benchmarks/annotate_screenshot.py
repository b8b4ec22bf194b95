"""Render the README's screenshot of the napari plugin from a real viewer.

The MNI152 template (nilearn) at 2 mm, axial slices on the slider; three slices painted with
grey (1) and white (2) matter; the megaseg dock widget segments the rest and jumps to the
slice it suggests labelling next. Needs a display with OpenGL; headless:

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/annotate_screenshot.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/results/annotate_napari.png"))
    p.add_argument("--step", type=int, default=2, help="keep every STEP-th voxel")
    args = p.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from megaseg.examples import mni152_volume

    t1, labels, _ = mni152_volume()
    s = args.step
    # (X, Y, Z) -> (Z, Y, X) with Y flipped: axial slices on napari's slider, anterior up.
    t1 = np.ascontiguousarray(t1[::s, ::s, ::s].transpose(2, 1, 0)[:, ::-1])
    labels = np.ascontiguousarray(labels[::s, ::s, ::s].transpose(2, 1, 0)[:, ::-1])
    viewer = napari.Viewer(title="megaseg: annotate a volume from a few slices", show=True)
    viewer.window.resize(1500, 900)
    viewer.add_image(t1, name="MNI152 T1")
    painted = np.zeros(labels.shape, np.int32)
    for i in np.linspace(0, labels.shape[0] - 1, 5)[1:-1].round().astype(int):
        painted[i] = labels[i]
    viewer.add_labels(painted, name="painted slices")
    _, widget = viewer.window.add_plugin_dock_widget("megaseg", "Annotate volume (megaseg)")
    worker = widget.run()
    done = []
    worker.finished.connect(lambda: done.append(True))
    start = time.perf_counter()
    while not done and time.perf_counter() - start < 600:
        QApplication.processEvents()
        time.sleep(0.02)
    for _ in range(20):  # let the canvas draw the new layers
        QApplication.processEvents()
        time.sleep(0.02)
    print(widget._status.value)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"wrote {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
