"""The ``megaseg`` command: one dispatcher for every subcommand.

``megaseg fit|validate|test|predict ...`` go to the Lightning CLI; other subcommands are
registered below as ``name -> "module:function"`` and imported only when used, so that
``megaseg prep ...`` does not pay for importing the training stack. Each function takes the
remaining argv and returns an exit code.
"""

from __future__ import annotations

import importlib
import sys

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "prep": (
        "data_prep.__main__:main",
        "build, inspect and verify a corpus (see `megaseg prep -h`)",
    ),
    "evaluate": (
        "megaseg.evaluate_cli:main",
        "held-out evaluation: Dice vs support size N, baselines, bootstrap CIs",
    ),
    "demo": ("megaseg.demo:main", "segment real example images offline and write an overlay PNG"),
    "show-episodes": ("megaseg.show_episodes:main", "PNG of a few augmented training episodes"),
}


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    lines = ["usage: megaseg COMMAND [ARGS...]", "", "commands:"]
    for name in LIGHTNING_SUBCOMMANDS:
        lines.append(f"  {name:<14} Lightning CLI: {name} with --config configs/....yaml")
    for name, (_, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<14} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_SUBCOMMANDS:
        return _load("megaseg.training.cli:lightning_main")([command, *rest]) or 0
    if command in SUBCOMMANDS:
        return _load(SUBCOMMANDS[command][0])(rest) or 0
    print(f"megaseg: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
