"""One fit per run folder, and a resumed fit resumes its own checkpoint.

A run folder is ``ROOT = trainer.default_root_dir``: its ``checkpoints/`` and ``export/`` hold
one run's files. Two fits writing there would replace each other's ``export/last.safetensors``
and interleave ``last.ckpt`` / ``last-v1.ckpt``, and Lightning's ``--ckpt_path last`` picks the
newest ``last*.ckpt`` whichever run wrote it. So ``megaseg fit``:

- holds ``ROOT/.megaseg-fit.lock`` (:func:`megaseg.paths.pid_lock`, the PID inside) while it
  runs: a second live fit into ROOT is refused naming the folder and the PID; a killed fit's
  lock is taken over;
- refuses to start a *new* run in a ROOT that holds an earlier fit's checkpoints or weights
  (resume it with ``--ckpt_path last``, or give the new run its own folder);
- resolves ``--ckpt_path last`` itself: the one ``last*.ckpt`` of the run's checkpoint folder,
  refused when there are several (files of different runs, from before this rule), and checks
  any checkpoint it is given: complete (:func:`~megaseg.training.checkpoint_io.check_complete`)
  and of the same network (names and shapes), before Lightning loads it.

Each refusal is a :class:`RunRefused` naming the path; the CLI prints it and exits 2.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from megaseg.checkpoint import plain_detail, shape_mismatches
from megaseg.paths import pid_lock
from megaseg.training.checkpoint_io import IncompleteCheckpoint, check_complete

LOCK_NAME = ".megaseg-fit.lock"


class RunRefused(ValueError):
    """A fit or a checkpoint the run folder rules refuse; the message names the path."""


@contextlib.contextmanager
def run_lock(root: str | os.PathLike) -> Iterator[Path]:
    """Hold ``ROOT/.megaseg-fit.lock`` for the duration; RunRefused when a live fit holds it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    busy = lambda pid: RunRefused(  # noqa: E731
        f"{root}: another megaseg fit is running in this folder (PID {pid}, lock {path}); its "
        "checkpoints and exported weights would be mixed with this run's. Wait for it or stop "
        "it, or give this run its own --trainer.default_root_dir"
    )
    with pid_lock(path, busy=busy, refused=RunRefused):
        yield path


def earlier_outputs(ckpt_dirs: Iterable[Path], export_dirs: Iterable[Path]) -> list[Path]:
    """The ``.ckpt`` files and exported ``.safetensors`` an earlier fit left, sorted."""
    found = [p for d in ckpt_dirs for p in Path(d).glob("*.ckpt") if p.is_file()]
    found += [p for d in export_dirs for p in Path(d).glob("*.safetensors") if p.is_file()]
    return sorted(set(found))


def refuse_new_run_over(root: Path, outputs: list[Path]) -> None:
    """RunRefused when a fresh fit (no ``--ckpt_path``) would share ROOT with ``outputs``."""
    if not outputs:
        return
    shown = ", ".join(str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
                      for p in outputs[:3])  # fmt: skip
    more = f" and {len(outputs) - 3} more" if len(outputs) > 3 else ""
    raise RunRefused(
        f"{root}: holds the outputs of an earlier fit ({shown}{more}); a new run there would "
        "mix its checkpoints with that run's and replace its exported weights. Resume that run "
        "with --ckpt_path last, or give this run its own --trainer.default_root_dir (or move "
        "the folder away)"
    )


def resolve_last(ckpt_dirs: Iterable[Path]) -> Path | None:
    """The run's ``last*.ckpt`` (None when there is none); RunRefused when there are several,
    since nothing tells which of them is this run's."""
    candidates = sorted({p for d in ckpt_dirs for p in Path(d).glob("last*.ckpt") if p.is_file()})
    if len(candidates) > 1:
        raise RunRefused(
            f"--ckpt_path last: {len(candidates)} last checkpoints in "
            f"{candidates[0].parent} ({', '.join(p.name for p in candidates)}), written by "
            "different runs into the same folder; pass the one to resume with --ckpt_path PATH"
        )
    return candidates[0] if candidates else None


def check_resumable(path: str | os.PathLike, module: nn.Module) -> None:
    """RunRefused unless ``path`` is a complete checkpoint whose ``state_dict`` has exactly
    ``module``'s names and shapes. The tensors are memory-mapped, not read."""
    path = Path(path)
    try:
        check_complete(path)
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except IncompleteCheckpoint as err:
        others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        hint = f"; other checkpoints there: {', '.join(others)}" if others else ""
        raise RunRefused(f"{err}{hint}. Pass a complete one with --ckpt_path PATH") from None
    except Exception as err:  # torch raises several types for an unreadable archive
        raise RunRefused(
            f"{path}: not a readable Lightning checkpoint ({plain_detail(err)})"
        ) from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise RunRefused(f"{path}: not a Lightning checkpoint (no state_dict)")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = shape_mismatches(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise RunRefused(
            f"{path}: a checkpoint of another network than this run's config builds "
            f"({' | '.join(problems)}); resume with the config that wrote it, or start a new "
            "run in its own --trainer.default_root_dir"
        )
