"""How much better could the next slice be? `suggest()` against every slice it could have picked.

On the structures of benchmarks/annotate_volumes.py that span at least 10 slices, a guided
``VolumeSession`` starts from the first n slices even spacing labels there (the middle slice,
then the middle of the largest gap within the extent). Then every unlabelled slice of the
extent (at most ``--candidates`` of them, evenly spread, plus the strategies' picks) is labelled
in turn with its true mask and the volume Dice of ``segment()`` recorded. Per state:

- even:           the next slice of even spacing;
- suggest-within: ``session.suggest(1, within=extent)``;
- suggest:        ``session.suggest(1)``, not told the extent (a slice outside it scores as
                  labelling an empty slice there);
- random:         the mean over the candidates within the extent (a random pick's expected);
- best:           the candidate with the highest Dice: a one-step oracle that knows the truth,
                  the most any rule choosing one slice could gain from that state.

So the tables say how much headroom a better ``suggest()`` has, one step at a time, and how
often it already picks the best slice.

    python benchmarks/suggest_headroom.py               # docs/results/suggest_headroom.*
    python benchmarks/suggest_headroom.py --ns 4 --only lung
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from annotate_loop import next_even  # noqa: E402
from annotate_volumes import LOOP_SLICES, VOLUMES, _checkpoint, extent, load  # noqa: E402
from machine import cpu_name, emit  # noqa: E402

from megaseg import Segmenter  # noqa: E402
from megaseg.annotate import VolumeSession  # noqa: E402
from megaseg.metrics import mask_dice  # noqa: E402

PICKS = ("even", "suggest-within", "suggest")
CLOSE = 0.005  # a pick within this of the best counts as the best


def even_state(first: int, last: int, n: int) -> list[int]:
    """The first ``n`` slices even spacing labels in ``[first, last]``: the middle, then the
    middle of the largest gap (benchmarks/annotate_volumes.py's loop)."""
    chosen = [(first + last) // 2]
    while len(chosen) < n:
        chosen.append(next_even(chosen, first, last + 1))
    return chosen


def candidates(free: list[int], most: int, keep) -> list[int]:
    """At most ``most`` of ``free`` (sorted), evenly spread, and the slices of ``keep``."""
    step = max(1, -(-len(free) // most))
    return sorted(set(free[::step]) | set(keep))


def summarize(records: list[dict]) -> list[dict]:
    """Per n: mean Dice now and after each pick, the oracle's and a random pick's, and how
    often suggest-within's pick is within CLOSE of the best."""
    out = []
    for n in sorted({r["n"] for r in records}):
        rs = [r for r in records if r["n"] == n]
        dice = [{int(c): d for c, d in r["dice"].items()} for r in rs]
        row = {"n": n, "states": len(rs), "now": float(np.mean([r["now"] for r in rs]))}
        for name in PICKS:
            row[name] = float(np.mean([d[r["picks"][name]] for r, d in zip(rs, dice, strict=True)]))
        row["random"] = float(np.mean([
            np.mean([v for c, v in d.items() if r["extent"][0] <= c <= r["extent"][1]])
            for r, d in zip(rs, dice, strict=True)
        ]))  # fmt: skip
        row["best"] = float(np.mean([max(d.values()) for d in dice]))
        row["within_best"] = int(
            sum(max(d.values()) - d[r["picks"]["suggest-within"]] <= CLOSE
                for r, d in zip(rs, dice, strict=True))
        )  # fmt: skip
        out.append(row)
    return out


def report(raw: dict, out: Path) -> None:
    """``<name>.md`` under ``out`` from the raw results."""
    meta, rows = raw["meta"], summarize(raw["records"])
    lines = [
        "# How much better could the next slice be?",
        "",
        f"{len({r['structure'] for r in raw['records']})} structures of "
        "benchmarks/annotate_volumes.py (those spanning at least 10 slices), guided "
        f"`VolumeSession`, checkpoint `{meta['checkpoint']}`. From even spacing's first n "
        "labelled slices, the volume Dice after labelling one more: even spacing's next, "
        "`suggest(1, within=extent)`'s, `suggest(1)`'s (not told the extent), the mean over "
        f"the candidate slices (a random pick; at most {meta['candidates']} per state, evenly "
        "spread, plus the picks) and the best candidate (an oracle that knows the truth: the "
        "most one slice can add from that state).",
        "",
        "| n | states | now | even | suggest-within | suggest | random | best | suggest-within "
        f"within {CLOSE} of best |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['states']} | {r['now']:.3f} | "
            + " | ".join(f"{r[k]:.3f}" for k in (*PICKS, "random", "best"))
            + f" | {r['within_best']} of {r['states']} |"
        )
    gains = {k: np.mean([r[k] - r["even"] for r in rows]) for k in ("suggest-within", "best")}
    lines += [
        "",
        f"Mean over n of the gain on even spacing's next slice: suggest-within "
        f"{gains['suggest-within']:+.3f}, best {gains['best']:+.3f}.",
        "",
        f"Machine: {meta['machine']}, 1 thread; {meta['seconds']:.0f} s.",
        f"Command: `{meta['command']}` (raw results: `{meta['name']}.json`; this table again: "
        "`--from-json`).",
    ]
    emit("\n".join(lines), out / f"{meta['name']}.md")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default="megaseg_generalist", help="default: the shipped one")
    p.add_argument("--ns", type=int, nargs="+", default=[3, 5, 7], help="labelled slices before")
    p.add_argument("--candidates", type=int, default=30, help="most slices tried per state")
    p.add_argument("--only", nargs="+", default=None, help="structures whose name contains one")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--name", default="suggest_headroom")
    p.add_argument("--from-json", type=Path, default=None, help="only rewrite the md from it")
    args = p.parse_args(argv)
    if args.from_json is not None:
        report(json.loads(args.from_json.read_text()), args.out)
        return
    torch.set_num_threads(1)
    seg = Segmenter.from_checkpoint(_checkpoint(args.checkpoint), device="cpu")
    records, t0 = [], time.perf_counter()
    for volume in VOLUMES:
        wanted = {
            s: v for s, v in volume.structures.items()
            if args.only is None or any(o in s for o in args.only)
        }  # fmt: skip
        if not wanted:
            continue
        image, labels, affine = load(volume)
        session = VolumeSession(seg, image, axis=volume.axis, affine=affine, progress=False)
        for structure, value in wanted.items():
            truth = labels == value
            first, last = extent(truth, volume.axis)
            if last - first + 1 < LOOP_SLICES:
                continue

            def true_slice(i, truth=truth, axis=volume.axis):
                return np.take(truth, i, axis=axis).astype(np.int64)

            for n in args.ns:
                for i in session.labelled:
                    session.remove(i)
                state = even_state(first, last, n)
                for i in state:
                    session.add(i, true_slice(i))
                now = mask_dice(session.segment().labels > 0, truth, empty=0.0)
                picks = {
                    "even": next_even(state, first, last + 1),
                    "suggest-within": session.suggest(1, within=(first, last + 1))[0],
                    "suggest": session.suggest(1)[0],
                }
                free = [i for i in range(first, last + 1) if i not in state]
                dice = {}
                for c in candidates(free, args.candidates, picks.values()):
                    session.add(c, true_slice(c))
                    dice[c] = mask_dice(session.segment().labels > 0, truth, empty=0.0)
                    session.remove(c)
                records.append({
                    "structure": structure, "n": n, "extent": [first, last], "state": state,
                    "now": now,
                    "picks": {k: int(v) for k, v in picks.items()},
                    "dice": {str(c): d for c, d in dice.items()},
                })  # fmt: skip
                best = max(dice, key=dice.get)
                print(
                    f"{structure:16s} n={n} now {now:.3f} "
                    + " ".join(f"{k} {v}:{dice[v]:.3f}" for k, v in picks.items())
                    + f" best {best}:{dice[best]:.3f}",
                    flush=True,
                )
    meta = {
        "checkpoint": args.checkpoint,
        "candidates": args.candidates,
        "machine": cpu_name(),
        "seconds": time.perf_counter() - t0,
        "command": "python benchmarks/suggest_headroom.py " + shlex.join(argv or sys.argv[1:]),
        "name": args.name,
    }
    raw = {"meta": meta, "records": records}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(raw, indent=1))
    report(raw, args.out)


if __name__ == "__main__":
    main()
