"""``prep build`` / ``evaluate`` on Dask (``--scheduler``), ``prep hash``, and faults.

The cluster tests start a real ``dask scheduler`` and two ``dask worker`` processes on
localhost over TCP (``tests/dask_cluster.py``), from their own folder, and tear them down
whatever happens; they are marked slow (each pays the workers' start and their first import
of torch and MONAI). The fast tests need no cluster: dask stays unimported without a
scheduler, an unreachable one is exit 2, and the digest.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from dask_cluster import DaskCluster
from fixtures_data import break_case, write_folder2d, write_nnunet
from test_prep_reliability import _dummy_layout, _Tiny2D

from data_prep.pipeline import DatasetJob, build_corpus, job_from_spec
from data_prep.specs import DatasetSpec, spec_from_path
from data_prep.store_writer import memory_case
from megaseg.cli.prep import main as prep

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("MEGASEG_SCHEDULER", None)
RES = ["--resolutions", "32", "--no-progress"]


def digest(corpus: Path) -> str:
    from data_prep.digest import corpus_digest

    return corpus_digest(corpus)[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- without a scheduler: nothing changes, and dask is not imported ------------------------------

NO_DASK = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from fixtures_data import write_nnunet
from megaseg.cli.prep import main as prep
tmp = Path({tmp!r})
root = write_nnunet(tmp, n_cases=2, channels=("CT",))
assert prep(["build", str(root), "--out", str(tmp / "c"), "--resolutions", "16",
             "--no-progress"]) == 0
assert prep(["hash", str(tmp / "c")]) == 0
from megaseg import Segmenter, create_model
from megaseg.evaluation import SyntheticSource, evaluate
seg = Segmenter(create_model("universeg_v1", encoder_widths=(8, 8, 8, 8)), 32, "cpu")
evaluate(seg, SyntheticSource(1), support_sizes=(1,), draws_per_n=1, max_queries=1,
         methods=["megaseg", "mean_label"], training_datasets=[], progress=False)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed"))
assert not loaded, loaded
print("no dask")
"""


