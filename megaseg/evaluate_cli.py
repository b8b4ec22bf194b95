"""``megaseg evaluate``: held-out evaluation of a checkpoint against baselines.

    megaseg evaluate --checkpoint run/export/final.safetensors \\
        --corpus corpus/ --datasets WBC STARE [--protocol configs/protocols/x.yaml] \\
        [--folder my_images/] [--synthetic-tasks 50] \\
        [--support-sizes 1 2 4 8 16 32 64] [--draws-per-n 5] [--ensemble 1] \\
        [--methods megaseg mean_label supervised random_init] [--supervised-steps 300] \\
        [--out eval/] [--seed 0] [--allow-overlap]

    # the same draws for another checkpoint (sources re-opened from draws.json):
    megaseg evaluate --checkpoint other.safetensors --draws eval/draws.json --out eval_other/

Writes predictions.csv, tasks.csv, summary.csv / .md / .json, draws.json and PNG plots to
``--out`` and prints the summary. Exit codes: 0 done, 2 bad arguments or refused (e.g. a
dataset the checkpoint was trained on, without ``--allow-overlap``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    from megaseg.evaluation.protocol import DEFAULT_DRAWS_PER_N, DEFAULT_SUPPORT_SIZES
    from megaseg.evaluation.runner import DEFAULT_METHODS

    p = argparse.ArgumentParser(
        prog="megaseg evaluate",
        description="Held-out evaluation: Dice vs support size N for a checkpoint and baselines, "
        "on the same support draws, with bootstrap 95% intervals over tasks.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="weights (.safetensors + .json card) or a model name"
    )
    src = p.add_argument_group("what to evaluate on (any combination)")
    src.add_argument("--corpus", help="a corpus built by `megaseg prep build`")
    src.add_argument(
        "--datasets", nargs="+", default=[], metavar="NAME", help="held-out datasets of --corpus"
    )
    src.add_argument(
        "--protocol", help="a protocol YAML (held_out: [...]) naming datasets of --corpus"
    )
    src.add_argument("--folder", nargs="+", default=[], metavar="PATH",
                     help="folders data_prep can read (nnU-Net, Decathlon, image/mask pairs)")  # fmt: skip
    src.add_argument("--slices-per-plane", type=int, default=0, metavar="K",
                     help="--folder volumes: per plane and label, K more slices spread over the "
                          "label's extent besides the corpus's mid and largest-area slices; for "
                          "datasets of few subjects (default 0: exactly the corpus's slices)")  # fmt: skip
    src.add_argument("--synthetic-tasks", type=int, default=0, metavar="T",
                     help="T held-out synthetic tasks (seeds never used in training)")  # fmt: skip
    sweep = p.add_argument_group("the sweep (ignored with --draws)")
    sweep.add_argument("--support-sizes", nargs="+", type=int, default=list(DEFAULT_SUPPORT_SIZES))
    sweep.add_argument("--draws-per-n", type=int, default=DEFAULT_DRAWS_PER_N)
    sweep.add_argument(
        "--ensemble", type=int, default=1, help="K support sets averaged per prediction"
    )
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument(
        "--max-queries", type=int, default=None, help="queries per task (default all)"
    )
    p.add_argument("--draws", help="replay exactly the draws of this draws.json")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=DEFAULT_METHODS)
    p.add_argument("--supervised-steps", type=int, default=300)
    p.add_argument(
        "--label", default="megaseg", help="name of the checkpoint's rows (default megaseg)"
    )
    p.add_argument("--out", default="eval", help="output folder (default ./eval)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate even on datasets the checkpoint was trained on (flagged everywhere)")  # fmt: skip
    p.add_argument("--resolution", type=int, default=None, help="default: the checkpoint card's")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="B", help="bootstrap resamples")
    p.add_argument("--no-progress", action="store_true")
    return p


def _sources(args, resolution: int):
    from megaseg.evaluation import SyntheticSource, corpus_sources, folder_source

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
        sources.append(SyntheticSource(args.synthetic_tasks))
    return sources


def _protocol_datasets(path: str, corpus) -> list[str]:
    """The corpus datasets a protocol holds out: its names and shell patterns (``WBC-*``),
    matched case-insensitively; names absent from the corpus are reported, not an error."""
    import fnmatch
    import warnings

    from megaseg.data.store import load_protocol

    protocol = load_protocol(path)
    found, missing = [], []
    for pattern in sorted(protocol):
        hits = [d for d in corpus.datasets if fnmatch.fnmatch(d.casefold(), pattern.casefold())]
        found += [d for d in hits if d not in found]
        if not hits:
            missing.append(pattern)
    if missing:
        warnings.warn(
            f"protocol {protocol.name!r}: held-out datasets not in the corpus: {missing}",
            stacklevel=2,
        )
    if not found:
        raise ValueError(f"protocol {path}: none of its held-out datasets is in {corpus.root}")
    return found


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from megaseg.data.store import CorpusError
    from megaseg.evaluation import DrawSet, OverlapError, evaluate
    from megaseg.evaluation.sources import sources_from_record
    from megaseg.inference import Segmenter

    try:
        seg = Segmenter.from_checkpoint(args.checkpoint, args.device, resolution=args.resolution)
        sources = _sources(args, seg.resolution)
        draws = None
        if args.draws:
            draws = DrawSet.load(args.draws)
            if not sources:
                sources = sources_from_record(draws.sources, seg.resolution)
        if not sources:
            raise ValueError(
                "nothing to evaluate on: give --corpus with --datasets, --folder, "
                "--synthetic-tasks, or --draws"
            )
        result = evaluate(
            seg,
            sources,
            support_sizes=args.support_sizes,
            draws_per_n=args.draws_per_n,
            ensemble=args.ensemble,
            methods=args.methods,
            out_dir=args.out,
            draws=draws,
            seed=args.seed,
            allow_overlap=args.allow_overlap,
            supervised_steps=args.supervised_steps,
            max_queries=args.max_queries,
            resamples=args.bootstrap,
            model_label=args.label,
            progress=not args.no_progress,
        )
    except (OverlapError, ValueError, FileNotFoundError, KeyError, CorpusError) as err:
        print(f"megaseg evaluate: {err}", file=sys.stderr)
        return 2
    print(result.report)
    print(f"outputs: {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
