"""The ``megaseg`` command: one dispatcher for every subcommand, one module per command.

    megaseg fit|validate|test|predict   megaseg/cli/train.py (the Lightning CLI)
    megaseg prep build|info|verify|hash megaseg/cli/prep.py
    megaseg prep synth | prep fetch     megaseg/cli/prep_synth.py, megaseg/cli/prep_fetch.py
    megaseg evaluate                    megaseg/cli/evaluate.py
    megaseg demo                        megaseg/cli/demo.py
    megaseg show-episodes               megaseg/cli/show_episodes.py

The command modules parse arguments and report; the work is done by the library modules they
call. Subcommands are registered below as ``name -> "module:function"`` and imported only
when used, so that ``megaseg prep ...`` does not pay for importing the training stack. Each
function takes the remaining argv and returns an exit code.

``megaseg fit --help`` (and validate/test/predict) prints a short hand-written help without
importing torch or Lightning (LightningCLI's own takes seconds and ~2,300 lines):
``--help-all`` asks for that one.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
HELP_WIDTH = 100  # columns of the hand-written help

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "prep": (
        "megaseg.cli.prep:main",
        "build, inspect and verify a corpus (see `megaseg prep -h`)",
    ),
    "evaluate": (
        "megaseg.cli.evaluate:main",
        "held-out evaluation: Dice vs support size N, baselines, bootstrap CIs",
    ),
    "demo": (
        "megaseg.cli.demo:main",
        "segment real example images offline and write an overlay PNG",
    ),
    "show-episodes": ("megaseg.cli.show_episodes:main", "PNG of a few augmented training episodes"),
}


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    lines = ["usage: megaseg COMMAND [ARGS...]", "", "commands:"]
    for name in LIGHTNING_SUBCOMMANDS:
        lines.append(f"  {name:<14} {LIGHTNING_SHORT[name]} (--config configs/NAME.yaml)")
    for name, (_, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<14} {text}")
    lines += ["", "`megaseg COMMAND --help` for a command's options."]
    return "\n".join(lines)


LIGHTNING_HELP = """\
usage: megaseg {command} --config configs/NAME.yaml [--section.key VALUE ...]
       megaseg {command} --help-all    (Lightning's full list of options, ~2,300 lines)

{what}
Settings come from the YAML config; any key can be changed on the command line by its dotted
name, e.g. --trainer.max_steps 500 --data.batch_size 8.

configs ({folder}/):
{configs}

often changed:
  --trainer.max_steps N            training length; the learning-rate schedule follows it
  --trainer.default_root_dir DIR   where the run writes (ROOT, below)
  --trainer.accelerator cpu|gpu    --trainer.devices N    --trainer.precision bf16-mixed
  --data.corpora '[PATH, ...]'     train on corpora built by `megaseg prep build`
  --data.synthetic_ratio X         share of synthetic episodes when training on corpora
  --data.batch_size N              --data.support_size N or [LO,HI]
  --model.optimizer.init_args.lr X
  --ckpt_path last|PATH            fit: resume; validate/test/predict: the weights to run
  --cpu_threads N                  CPU runs: torch threads (default: the cores left after the
                                   data workers, printed in the first line; OMP_NUM_THREADS and
                                   --data.num_workers N also override)
  --print_config                   print the resolved config and exit

outputs (ROOT = trainer.default_root_dir; the run's last lines name what it wrote):
  ROOT/checkpoints/last.ckpt                  resumable Lightning checkpoints
  ROOT/export/final.safetensors + .json       weights for megaseg.load_checkpoint / Segmenter
  ROOT/lightning_logs/version_N/metrics.csv   losses, Dice, learning rate, episodes/s
  ROOT/lightning_logs/version_N/config.yaml   the resolved config (val_examples/*.png beside)
  ROOT/predictions/                           predict: .npz probabilities and PNGs per batch
"""

LIGHTNING_WHAT = {
    "fit": "Train a network on episodes (synthetic tasks and/or corpora).",
    "validate": "Run a checkpoint (--ckpt_path) on the validation episodes and log the metrics.",
    "test": "Run a checkpoint (--ckpt_path) on the test episodes and log the metrics.",
    "predict": "Write a checkpoint's (--ckpt_path) predictions for the test episodes.",
}


LIGHTNING_SHORT = {
    "fit": "train a network on episodes",
    "validate": "a checkpoint's metrics on the validation episodes",
    "test": "a checkpoint's metrics on the test episodes",
    "predict": "a checkpoint's predictions for the test episodes",
}


def config_summaries(folder: Path, width: int = 72) -> list[tuple[str, str]]:
    """``(file name, summary)`` of each ``*.yaml`` in ``folder``: the first sentence of its
    opening comment (each config opens with ``# name: what it is.``); one longer than
    ``width`` is ended at its first clause (before " -- ", ": ", "; " or " ("), never cut
    mid-phrase (``--help`` wraps what is still long)."""
    rows = []
    for path in sorted(folder.glob("*.yaml")):
        words: list[str] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.startswith("#") or line.startswith("#  "):
                    break
                words += line.lstrip("#").split()
        text = " ".join(words).split(": ", 1)[-1]
        text = text.split(". ")[0].rstrip(".")
        if len(text) > width:
            import re

            # the first clause boundary that leaves a phrase of some length
            cuts = [m.start() for m in re.finditer(r" -- |: |; | \(", text) if m.start() >= 20]
            text = text[: min(cuts, default=len(text))]
        rows.append((path.name, text))
    return rows


def _configs_folder() -> Path | None:
    """configs/ of the working directory, else of the source checkout megaseg runs from."""
    for folder in (Path("configs"), Path(__file__).resolve().parents[2] / "configs"):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    return None


def lightning_help(command: str) -> str:
    folder = _configs_folder()
    if folder is None:
        configs = "  (none in ./configs; the source checkout has them)"
    else:
        import textwrap

        rows = config_summaries(folder)
        width = max(len(name) for name, _ in rows) + 2
        lines = []
        for name, text in rows:  # whole sentences, wrapped under their column
            wrapped = textwrap.wrap(text, max(40, HELP_WIDTH - 2 - width))
            lines.append(f"  {name:<{width}}{wrapped[0]}")
            lines += [" " * (2 + width) + more for more in wrapped[1:]]
        configs = "\n".join(lines)
    return LIGHTNING_HELP.format(
        command=command, what=LIGHTNING_WHAT[command], configs=configs, folder=folder or "configs"
    )


def main(argv: list[str] | None = None) -> int:
    """Run a command; one whose reader closes the pipe early stops quietly (megaseg.pipes)."""
    from megaseg.pipes import run_command

    return run_command(lambda: _dispatch(argv))


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_SUBCOMMANDS:
        if "--help-all" in rest:
            rest = ["--help" if a == "--help-all" else a for a in rest]
        elif "-h" in rest or "--help" in rest:
            print(lightning_help(command), end="")
            return 0
        return _load("megaseg.cli.train:lightning_main")([command, *rest]) or 0
    if command in SUBCOMMANDS:
        return _load(SUBCOMMANDS[command][0])(rest) or 0
    print(f"megaseg: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2
