"""How far each learning test's result lies from its bound, over runs that differ only as
another CPU would make them differ.

    python benchmarks/learning_margins.py support      # tests/test_support_path.py
    python benchmarks/learning_margins.py support_300  # that test before #12 (300 steps)
    python benchmarks/learning_margins.py support_curve  # its gap every 100 steps to 800
    python benchmarks/learning_margins.py supervised   # test_baselines: supervised U-Net learns
    python benchmarks/learning_margins.py attention    # test_attention: a variant trains
    python benchmarks/learning_margins.py ci_tiny      # test_train_cli: ci_tiny learns (slow)
    python benchmarks/learning_margins.py report       # the table, from the results so far

A learning test passes on one machine and fails on another when its single training run sits
near the bound: a different float32 summation order (AVX2 vs AVX-512 kernels, 1 vs 2 threads,
the fast vs the published forward path) changes the last bits of the first step, and a few
hundred steps of training amplify that into a different run. Each check is rerun here under
such perturbations:

- ``eps k``: every weight plus N(0, (1e-6 std)^2) right after init (perturbation seed k) --
  the size of a float32 rounding difference, nothing more;
- ``threads 2``: two intra-op threads instead of one (other reduction splits);
- ``avx2``: ATen's and oneDNN's AVX2 kernels on a CPU that has AVX-512 (other vector widths);
- ``naive``: the published forward path (``fast=False``) instead of the fast one;
- ``seed s``: another init/data seed (a larger change, for scale).

Each run appends one JSON line to ``docs/results/learning_margins.jsonl`` (a rerun of
the same check and variant replaces it in the report); ``report`` prints per check the tested
quantities' minimum and median against the bound and writes
``docs/results/learning_margins.md``. Every check calls the test module's own functions,
so what is measured is what the test runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]
OUT = REPO / "docs" / "results"
JSONL = OUT / "learning_margins.jsonl"

from learning import perturb_  # noqa: E402  (tests/learning.py)

EPS = 1e-6
# variant name -> keyword arguments of the check's run function
VARIANTS = {
    "base": {},
    "eps 1": {"perturb": EPS, "perturb_seed": 1},
    "eps 2": {"perturb": EPS, "perturb_seed": 2},
    "eps 3": {"perturb": EPS, "perturb_seed": 3},
    "eps 4": {"perturb": EPS, "perturb_seed": 4},
    "threads 2": {"threads": 2},
    "naive": {"fast": False},
    # the kernels of a CPU without AVX-512 (as on the machine of #12), in a child process
    "avx2": {"env": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}},
    "seed 1": {"seed": 1},
    "seed 2": {"seed": 2},
    "seed 3": {"seed": 3},
    "seed 4": {"seed": 4},
}


def _threads(n: int):
    class _Ctx:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)

    return _Ctx()


def run_support(seed=0, perturb=0.0, perturb_seed=0, threads=1, fast=True) -> dict:
    """The test as it is: the step at which the labels are read."""
    import test_support_path as t

    with _threads(threads):
        r = t.steps_to_read_support(
            seed=seed, perturb=perturb, perturb_seed=perturb_seed, fast=fast
        )
    return {"step": r["step"], "right": r["right"], "gap": r["gap"], "reached": r["reached"]}


def run_support_300(seed=0, perturb=0.0, perturb_seed=0, threads=1, fast=True) -> dict:
    """The test before #12: scores after a fixed 300 steps."""
    import test_support_path as t

    with _threads(threads):
        return t.margins(
            steps=300, seed=seed, perturb=perturb, perturb_seed=perturb_seed, fast=fast
        )


def run_support_curve(seed=0, perturb=0.0, perturb_seed=0, threads=1, fast=True) -> dict:
    """The support check's gap (right - swapped Dice) every 100 steps up to 800."""
    import test_support_path as t

    curve = {}

    def after_step(step, model):
        if step % 100 == 0:
            right, swapped = t.score(model.eval())
            model.train()
            curve[f"gap@{step}"], curve[f"right@{step}"] = right - swapped, right

    with _threads(threads):
        t.train(800, seed=seed, perturb=perturb, perturb_seed=perturb_seed, fast=fast,
                after_step=after_step)  # fmt: skip
    return curve


def run_supervised(seed=0, perturb=0.0, perturb_seed=0, threads=1, fast=True) -> dict:
    import test_baselines as t

    with _threads(threads):
        return t.supervised_scores(seed=seed, perturb=perturb, perturb_seed=perturb_seed)


def run_attention(seed=0, perturb=0.0, perturb_seed=0, threads=1, fast=True) -> dict:
    import test_attention as t

    with _threads(threads):
        return t.variant_losses(seed=seed, perturb=perturb, perturb_seed=perturb_seed, fast=fast)


def run_ci_tiny(seed=0, perturb=0.0, perturb_seed=0, threads=1, fast=True) -> dict:
    """``megaseg fit --config configs/ci_tiny.yaml`` in a subprocess, then the test's scores."""
    import tempfile

    import test_train_cli as t

    root = Path(tempfile.mkdtemp(prefix="margins_ci_tiny_"))
    args = [sys.executable, "-m", "megaseg.cli", "fit", "--config", t.CI_TINY,
            "--trainer.default_root_dir", str(root), "--seed_everything", str(seed),
            "--data.seed", str(seed)]  # fmt: skip
    if not fast:
        args += ["--model.model_kwargs", json.dumps({"encoder_widths": [16] * 4, "fast": False})]
    if perturb:
        extra = root / "perturb.yaml"
        extra.write_text(
            "trainer:\n  callbacks:\n    - class_path: learning_margins.PerturbAtStart\n"
            f"      init_args: {{scale: {perturb}, seed: {perturb_seed}}}\n"
        )
        args += ["--config", str(extra)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO)])}  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    scores = t.heldout_scores(root / "export" / "final.safetensors")
    return {**scores, "gain": scores["dice"] - scores["baseline"],
            "drop": scores["dice"] - scores["dice_swapped"]}  # fmt: skip


