"""The timings the README quotes, measured with the default checkpoint.

Rerun it whenever the default checkpoint (or what these paths compute) changes, and copy the
numbers into the README, which names this script and the machine
(``tests/test_readme_timings.py`` fails when the default checkpoint is not the one measured,
or when the README quotes other numbers than ``docs/results/readme_timings.json``):

- ``VolumeSession.segment()`` on a 128x128x200 volume (MNI152 resampled) with 5 labelled
  slices: first call, cached re-call, ``add()`` + ``segment()`` (one torch thread, as in
  ``benchmarks/annotate_loop.py``, whose ``time_large`` it reuses);
- each notebook of ``notebooks/`` executed top to bottom (nbclient, a fresh kernel, outputs
  in a temporary folder), wall time, with the torch threads the kernel picks by itself.

    python benchmarks/readme_timings.py                      # docs/results/readme_timings.md
    python benchmarks/readme_timings.py --no-notebooks --out /tmp/t   # the session only

The machine may be shared with other jobs: the load average before and after is printed with
the table, so a reader can judge the numbers, and each figure is given twice: wall seconds, and
the CPU seconds the work took (the session's, measured with one thread, again with
``time.process_time``; a notebook's kernel's, from the resource usage of the reaped kernel
process), which other jobs on the machine change much less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from annotate_loop import time_large  # noqa: E402
from machine import cpu_name, emit  # noqa: E402

from megaseg import Segmenter  # noqa: E402
from megaseg.models.registry import DEFAULT_SHIPPED  # noqa: E402
from megaseg.paths import sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("few_shot_inference.ipynb", "evaluate.ipynb", "annotate.ipynb")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def cpu_clock():
    """Inside: ``time.perf_counter`` reads this process's CPU time, so timings taken by the
    code under test (``SessionResult.seconds``, ``time_large``) come out in CPU seconds."""
    wall = time.perf_counter
    time.perf_counter = time.process_time
    try:
        yield
    finally:
        time.perf_counter = wall


def time_notebook(path: Path) -> tuple[float, float]:
    """(wall, kernel CPU) seconds to execute ``path`` top to bottom in a fresh kernel; its
    outputs go to a temporary folder (``MEGASEG_NOTEBOOK_OUT`` / ``MEGASEG_WORK``), never
    beside it. The kernel's CPU time is counted once the client has reaped it."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="megaseg_nb_") as tmp:
        saved = {k: os.environ.get(k) for k in ("MEGASEG_NOTEBOOK_OUT", "MEGASEG_WORK")}
        os.environ["MEGASEG_NOTEBOOK_OUT"] = str(Path(tmp) / "out")
        os.environ["MEGASEG_WORK"] = str(Path(tmp) / "work")
        try:
            client = nbclient.NotebookClient(
                nb, timeout=1200, kernel_name="python3",
                resources={"metadata": {"path": str(path.parent)}},
            )  # fmt: skip
            start, cpu = time.perf_counter(), _children_cpu()
            client.execute()  # starts, runs and shuts down (reaps) the kernel
            return time.perf_counter() - start, _children_cpu() - cpu
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_SHIPPED,
                   help="weights of the VolumeSession timing (the notebooks use their default)")  # fmt: skip
    p.add_argument("--no-notebooks", action="store_true", help="skip the notebook timings")
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/readme_timings",
                   help="writes OUT.md and OUT.json")  # fmt: skip
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seg = Segmenter.from_checkpoint(args.checkpoint, device="cpu")
    session = time_large(seg, {})
    with cpu_clock():
        session_cpu = time_large(seg, {})
    torch.set_num_threads(threads)
    notebooks, notebooks_cpu = {}, {}
    if not args.no_notebooks:
        for name in NOTEBOOKS:
            notebooks[name], notebooks_cpu[name] = time_notebook(ROOT / "notebooks" / name)
            print(f"{name}: {notebooks[name]:.0f} s ({notebooks_cpu[name]:.0f} CPU s)", flush=True)
    load_after = os.getloadavg()

    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    lines = [
        f"Measured by `benchmarks/readme_timings.py` on {machine}.",
        "",
        "| what | wall s | CPU s |",
        "|---|---:|---:|",
        f"| `VolumeSession` ({args.checkpoint}, {seg.resolution} px), 128x128x200 volume, "
        f"5 labelled slices, 1 thread: first `segment()` | {session['first_s']:.1f} | "
        f"{session_cpu['first_s']:.1f} |",
        f"| the same, repeat call (cached) | {session['cached_s']:.2f} | "
        f"{session_cpu['cached_s']:.2f} |",
        f"| the same, `add()` + `segment()` | {session['after_add_s']:.1f} | "
        f"{session_cpu['after_add_s']:.1f} |",
    ]
    lines += [
        f"| `notebooks/{n}`, top to bottom ({threads} torch threads) | {s:.0f} | "
        f"{notebooks_cpu[n]:.0f} |"
        for n, s in notebooks.items()
    ]
    record = {
        "machine": machine,
        "checkpoint": args.checkpoint,
        # tests/test_readme_timings.py: a changed default checkpoint fails until this is rerun
        "checkpoint_sha256": sha256_file(seg.weights_path),
        "resolution": seg.resolution,
        "volume_session": session,
        "volume_session_cpu": session_cpu,
        "notebooks_s": notebooks,
        "notebooks_cpu_s": notebooks_cpu,
    }
    emit("\n".join(lines), args.out.with_suffix(".md"))
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
