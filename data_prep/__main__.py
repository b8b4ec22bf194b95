"""``megaseg prep`` / ``python -m data_prep``: build, inspect and verify a corpus.

    prep build DATASET_OR_SPEC_OR_PATH... --out CORPUS [--workers N] [--resolutions 64 128 256]
               [--strict] [--seed S] [--data-dir DIR]
    prep info CORPUS
    prep verify CORPUS

A dataset is named as a catalog name (``ACDC``, found under ``--data-dir``), ``NAME=FOLDER``
(a catalog spec, files in FOLDER), a spec file (``.yaml`` / ``.json`` with DatasetSpec
fields; a relative ``root`` is relative to the file), or a folder (nnU-Net, Decathlon or 2D
image/mask layout, detected by ``spec_from_path``).

Other subcommands (``prep synth``) plug in through :data:`EXTERNAL`, like ``megaseg.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

# name -> ("module:function(argv) -> int", one-line help); imported only when used.
EXTERNAL: dict[str, tuple[str, str]] = {
    "synth": (
        "data_prep.synth:main",
        "write synthetic tasks (random smooth label maps) into a corpus",
    ),
}


def resolve_dataset(arg: str, data_dir: Path):
    """One ``build`` argument -> ``(spec, folder)``; raises ValueError / KeyError / DatasetError."""
    from data_prep.specs import DatasetSpec, FolderLayout, get_spec, spec_from_path

    path = Path(arg)
    if "=" in arg and not path.exists():
        name, folder = arg.split("=", 1)
        return get_spec(name), Path(folder)
    if path.is_dir():
        return spec_from_path(path), path
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        fields = yaml.safe_load(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: expected a mapping of DatasetSpec fields")
        if isinstance(fields.get("layout"), dict):
            fields["layout"] = FolderLayout(**fields["layout"])
        try:  # DatasetSpec turns YAML lists into tuples
            spec = DatasetSpec(**fields)
        except TypeError as err:
            raise ValueError(f"{path}: {err}") from err
        return spec, (path.parent / spec.root)
    if path.suffix or os.sep in arg:
        raise ValueError(f"{arg}: no such dataset folder or spec file")
    spec = get_spec(arg)
    return spec, spec.locate(data_dir)


def cmd_build(args) -> int:
    from data_prep.pipeline import build_corpus, job_from_spec
    from data_prep.readers import DatasetError

    try:
        jobs = [job_from_spec(*resolve_dataset(a, Path(args.data_dir))) for a in args.datasets]
    except (ValueError, KeyError, FileNotFoundError, DatasetError) as err:
        print(f"prep build: {err}", file=sys.stderr)
        return 2
    summary = build_corpus(
        jobs,
        args.out,
        workers=args.workers,
        resolutions=args.resolutions,
        strict=args.strict,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(summary.text())
    if summary.ok:
        print(f"corpus: {args.out}")
    return 0 if summary.ok else 1


def cmd_info(args) -> int:
    from megaseg.data.store import SPLITS, Corpus, CorpusError

    try:
        corpus = Corpus(args.corpus)
    except CorpusError as err:
        print(f"prep info: {err}", file=sys.stderr)
        return 1
    m = corpus.manifest
    print(f"corpus {args.corpus}: format {m['format_version']}, megaseg {m['megaseg_version']}, "
          f"{len(corpus.datasets)} datasets, {len(m['tasks'])} tasks")  # fmt: skip
    print()
    print(
        "| dataset | cases (skipped) | subjects train/val/test | tasks | examples train/val/test | licence | source |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in corpus.datasets:
        d = m["datasets"][name]
        subj = "/".join(str(d["subjects"][s]) for s in SPLITS)
        ex = "/".join(str(d["examples"][s]) for s in SPLITS)
        spec = d["spec"]
        print(f"| {name} | {d['cases']['written']} ({d['cases']['skipped']}) | {subj} | {d['num_tasks']} | {ex} "
              f"| {spec.get('licence') or '?'} | {spec.get('source') or '?'} |")  # fmt: skip
    print("\nProvenance (check each licence before redistributing a corpus):")
    for name in corpus.datasets:
        spec = m["datasets"][name]["spec"]
        fields = ("version", "licence", "citation")
        print(f"- {name}: " + "; ".join(f"{k} {spec.get(k) or '?'}" for k in fields))
    if args.tasks:
        print()
        print("| dataset | group | modality | axis | label | train | val | test |")
        print("|---|---|---|---|---|---|---|---|")
        for t in m["tasks"]:
            print(
                "| "
                + " | ".join(
                    str(t[k]) for k in ("dataset", "group", "modality", "axis", "label", *SPLITS)
                )
                + " |"
            )
    return 0


def cmd_verify(args) -> int:
    from data_prep.leakage import leakage_report
    from data_prep.store_writer import verify_files

    problems = verify_files(Path(args.corpus))
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        print(f"{len(problems)} problem(s): the corpus does not verify")
        return 1
    print(f"checksums: ok ({args.corpus})")
    report = leakage_report(args.corpus, args.threshold)
    print(f"leakage: {report['images']} images ({report['blank_images']} blank), correlation > {report['threshold']}: "
          f"{report['cross_dataset']} cross-dataset, {report['cross_split']} cross-split near-duplicate pairs")  # fmt: skip
    for p in report["pairs"][: args.show]:
        a, b = p["a"], p["b"]
        print(f"  {p['kind']} r={p['correlation']}: {a['dataset']}/{a['subject']} ({a['split']}, image {a['row']}) "
              f"~ {b['dataset']}/{b['subject']} ({b['split']}, image {b['row']})")  # fmt: skip
    for o in report["known_overlaps"]:
        print(f"  known overlap: {o['a']} ~ {o['b']}: {o['reason']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megaseg prep", description="Build, inspect and verify a corpus."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("build", help="build (or finish building) a corpus from datasets")
    b.add_argument("datasets", nargs="+", metavar="DATASET_OR_SPEC_OR_PATH")
    b.add_argument("--out", required=True, help="corpus folder")
    b.add_argument("--workers", type=int, default=1, help="processes working on cases in parallel")
    b.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    b.add_argument("--strict", action="store_true", help="a bad case is fatal (nothing is written)")
    b.add_argument("--seed", type=int, default=0, help="seed of the subject splits")
    b.add_argument("--data-dir", default=os.environ.get("MEGASEG_DATA", "."),
                   help="where catalog datasets are (default: $MEGASEG_DATA or .)")  # fmt: skip
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_build)
    i = sub.add_parser("info", help="datasets, tasks, counts, splits and provenance")
    i.add_argument("corpus")
    i.add_argument("--tasks", action="store_true", help="also list every task")
    i.set_defaults(func=cmd_info)
    v = sub.add_parser("verify", help="checksums, format version, leakage report")
    v.add_argument("corpus")
    v.add_argument("--threshold", type=float, default=0.98, help="near-duplicate correlation")
    v.add_argument("--show", type=int, default=20, help="near-duplicate pairs to print")
    v.add_argument("--json", help="write the full leakage report here")
    v.set_defaults(func=cmd_verify)
    for name, (_, text) in EXTERNAL.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL:
        module, func = EXTERNAL[argv[0]][0].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:]) or 0
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
