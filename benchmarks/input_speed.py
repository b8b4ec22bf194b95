"""CPU time of the training input pipeline per episode, stage by stage (issue #21).

    python benchmarks/input_speed.py [--batches 30] [--warmup 2] [--out table.md]
        [--recipe NAME=CONFIG[,KEY=VALUE...]] ...

For each recipe (default: the generalist GPU recipe, configs/generalist_gpu.yaml, and the CPU
recipe, configs/cpu_small.yaml) the script builds the config's ``data`` section as an
:class:`~megaseg.training.datamodule.EpisodeDataModule` with ``num_workers=0`` and draws training
batches in this process, measuring *process CPU time* (``time.process_time``; run it with
``OMP_NUM_THREADS=1`` so that is one core's time) of each loader stage:

* task choice: source and task draws;
* corpus read: stored examples (memory-mapped uint8) gathered for an episode;
* synthetic generation: synthetic tasks generated on the fly;
* collation: the episodes stacked into the batch;
* augmentation: episode augmentation where the loader runs it (a recipe with
  ``augment_on_device: true`` runs it after the transfer, on the training device: its row is
  then "device augmentation", measured on this CPU and not part of the loader's time);
* pinning: page-locking the batch for the copy to a GPU (only with CUDA, else "n/a");
* other: what the batch costs beyond the stages above (index draws, names).

Overrides (``KEY=VALUE``, YAML values) change the config's data section, e.g.
``--recipe 'before=configs/generalist_gpu.yaml,synthetic_store=null,augment_on_device=false'``.
The corpora and synthetic store the configs name must exist (see their headers).

The last line reads exactly ``loader: X ms CPU per episode``, X for the first recipe.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import yaml
from machine import cpu_name, emit  # benchmarks/machine.py (the script's folder is on sys.path)

DEFAULT_RECIPES = (
    "generalist=configs/generalist_gpu.yaml",
    "cpu_small=configs/cpu_small.yaml",
)
STAGES = (
    "task choice",
    "corpus read",
    "synthetic generation",
    "collation",
    "augmentation",
    "pinning",
    "other",
)


def parse_recipe(text: str) -> tuple[str, str, dict]:
    """``NAME=CONFIG[,KEY=VALUE...]`` -> (name, config path, data overrides)."""
    name, _, rest = text.partition("=")
    config, *pairs = rest.split(",")
    if not name or not config:
        raise SystemExit(f"--recipe: expected NAME=CONFIG[,KEY=VALUE...], got {text!r}")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--recipe {text!r}: {pair!r} is not KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return name, config, overrides


def build(config: str, overrides: dict):
    from megaseg.training.datamodule import EpisodeDataModule

    data = dict((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {})
    data.update(overrides, num_workers=0)
    return EpisodeDataModule(**data), data


def measure(dm, batches: int, warmup: int) -> dict:
    """Per-episode CPU milliseconds per stage over ``batches`` training batches."""
    import torch

    loader = dm.train_dataloader()  # builds the sources (label maps, corpus index) untimed
    sampler = loader.dataset.sampler
    pin = torch.cuda.is_available()
    it = iter(loader)
    for _ in range(warmup):  # memory maps opened, caches filled
        next(it)
    sampler.stage_times = times = {}
    episodes, sizes, device_aug = 0, [], 0.0
    start = time.process_time()
    for _ in range(batches):
        batch = next(it)
        episodes += batch["query"].shape[0] if "query" in batch else batch["images"].shape[0]
        sizes.append(_support_size(batch))
        if pin:
            t = time.process_time()
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            times["pinning"] = times.get("pinning", 0.0) + time.process_time() - t
        if getattr(
            dm, "augment_on_device", False
        ):  # what the training device does after the transfer
            t = time.process_time()
            dm.on_after_batch_transfer(batch, 0)
            device_aug += time.process_time() - t
    total = time.process_time() - start - device_aug
    times["other"] = total - sum(times.values())
    ms = {k: 1000 * v / episodes for k, v in times.items()}
    return {
        "stages": ms,
        "loader": 1000 * total / episodes,
        "device_augmentation": 1000 * device_aug / episodes
        if getattr(dm, "augment_on_device", False)
        else None,
        "episodes": episodes,
        "mean_support": sum(sizes) / len(sizes),
        "pinned": pin,
    }


def _support_size(batch: dict) -> int:
    if "support_images" in batch:
        return batch["support_images"].shape[1]
    return batch["images"].shape[1] - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", help="NAME=CONFIG[,KEY=VALUE...] (repeatable)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per recipe")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args()
    recipes = [parse_recipe(r) for r in args.recipe or DEFAULT_RECIPES]
    results = []
    for name, config, overrides in recipes:
        dm, data = build(config, overrides)
        print(f"{name}: {config} {overrides or ''}", flush=True)
        results.append((name, config, overrides, data, measure(dm, args.batches, args.warmup)))
    lines = [
        f"Loader CPU time per training episode (ms of one core, process CPU time, "
        f"num_workers=0, {args.batches} batches after {args.warmup} warm-up); "
        f"{cpu_name()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "",
        "| stage | " + " | ".join(r[0] for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for stage in STAGES:
        cells = []
        for *_, m in results:
            if stage == "pinning" and not m["pinned"]:
                cells.append("n/a (no CUDA)")
            else:
                cells.append(f"{m['stages'].get(stage, 0.0):.2f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append(
        "| **loader total** | " + " | ".join(f"**{r[-1]['loader']:.2f}**" for r in results) + " |"
    )
    dev = [r[-1]["device_augmentation"] for r in results]
    lines.append(
        "| device augmentation (after transfer, here on this CPU; not loader time) | "
        + " | ".join("-" if d is None else f"{d:.2f}" for d in dev)
        + " |"
    )
    lines.append(
        "| mean S of the timed batches | "
        + " | ".join(f"{r[-1]['mean_support']:.1f}" for r in results)
        + " |"
    )
    lines.append("")
    for name, config, overrides, data, m in results:
        lines.append(
            f"- {name}: {config} {overrides or ''} -- R={data.get('resolution')}, "
            f"B={data.get('batch_size')}, S={data.get('support_size')}, "
            f"augment={data.get('augment')}, synthetic_store={data.get('synthetic_store')}, "
            f"augment_on_device={data.get('augment_on_device', False)}, {m['episodes']} episodes"
        )
    emit("\n".join(lines), args.out)
    print(f"loader: {results[0][-1]['loader']:.2f} ms CPU per episode")


if __name__ == "__main__":
    main()