try:
    from pytorch_lightning import Callback

    class PerturbAtStart(Callback):
        """``perturb_`` on the network before the first step (used by ``run_ci_tiny``)."""

        def __init__(self, scale: float, seed: int):
            self.scale, self.seed = scale, seed

        def on_fit_start(self, trainer, pl_module):
            perturb_(pl_module, self.scale, self.seed)

except ImportError:  # pragma: no cover
    pass


CHECKS = {
    "support": (run_support, list(VARIANTS)),
    "support_300": (run_support_300, list(VARIANTS)),
    "support_curve": (run_support_curve, list(VARIANTS)),
    "supervised": (run_supervised, [v for v in VARIANTS if v != "naive"]),
    "attention": (run_attention, list(VARIANTS)),
    "ci_tiny": (run_ci_tiny, ["base", "eps 1", "threads 2", "seed 1"]),
}


# what each check's test asserts (the bound the margins are measured against)
BOUNDS = {
    "support": "test_support_path: right >= 0.8 and gap >= 0.6 reached within 2000 steps",
    "support_300": "test_support_path before #12: right >= 0.7, gap >= 0.3 after 300 steps",
    "support_curve": "test_support_path: gap >= 0.6 (and right >= 0.8) within 2000 steps",
    "supervised": "test_baselines: learned > 0.7, gain > 0.3",
    "attention": "test_attention: ratio (last / first loss) < 0.7",
    "ci_tiny": "test_train_cli: gain (dice - baseline) >= 0.15, drop (dice - dice_swapped) >= 0.1,"
    " empty < 0.2",
}


def measure(check: str, variants: list[str]) -> None:
    fn, default = CHECKS[check]
    OUT.mkdir(parents=True, exist_ok=True)
    for name in variants or default:
        kwargs = dict(VARIANTS[name])
        env = kwargs.pop("env", None)
        if env and not os.environ.get("MARGINS_CHILD"):  # env read at import: a fresh process
            child = {**os.environ, **env, "MARGINS_CHILD": "1"}
            subprocess.run([sys.executable, __file__, check, name], env=child, check=True)
            continue
        start = time.time()
        result = fn(**kwargs)
        row = {"check": check, "variant": name, "seconds": round(time.time() - start, 1),
               "isa": torch.backends.cpu.get_cpu_capability(),
               **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}}  # fmt: skip
        print(json.dumps(row), flush=True)
        with JSONL.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def report() -> str:
    from machine import cpu_name

    rows: dict[tuple[str, str], dict] = {}
    for line in JSONL.read_text().splitlines():
        row = json.loads(line)
        rows[row["check"], row["variant"]] = row  # a rerun replaces
    isa = torch.backends.cpu.get_cpu_capability()
    out = [f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({isa}"
           " kernels unless the variant says avx2). Variants: see the script's docstring;"
           " s: wall seconds on a machine shared with other jobs.", ""]  # fmt: skip
    for check in CHECKS:
        runs = [r for (c, _), r in rows.items() if c == check]
        for r in runs:  # rows written before gain / drop were recorded
            if check == "ci_tiny":
                r.setdefault("gain", r["dice"] - r["baseline"])
                r.setdefault("drop", r["dice"] - r["dice_swapped"])
        if not runs:
            continue
        keys = [k for k in runs[0] if k not in ("check", "variant", "seconds", "isa")]
        if any("@" in k for k in keys):  # a learning curve: the tested quantity only
            keys = [k for k in keys if k.startswith("gap@")]
            for r in runs:  # the test's stopping rule (RIGHT, GAP), and what came after it
                import test_support_path as t

                steps = [int(k[4:]) for k in keys]
                hit = [n for n in steps if r[f"right@{n}"] >= t.RIGHT and r[f"gap@{n}"] >= t.GAP]
                r["reads@"] = hit[0] if hit else None
                r["min gap after"] = (
                    min(r[f"gap@{n}"] for n in steps if n >= hit[0]) if hit else None
                )
            keys += ["reads@", "min gap after"]
        out += [f"### {check}", "", f"Bound: {BOUNDS[check]}.", "", "| variant | " + " | ".join(keys) + " | s |",
                "|---" * (len(keys) + 2) + "|"]  # fmt: skip
        for r in runs:
            out.append(f"| {r['variant']} | " + " | ".join(_fmt(r[k]) for k in keys)
                       + f" | {r['seconds']} |")  # fmt: skip
        stats = []
        for k in keys:
            vals = [
                r[k] for r in runs if isinstance(r[k], (int, float)) and not isinstance(r[k], bool)
            ]
            if vals:
                lo, mid, hi = min(vals), statistics.median(vals), max(vals)
                stats.append(f"{k}: min {lo:.3g}, median {mid:.3g}, max {hi:.3g}")
        out += ["", "; ".join(stats) + f" ({len(runs)} runs)", ""]
    text = "\n".join(out)
    (OUT / "learning_margins.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=[*CHECKS, "report"])
    parser.add_argument("variants", nargs="*", help=f"default: all of {list(VARIANTS)}")
    args = parser.parse_args()
    if args.check == "report":
        print(report())
    else:
        torch.set_num_threads(1)
        measure(args.check, args.variants)


if __name__ == "__main__":
    main()