def test_without_a_scheduler_dask_is_never_imported(tmp_path):
    code = NO_DASK.format(tests=str(REPO / "tests"), tmp=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "no dask" in done.stdout, done.stderr[-3000:]


def test_unreachable_scheduler_is_exit_2_naming_it_with_nothing_written(
    tmp_path, capsys, monkeypatch
):
    import dask

    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    before = sorted(p.name for p in tmp_path.iterdir())
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert prep(["build", str(root), "--out", str(tmp_path / "c"), "--scheduler", address,
                     *RES]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert f"--scheduler {address}: cannot reach the Dask scheduler" in err
        # $MEGASEG_SCHEDULER when no --scheduler is given; evaluate refuses the same way
        monkeypatch.setenv("MEGASEG_SCHEDULER", address)
        assert prep(["build", str(root), "--out", str(tmp_path / "c"), *RES]) == 2
        from megaseg.cli.evaluate import main as evaluate_main

        ckpt = str(REPO / "checkpoints" / "megaseg_small_synth64.safetensors")
        code = evaluate_main(["--checkpoint", ckpt, "--synthetic-tasks", "1", "--support-sizes",
                              "1", "--draws-per-n", "1", "--max-queries", "1", "--methods",
                              "mean_label", "--out", str(tmp_path / "eval"), "--no-progress"])  # fmt: skip
    assert code == 2
    assert f"--scheduler {address}: cannot reach the Dask scheduler" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no corpus, no eval folder


def test_workers_with_a_scheduler_and_a_bad_local_cluster_are_refused(tmp_path, capsys):
    root = write_nnunet(tmp_path, n_cases=2, channels=("CT",))
    out = tmp_path / "c"
    assert prep(["build", str(root), "--out", str(out), "--workers", "2",
                 "--scheduler", "local:2", *RES]) == 2  # fmt: skip
    assert "--workers sets the local process pool" in capsys.readouterr().err
    assert prep(["build", str(root), "--out", str(out), "--scheduler", "local:0", *RES]) == 2
    assert "expected local:N with N >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_build_help_states_the_shared_filesystem_and_the_scheduler(capsys):
    with pytest.raises(SystemExit):
        prep(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--scheduler ADDRESS" in text and "local:N" in text
    assert "on a filesystem the workers share with this machine, at the same absolute paths" in (
        text
    )


def test_workers_that_cannot_run_this_megaseg_are_refused_naming_the_address():
    from megaseg.cluster import SchedulerError, _check_workers, _versions

    class Client:
        def __init__(self, answer):
            self.answer = answer

        def run(self, function):
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    _check_workers("tcp://h:1", Client({"tcp://w:2": _versions()}))  # the same: accepted
    for answer, reason in [
        (ModuleNotFoundError("No module named 'megaseg'"), "a worker cannot run megaseg"),
        ({"tcp://w:2": {**_versions(), "megaseg": "0.0.1"}}, "worker tcp://w:2 runs"),
    ]:
        with pytest.raises(SchedulerError, match=f"--scheduler tcp://h:1: {reason}"):
            _check_workers("tcp://h:1", Client(answer))


def test_a_task_of_a_stopped_cluster_build_writes_nothing(tmp_path):
    """A task still running for a killed client, after another build of the corpus started
    (a new token in .build/run.json), writes no shard and no skip record."""
    from data_prep.pipeline import StaleBuild, _run_case_in_cluster

    run = tmp_path / ".build" / "run.json"
    run.parent.mkdir()
    run.write_text("newer build")
    case = memory_case("K", "c0", "s0", {1: "a"})
    spec = DatasetSpec(name="K", reader="folder2d", root=".", layout=_dummy_layout())
    npz, skip = tmp_path / "c0.npz", tmp_path / "c0.skip.json"
    setup = (([spec], [_Tiny2D("none")], (16,), False, None), (run, "stopped build"))
    with pytest.raises(StaleBuild, match="not this build's token any more; nothing written"):
        _run_case_in_cluster(setup, (0, 0, case, npz, skip))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".build"]
    run.write_text("stopped build")  # its own build: the case is written
    assert _run_case_in_cluster(setup, (0, 0, case, npz, skip)) == (0, 0, None) and npz.is_file()


# -- prep hash ----------------------------------------------------------------------------------


def test_prep_hash_is_the_data_not_paths_times_reasons_or_workers(tmp_path, capsys):
    root = write_nnunet(tmp_path / "a", n_cases=4, channels=("CT",))
    break_case(root, "corrupt", "case_002")  # a skip reason names the file by its path
    assert prep(["build", str(root), "--out", str(tmp_path / "c1"), *RES]) == 0
    # the same data elsewhere, with other file times (the pool and clusters: slow tests below)
    copy = shutil.copytree(root, tmp_path / "b" / root.name)
    for f in copy.rglob("*.nii.gz"):
        os.utime(f, (1e9, 1e9))
    assert prep(["build", str(copy), "--out", str(tmp_path / "c2"), *RES]) == 0
    capsys.readouterr()
    assert prep(["hash", str(tmp_path / "c1"), "--datasets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("  Dataset001_Tiny")
    assert lines[1] == f"{digest(tmp_path / 'c1')}  {tmp_path / 'c1'}"
    reasons = [
        (tmp_path / c / "datasets/Dataset001_Tiny/index.json").read_text() for c in ("c1", "c2")
    ]
    assert reasons[0] != reasons[1]  # the reasons name different paths...
    assert digest(tmp_path / "c1") == digest(tmp_path / "c2")  # ...the data is the same
    # one changed voxel is another corpus
    images = tmp_path / "c2" / "datasets" / "Dataset001_Tiny" / "images_32.npy"
    arr = np.load(images)
    arr[0, 0, 0] ^= 1
    np.save(images, arr)
    assert digest(tmp_path / "c1") != digest(tmp_path / "c2")


def test_prep_hash_of_a_folder_that_is_no_corpus_is_exit_2(tmp_path, capsys):
    assert prep(["hash", str(tmp_path)]) == 2
    assert f"{tmp_path / 'manifest.json'}: missing" in capsys.readouterr().err


# -- on a real cluster: a scheduler and two workers over TCP (slow) ------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with DaskCluster(tmp_path_factory.mktemp("dask")) as c:
        yield c
    assert not c.left_behind, c.left_behind


class _SlowLoad:
    """Picklable ``load``: the reader's, after ``seconds`` (a case long enough to be caught
    mid-way by a kill)."""

    def __init__(self, load, seconds: float):
        self.load, self.seconds = load, seconds

    def __call__(self, case):
        time.sleep(self.seconds)
        return self.load(case)


def _kill_a_worker_mid_case(out: Path, cluster: DaskCluster, killed: list, timeout=240):
    """SIGKILL the worker process that a ``.started`` marker names, while it runs that case."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for marker in out.glob(".build/shards/*/*.started"):
            try:
                pid = int(marker.read_text())
            except (OSError, ValueError):
                continue
            if pid in cluster.worker_pids():  # never any other process
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, marker.name))
                return
        time.sleep(0.02)


@pytest.mark.slow
def test_build_on_the_cluster_equals_the_local_pool_and_local_n(tmp_path, cluster, monkeypatch,
                                                                capsys):  # fmt: skip
    write_nnunet(tmp_path, n_cases=6, channels=("CT",))
    monkeypatch.chdir(tmp_path)  # relative paths here; the workers run from their own folder
    base = ["build", "Dataset001_Tiny", *RES]
    assert prep([*base, "--out", "remote", "--scheduler", cluster.address]) == 0
    err = capsys.readouterr().err
    assert f"Dask scheduler {cluster.address}: 2 workers, 2 threads" in err
    assert "megaseg: Dask dashboard http://127.0.0.1:" in err
    assert prep([*base, "--out", "pool", "--workers", "2"]) == 0
    assert prep([*base, "--out", "local_n", "--scheduler", "local:2"]) == 0
    assert digest(Path("remote")) == digest(Path("pool")) == digest(Path("local_n"))
    # nothing outside --out: the folder holds the dataset and the three corpora only
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "Dataset001_Tiny", "local_n", "pool", "remote"
    ]  # fmt: skip
    assert not list(Path("remote").glob(".build"))


@pytest.mark.slow
def test_worker_killed_mid_case_loses_nothing(tmp_path, cluster):
    root = write_nnunet(tmp_path, n_cases=6, channels=("CT",))
    spec = spec_from_path(root)
    local = job_from_spec(spec, root)
    build_corpus([local], tmp_path / "local", resolutions=(32,), progress=False)
    slow = DatasetJob(local.spec, local.cases, _SlowLoad(local.load, 1.0))
    killed: list = []
    killer = threading.Thread(target=_kill_a_worker_mid_case,
                              args=(tmp_path / "remote", cluster, killed))  # fmt: skip
    killer.start()
    try:
        summary = build_corpus([slow], tmp_path / "remote", resolutions=(32,), progress=False,
                               scheduler=cluster.address)  # fmt: skip
    finally:
        killer.join()
    assert killed, "no worker was caught mid-case"
    assert summary.ok and summary.written == {spec.name: 6} and not summary.skipped[spec.name]
    assert digest(tmp_path / "remote") == digest(tmp_path / "local")
    cluster.wait_for_workers()  # the nanny has restarted it


@pytest.mark.slow
def test_case_that_kills_its_worker_twice_is_skipped_and_named_as_locally(tmp_path, cluster):
    cases = [memory_case("K", f"c{i}", f"s{i}", {1: "a"}) for i in range(6)]
    spec = DatasetSpec(name="K", reader="folder2d", root=".", layout=_dummy_layout())
    job = DatasetJob(spec, cases, _Tiny2D("c2"), fingerprint=lambda c: "v1")
    summaries = [
        build_corpus([job], tmp_path / out, resolutions=(16,), progress=False, **kw)
        for out, kw in (("remote", {"scheduler": cluster.address}), ("pool", {"workers": 2}))
    ]
    for summary in summaries:
        assert summary.ok and summary.written == {"K": 5}
        assert summary.skipped["K"] == [(
            "c2",
            "<memory>/K/c2: the worker process died while processing this case (killed by "
            "the OS, e.g. out of memory, or a crash in a file reader)",
        )]  # fmt: skip
    assert digest(tmp_path / "remote") == digest(tmp_path / "pool")
    cluster.wait_for_workers()


@pytest.mark.slow
def test_evaluation_on_the_cluster_gives_the_local_numbers(tmp_path, cluster, monkeypatch,
                                                           capsys):  # fmt: skip
    import torch

    from megaseg import create_model, save_checkpoint
    from megaseg.cli.evaluate import main as evaluate_main

    root = write_folder2d(tmp_path / "raw", name="Skin2D", n_cases=12)
    assert prep(["build", str(root), "--out", str(tmp_path / "corpus"), "--resolutions", "32",
                 "--no-progress"]) == 0  # fmt: skip
    torch.manual_seed(0)
    model = create_model("universeg_v1", encoder_widths=(8, 8, 8, 8))
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, {
        "model": {"name": "universeg_v1", "kwargs": {"encoder_widths": (8, 8, 8, 8)}},
        "resolution": 32, "training_datasets": [],
    })  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a relative --corpus: the workers read it from elsewhere
    args = ["--checkpoint", str(ckpt), "--corpus", "corpus", "--datasets", "Skin2D",
            "--synthetic-tasks", "2", "--support-sizes", "1", "2", "--draws-per-n", "2",
            "--max-queries", "3", "--methods", "megaseg", "mean_label", "random_init",
            "--no-progress", "--bootstrap", "100"]  # fmt: skip
    assert evaluate_main([*args, "--out", "local"]) == 0
    assert evaluate_main([*args, "--out", "remote", "--scheduler", cluster.address]) == 0
    assert f"Dask scheduler {cluster.address}" in capsys.readouterr().err

    def table(out: str, name: str, drop=("call_seconds",)) -> list[dict]:
        with open(Path(out) / name) as f:
            return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]

    local = table("local", "predictions.csv")
    assert len(local) > 20 and {r["dataset"] for r in local} == {"Skin2D", "synthetic"}
    assert table("remote", "predictions.csv") == local
    assert table("remote", "summary.csv") == table("local", "summary.csv")


SLOW_LOAD_BUILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_cluster import _SlowLoad
from data_prep.pipeline import DatasetJob, build_corpus, job_from_spec
from data_prep.specs import spec_from_path
from megaseg.cluster import SchedulerError
job = job_from_spec(spec_from_path({root!r}), {root!r})
job = DatasetJob(job.spec, job.cases, _SlowLoad(job.load, {seconds}))
scheduler = {scheduler!r} or None
try:
    summary = build_corpus([job], {out!r}, resolutions=(32,), progress=False,
                           scheduler=scheduler, workers=2)
except SchedulerError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
print(summary.text())
"""


def _build_process(root: Path, out: Path, scheduler: str = "", seconds: float = 0.5):
    """A build in a process of its own (to be killed), its cases slowed down by ``seconds``."""
    code = SLOW_LOAD_BUILD.format(tests=str(REPO / "tests"), root=str(root), out=str(out),
                                  scheduler=scheduler, seconds=seconds)  # fmt: skip
    env = ENV | {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _wait_for_shards(out: Path, n: int, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob(".build/shards/*/*.npz"))) < n:
        if proc.poll() is not None:
            pytest.fail(f"the build ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_lost_scheduler_is_exit_2_and_builds_resume_across_local_and_cluster(tmp_path,
                                                                             cluster):  # fmt: skip
    root = write_nnunet(tmp_path, n_cases=12, channels=("CT",))
    reference = tmp_path / "reference"
    build_corpus([job_from_spec(spec_from_path(root), root)], reference, resolutions=(32,),
                 progress=False)  # fmt: skip
    # 1. the scheduler dies mid-build: exit 2 naming it; the finished shards stay
    with DaskCluster(tmp_path / "doomed") as doomed:
        out = tmp_path / "a"
        proc = _build_process(root, out, doomed.address)
        _wait_for_shards(out, 2, proc)
        os.kill(doomed.scheduler.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        assert f"--scheduler {doomed.address}: lost the connection to the Dask scheduler" in err
        assert not (out / "manifest.json").exists()
        finished = len(list(out.glob(".build/shards/*/*.npz")))
    assert not doomed.left_behind, doomed.left_behind
    # ...and a local rerun resumes from them
    proc = _build_process(root, out, seconds=0)
    text, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"(done by an earlier run: {finished})" in text and finished >= 2
    assert digest(out) == digest(reference)
    # 2. a local build killed mid-way resumes on the cluster
    out = tmp_path / "b"
    proc = _build_process(root, out)
    _wait_for_shards(out, 2, proc)
    proc.kill()
    proc.communicate()
    finished = len(list(out.glob(".build/shards/*/*.npz")))
    proc = _build_process(root, out, cluster.address, seconds=0)
    text, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"(done by an earlier run: {finished})" in text
    assert digest(out) == digest(reference)


@pytest.mark.slow
def test_kill_9_of_a_local_n_build_leaves_no_process(tmp_path):
    psutil = pytest.importorskip("psutil")
    root = write_nnunet(tmp_path, n_cases=12, channels=("CT",))
    out = tmp_path / "c"
    proc = _build_process(root, out, "local:2")
    _wait_for_shards(out, 1, proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2  # the two workers (and their resource tracker)
    proc.kill()
    proc.communicate()
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, [" ".join(p.cmdline())[-80:] for p in alive]
