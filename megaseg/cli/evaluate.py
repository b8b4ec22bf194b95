"""``megaseg evaluate``: held-out evaluation of a checkpoint against baselines.

    megaseg evaluate --checkpoint run/export/final.safetensors \\
        --corpus corpus/ --datasets WBC STARE [--protocol configs/protocols/x.yaml] \\
        [--folder my_images/] [--synthetic-tasks 50 [--synthetic-version 2]] \\
        [--support-sizes 1 2 4 8 16 32 64] [--draws-per-n 5] [--ensemble 1] [--flips] \\
        [--methods megaseg mean_label supervised random_init] [--supervised-steps 300] \\
        [--out megaseg_work/eval] [--seed 0] [--allow-overlap] [--scheduler ADDRESS]

    # the same draws for another checkpoint (sources re-opened from draws.json):
    megaseg evaluate --checkpoint other.safetensors --draws megaseg_work/eval/draws.json \\
        --out megaseg_work/eval_other
    # the same model and draws with flip test-time augmentation (a paired ablation):
    megaseg evaluate --checkpoint run/export/final.safetensors \\
        --draws megaseg_work/eval/draws.json --flips --methods megaseg --out megaseg_work/eval_flips

Writes predictions.csv, tasks.csv, summary.csv / .md / .json, draws.json and PNG plots to
``--out`` (default ``megaseg_work/eval``, see :func:`megaseg.paths.work_dir`) and prints the
summary. Exit codes: 0 done, 2 bad arguments or refused (e.g. a dataset the checkpoint was
trained on, without ``--allow-overlap``; a malformed protocol or draws file; a file in
``--out`` megaseg did not write, or the replayed draws file), with a one-line message on
stderr and no traceback.

Nothing heavy is imported at module level or while parsing: ``--help`` answers without
loading torch, MONAI or Lightning.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

PROG = "megaseg evaluate"


def parser() -> argparse.ArgumentParser:
    from megaseg.cluster import SCHEDULER_HELP
    from megaseg.evaluation.defaults import (
        DEFAULT_DRAWS_PER_N,
        DEFAULT_METHODS,
        DEFAULT_RESAMPLES,
        DEFAULT_SUPERVISED_STEPS,
        DEFAULT_SUPPORT_SIZES,
    )
    from megaseg.helpformat import DefaultsHelpFormatter
    from megaseg.paths import work_dir

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Held-out evaluation: Dice vs support size N for a checkpoint and baselines, "
        "on the same support draws, with bootstrap 95% intervals over tasks. Exit code 2 "
        "with a message when an input is refused.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="weights (.safetensors with its .json card, or a torch state dict) or the name of "
        "a model megaseg ships weights for",
    )
    src = p.add_argument_group("what to evaluate on (any combination)")
    src.add_argument("--corpus", help="a corpus built by `megaseg prep build`")
    src.add_argument(
        "--datasets", nargs="+", default=[], metavar="NAME", help="held-out datasets of --corpus"
    )
    src.add_argument(
        "--protocol", help="a protocol YAML (held_out: [names or patterns]) naming datasets of "
        "--corpus",
    )  # fmt: skip
    src.add_argument("--folder", nargs="+", default=[], metavar="PATH",
                     help="folders data_prep can read (nnU-Net, Decathlon, image/mask pairs)")  # fmt: skip
    src.add_argument("--slices-per-plane", type=int, default=0, metavar="K",
                     help="--folder volumes: per plane and label, K more slices spread over the "
                          "label's extent besides the corpus's mid and largest-area slices, for "
                          "datasets of few subjects (0: exactly the corpus's slices)")  # fmt: skip
    src.add_argument("--synthetic-tasks", type=int, default=0, metavar="T",
                     help="T held-out synthetic tasks (seeds never used in training)")  # fmt: skip
    src.add_argument("--synthetic-version", type=int, choices=(1, 2), default=None, metavar="V",
                     help="generator of --synthetic-tasks: 1 (space-filling anatomies) or 2 "
                          "(objects on backgrounds, per-subject geometry, MNI152 label maps); "
                          "when not given, 1, or with --draws the recorded one (a replay "
                          "refuses another)")  # fmt: skip
    sweep = p.add_argument_group("the sweep (ignored with --draws)")
    sweep.add_argument("--support-sizes", nargs="+", type=int, metavar="N",
                       default=list(DEFAULT_SUPPORT_SIZES),
                       help="support sizes N; an N above a task's pool is capped to the pool")  # fmt: skip
    sweep.add_argument("--draws-per-n", type=int, default=DEFAULT_DRAWS_PER_N, metavar="D",
                       help="random support draws per task and N")  # fmt: skip
    sweep.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="K",
        help="K support sets averaged per prediction",
    )
    sweep.add_argument("--seed", type=int, default=0, help="seed of every draw")
    sweep.add_argument(
        "--max-queries", type=int, default=None, metavar="Q",
        help="at most Q queries per task, picked by the seed; when not given, all",
    )  # fmt: skip
    p.add_argument("--draws", metavar="DRAWS_JSON",
                   help="replay exactly the draws of this draws.json (its sources are re-opened "
                        "unless given)")  # fmt: skip
    p.add_argument("--flips", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation of the megaseg method: its probabilities "
                        "averaged over the identity, horizontal, vertical and both flips of each "
                        "task (query and support flipped together), 4x its forward passes; "
                        "mean_label, supervised and random_init are unaffected. Recorded in "
                        "draws.json and summary.json settings; with --draws, when not given, the "
                        "recorded value (off for files without it), and --flips / --no-flips "
                        "override it")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=None, choices=DEFAULT_METHODS,
                   help="methods evaluated on the same draws; the first one's best, median and "
                        "worst predictions are plotted. When not given: all of them on a GPU; on "
                        "a CPU all but supervised, which trains a U-Net from scratch for every "
                        "support set (--supervised-steps steps: tens of seconds each on a CPU, "
                        "hours for the default sweep); name it to run it anyway")  # fmt: skip
    p.add_argument("--supervised-steps", type=int, default=DEFAULT_SUPERVISED_STEPS,
                   help="training steps of the supervised U-Net baseline per support set")  # fmt: skip
    p.add_argument("--label", default="megaseg", help="name of the checkpoint's rows")
    p.add_argument("--out", type=Path, default=work_dir("eval"), help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --out that an earlier evaluation did not write or that "
                        "were changed since (refused by default; the --draws file being replayed "
                        "is never replaced)")  # fmt: skip
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate even on datasets the checkpoint was trained on (flagged everywhere)")  # fmt: skip
    p.add_argument("--resolution", type=int, default=None,
                   help="network input size; when not given, the checkpoint card's, else 128")  # fmt: skip
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1; when not given, cuda if available, else cpu")  # fmt: skip
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="B",
                   help="bootstrap resamples of the 95%% intervals")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help=SCHEDULER_HELP + "; each (task, N, draw) is one Dask task, the numbers "
                        "are the local run's")  # fmt: skip
    return p


def _sources(args, resolution: int):
    from megaseg.evaluation import SyntheticSource, corpus_sources, folder_source

    if args.synthetic_version is not None and not (args.synthetic_tasks or args.draws):
        raise ValueError("--synthetic-version names the generator of --synthetic-tasks: give it")
    if (args.datasets or args.protocol) and not args.corpus:
        raise ValueError("--datasets / --protocol name datasets of a corpus: give --corpus")
    sources = []
    if args.corpus:
        from megaseg.data.store import Corpus

        corpus = Corpus(args.corpus)
        datasets = list(args.datasets)
        if args.protocol:
            datasets += [d for d in _protocol_datasets(args.protocol, corpus) if d not in datasets]
        if not datasets:
            raise ValueError("--corpus: name the held-out datasets with --datasets or --protocol")
        sources = corpus_sources(corpus, datasets)
    sources += [
        folder_source(f, resolution=resolution, slices_per_plane=args.slices_per_plane)
        for f in args.folder
    ]
    if args.synthetic_tasks:
        sources.append(SyntheticSource(args.synthetic_tasks, version=args.synthetic_version or 1))
    return sources


def _protocol_datasets(path: str, corpus) -> list[str]:
    """The corpus datasets a protocol holds out: its names and shell patterns (``WBC-*``),
    matched case-insensitively; names absent from the corpus are reported, not an error."""
    import fnmatch

    import yaml

    from megaseg.data.store import load_protocol

    try:
        protocol = load_protocol(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())  # yaml's messages span lines
        raise ValueError(f"{path}: not a readable protocol YAML ({detail})") from e
    found, missing = [], []
    for pattern in sorted(protocol):
        hits = [d for d in corpus.datasets if fnmatch.fnmatch(d.casefold(), pattern.casefold())]
        found += [d for d in hits if d not in found]
        if not hits:
            missing.append(pattern)
    if missing:
        logging.getLogger("megaseg.evaluation").warning(
            "protocol %r (%s): held-out datasets not in the corpus: %s",
            protocol.name, path, ", ".join(missing),
        )  # fmt: skip
    if not found:
        raise ValueError(f"protocol {path}: none of its held-out datasets is in {corpus.root}")
    return found


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from megaseg.cluster import SchedulerError, scheduler_address
    from megaseg.data.store import CorpusError
    from megaseg.evaluation import DrawSet, OverlapError, evaluate
    from megaseg.evaluation.defaults import DEFAULT_METHODS, default_methods
    from megaseg.evaluation.sources import check_synthetic_version, sources_from_record
    from megaseg.inference import Segmenter

    scheduler = scheduler_address(args.scheduler)
    if scheduler is not None and args.corpus:
        args.corpus = os.path.abspath(args.corpus)  # read by the workers, from their own cwd
    try:
        seg = Segmenter.from_checkpoint(args.checkpoint, args.device, resolution=args.resolution)
        draws = None
        if args.draws:
            draws = DrawSet.load(args.draws)
            # Before any source is built: a v1 replay must not generate v2 tasks, or vice versa.
            check_synthetic_version(draws.sources, args.synthetic_version)
        sources = _sources(args, seg.resolution)
        if draws is not None and not sources:
            sources = sources_from_record(
                draws.sources, seg.resolution, base=Path(args.draws).parent
            )
        if not sources:
            raise ValueError(
                "nothing to evaluate on: give --corpus with --datasets, --folder, "
                "--synthetic-tasks, or --draws"
            )
        methods = args.methods or list(default_methods(seg.device.type))
        if args.methods is None and len(methods) < len(DEFAULT_METHODS):
            left_out = ", ".join(m for m in DEFAULT_METHODS if m not in methods)
            print(f"{PROG}: on a CPU, {left_out} is left out (one U-Net training per support "
                  "set); add it to --methods to run it", file=sys.stderr)  # fmt: skip
        result = evaluate(
            seg,
            sources,
            support_sizes=args.support_sizes,
            draws_per_n=args.draws_per_n,
            ensemble=args.ensemble,
            flips=args.flips,
            methods=methods,
            out_dir=args.out,
            draws=draws,
            seed=args.seed,
            allow_overlap=args.allow_overlap,
            supervised_steps=args.supervised_steps,
            max_queries=args.max_queries,
            resamples=args.bootstrap,
            model_label=args.label,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            scheduler=scheduler,
        )
    # ValueError covers CheckpointError, ProtocolError and malformed protocol/draws files.
    # FileExistsError: --out holds a file megaseg did not write (megaseg.outputs).
    except (
        OverlapError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        KeyError,
        CorpusError,
        SchedulerError,
    ) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    print(result.report)
    print(f"outputs: {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    from megaseg.pipes import run_command

    sys.exit(run_command(main))
