"""What a user sees from the commands: quick help, the CPU thread choice, the learning-rate
schedule of a shortened run, the paths each run wrote, and no third-party noise.

The end-to-end checks share one tiny ``megaseg fit`` (4 steps of ``configs/ci_tiny.yaml``) and
a ``test`` and ``predict`` from its checkpoint, run as subprocesses with warnings enabled.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from megaseg.cli import config_summaries, main
from megaseg.training.threads import auto_workers, plan_cpu

REPO = Path(__file__).resolve().parents[1]
CI_TINY = str(REPO / "configs" / "ci_tiny.yaml")
NOISE = (
    "litlogger",
    "LeafSpec",
    "dirpath has changed",
    "Couldn't infer the batch indices",
    "smaller than the logging interval",
)


# -- help ------------------------------------------------------------------------------------

HELP_WITHOUT_TORCH = """
import sys
from megaseg.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # argparse's --help
    code = e.code
assert code == 0, code
assert "torch" not in sys.modules, "help imported torch"
"""


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict", "demo", "show-episodes"])
def test_help_does_not_import_torch(command):
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, command, "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"megaseg {command}" in proc.stdout


def test_training_help_leads_with_configs_overrides_and_outputs(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: megaseg fit --config")
    flat = " ".join(out.split())
    for name, summary in config_summaries(REPO / "configs"):  # whole, wrapped: never cut
        assert f"{name}  " in out and summary and summary in flat and not summary.endswith("...")
    for text in ("--trainer.max_steps", "--ckpt_path", "--cpu_threads", "--help-all",
                 "lightning_logs/version_N/metrics.csv", "export/final.safetensors"):  # fmt: skip
        assert text in out, text
    assert len(out.splitlines()) < 60


def test_help_all_asks_lightning_for_its_full_help(monkeypatch):
    seen = []
    monkeypatch.setattr("megaseg.cli._load", lambda target: seen.append(target) or seen.append)
    main(["test", "--config", CI_TINY, "--help-all"])
    assert seen == ["megaseg.cli.train:lightning_main", ["test", "--config", CI_TINY, "--help"]]


# -- CPU threads -----------------------------------------------------------------------------


def test_cpu_plan_shares_the_cores_between_threads_and_workers():
    two = plan_cpu(workers=None, cores=2, environ={})
    assert (two.threads, two.workers) == (1, 1)
    assert "1 intra-op thread + 1 data-loader worker on 2 cores" in two.describe(2)
    assert (plan_cpu(workers=0, cores=2, environ={}).threads) == 2  # configured: kept
    big = plan_cpu(workers=None, cores=16, environ={})
    assert big.threads + big.workers <= 16 and big.workers == auto_workers(16) >= 1
    ddp = plan_cpu(workers=None, processes=2, cores=4, environ={})
    assert (ddp.threads + ddp.workers) * 2 <= 4
    assert plan_cpu(workers=None, cores=1, environ={}).workers == 0


def test_cpu_plan_leaves_a_users_choice_alone():
    omp = plan_cpu(workers=1, cores=2, environ={"OMP_NUM_THREADS": "3"})
    assert omp.threads is None and "(OMP_NUM_THREADS=3)" in omp.describe(3)
    forced = plan_cpu(workers=None, cpu_threads=2, cores=2, environ={"OMP_NUM_THREADS": "1"})
    assert forced.threads == 2 and "(--cpu_threads)" in forced.describe(1)
    with pytest.raises(ValueError, match="cpu_threads"):
        plan_cpu(workers=None, cpu_threads=0, cores=2, environ={})


# -- learning-rate schedule ------------------------------------------------------------------


def _module_with_schedule(**schedule):
    from functools import partial

    from megaseg.training import InContextSegModule, WarmupCosine

    module = InContextSegModule(
        model_kwargs={"encoder_widths": [4, 4]},
        optimizer=partial(torch.optim.SGD, lr=1.0),
        lr_scheduler=partial(WarmupCosine, **schedule),
        resolution=32,
        support_size=2,
    )
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=100)  # max_steps 100
    return module


def test_schedule_follows_the_trainers_steps_with_warmup_capped():
    scheduler = _module_with_schedule(warmup_steps=150, min_factor=0.1).configure_optimizers()[
        "lr_scheduler"
    ]["scheduler"]
    assert scheduler.total_steps == 100 and scheduler.warmup_steps == 20  # 20% of 100, not 150
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # start_factor
    lrs = []
    for _ in range(100):
        scheduler.optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[19] == pytest.approx(1.0)  # warm-up over: the full learning rate
    assert lrs[-1] == pytest.approx(0.1)  # decayed to min_factor at the run's last step


def test_an_explicit_total_is_kept_and_capped_too():
    scheduler = _module_with_schedule(warmup_steps=150, total_steps=500).configure_optimizers()[
        "lr_scheduler"
    ]["scheduler"]
    assert (scheduler.total_steps, scheduler.warmup_steps) == (500, 100)


# -- a tiny run, end to end ------------------------------------------------------------------


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # warnings shown
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "megaseg.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A 4-step fit with ci_tiny's own logging interval (10), then test and predict."""
    root = tmp_path_factory.mktemp("run")
    common = ["--config", CI_TINY, "--trainer.default_root_dir", str(root),
              "--data.batch_size", "2", "--data.val_batches", "1", "--data.val_batch_size", "2",
              "--data.test_batches", "1"]  # fmt: skip
    fit = _run(["fit", *common, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"])
    ckpt = ["--ckpt_path", str(root / "checkpoints" / "last.ckpt")]
    return root, {"fit": fit, "test": _run(["test", *common, *ckpt]),
                  "predict": _run(["predict", *common, *ckpt])}  # fmt: skip


def _written(stdout: str, command: str) -> dict[str, Path]:
    """``name -> path`` from the closing ``megaseg COMMAND wrote:`` lines."""
    tail = stdout.split(f"megaseg {command} wrote:\n")[-1]
    return {m[1]: Path(m[2]) for m in re.finditer(r"^  ([a-z ]+):\s+(\S+)", tail, re.M)}


def test_a_run_ends_with_the_paths_it_wrote(tiny_runs):
    root, procs = tiny_runs
    fit = _written(procs["fit"].stdout, "fit")
    assert fit["checkpoints"] == (root / "checkpoints" / "last.ckpt").resolve()
    assert fit["weights"] == (root / "export" / "final.safetensors").resolve()
    assert fit["metrics"] == (root / "lightning_logs" / "version_0" / "metrics.csv").resolve()
    assert all(path.exists() for path in fit.values()), fit
    pred = _written(procs["predict"].stdout, "predict")
    assert pred["predictions"] == (root / "predictions").resolve()
    assert list(pred["predictions"].glob("*.npz"))
    test = _written(procs["test"].stdout, "test")
    assert test["metrics"].is_file() and test["metrics"] != fit["metrics"]


def test_a_short_fit_still_logs_metrics(tiny_runs):
    root, procs = tiny_runs
    with (root / "lightning_logs" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [0, 1, 2, 3]
    assert "logging every 1 steps, not 10: the run has 4 steps" in procs["fit"].stdout


def test_a_cpu_run_says_how_it_uses_the_cores_first(tiny_runs):
    _, procs = tiny_runs
    lines = [x for x in procs["fit"].stdout.splitlines() if x.startswith("megaseg:")]
    assert lines[0].startswith("megaseg: CPU run, 1 intra-op thread (OMP_NUM_THREADS=1) + 0 ")
    assert "WarmupCosine: 0 warm-up steps, cosine decay to 0.1 x lr at step 4" in (
        procs["fit"].stdout + procs["fit"].stderr
    )


def test_runs_print_no_third_party_noise(tiny_runs):
    _, procs = tiny_runs
    for command, proc in procs.items():
        for text in NOISE:
            assert text not in proc.stdout + proc.stderr, (command, text)


# -- default output folders ------------------------------------------------------------------


def test_show_episodes_writes_under_the_work_folder_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEGASEG_WORK", str(tmp_path / "work"))
    assert main(["show-episodes", "--episodes", "1", "--support", "1", "--size", "32"]) == 0
    png = (tmp_path / "work" / "episodes.png").resolve()
    assert capsys.readouterr().out.strip() == f"megaseg show-episodes wrote: {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
