"""Issue #21's input pipeline: synthetic tasks stored once and read like a corpus, augmentation
deferred to the training device (uint8 batches), power-of-two support sizes, exact resume."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from megaseg.data.augment import EpisodeAugment
from megaseg.data.store import Corpus, TaskKey
from megaseg.data.tasks import (
    CorpusTaskSource,
    EpisodeSampler,
    EpisodeStream,
    SyntheticTaskSource,
    finish_batch,
    support_buckets,
)

R = 32
TASKS, SUBJECTS = 2, 8


def _small_maps(size: int) -> torch.Tensor:
    """Three label maps ``(3, size, size)`` uint8 (values 0-3): bands and discs, built in
    microseconds instead of the MNI152 template's seconds."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    maps = torch.stack(
        [(r < size / 3).long() + (r < size / 6).long(), 1 + (xx * 3) // size, 1 + (yy * 3) // size]
    )
    return maps.clamp(0, 3).to(torch.uint8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A synthetic v2 store (2 tasks x 8 subjects at 32 px) written by ``prep synth``'s code."""
    from data_prep import card, label_maps
    from data_prep.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(label_maps, "label_maps", lambda name, size: _small_maps(size))
        mp.setattr(card, "write_preview", lambda *a, **k: None)  # a PNG: 4 of the 4.5 s
        summary = write_synthetic(
            root, TASKS, SUBJECTS, resolutions=(R,), generator_version=2, progress=False
        )
    assert summary.ok
    return root


def _generator():
    from megaseg.data.synthetic.v2 import SyntheticTasksV2
    from megaseg.data.synthetic.versions import make_config

    config = make_config(2, {"num_subjects": SUBJECTS}, size=R)

    return SyntheticTasksV2(TASKS, 0, config, label_maps=_small_maps(R))


def test_stored_synthetic_tasks_are_the_generators_output(store):
    """Every stored example, in every split, hashes to the generator's output rounded to
    uint8: the store is a copy of the on-the-fly tasks, not an approximation of them."""
    corpus = Corpus(store)
    tasks = _generator()
    stored, expected, examples = hashlib.sha256(), hashlib.sha256(), 0
    for split in ("train", "val", "test"):
        for key in corpus.tasks(split):
            task, label = int(key.group.removeprefix("task")), int(key.label.removeprefix("label"))
            n = corpus.num_examples(key, split)
            images, labels = corpus.load_many(key, range(n), R, split, raw=True)
            stored.update(images.tobytes() + labels.tobytes())
            subjects = [int(s.split("_s")[1]) for s in corpus.subjects(key, split)]
            gen_images, gen_labels = tasks.batch(task, label, subjects)
            quantized = (np.rint(gen_images.numpy() * 255).astype(np.uint8),
                         np.rint(gen_labels.numpy() * 255).astype(np.uint8))  # fmt: skip
            expected.update(quantized[0].tobytes() + quantized[1].tobytes())
            examples += n
    assert examples >= TASKS * SUBJECTS  # one example per subject and label at least
    assert stored.hexdigest() == expected.hexdigest()


def test_raw_load_is_the_float_load_before_conversion(store):
    corpus = Corpus(store)
    key = corpus.tasks("train")[0]
    raw = corpus.load_many(key, [0, 1], R, "train", raw=True)
    unit = corpus.load_many(key, [0, 1], R, "train")
    assert raw[0].dtype == np.uint8
    batch = finish_batch(
        {"query": torch.from_numpy(raw[0]), "query_label": torch.from_numpy(raw[1])}, None
    )
    assert torch.equal(batch["query"], torch.from_numpy(unit[0]))
    assert torch.equal(batch["query_label"], torch.from_numpy(unit[1]))


def _datamodule(store, **kw):
    from megaseg.training.datamodule import EpisodeDataModule

    args = dict(
        synthetic_version=2, synthetic_tasks=TASKS, synthetic_store=str(store), resolution=R,
        support_size=(2, 4), batch_size=3, augment="reference", num_workers=0,
        synthetic_config={"num_subjects": SUBJECTS},
    )  # fmt: skip
    args.update(kw)
    return EpisodeDataModule(**args)


def test_fit_reads_synthetic_episodes_from_the_store(store):
    dm = _datamodule(store)
    sources, weights = dm.training_sources()
    assert len(sources) == 1 and isinstance(sources[0], CorpusTaskSource)
    assert sources[0].corpus.root == store and sources[0].split == "train"
    batch = next(iter(dm.train_dataloader()))
    assert batch["support_images"].shape[2:] == (1, R, R)
    assert all(t.startswith("synthetic/synthetic-v2/task") for t in batch["task"])


def test_a_store_of_other_tasks_is_refused_with_the_command_to_write_it(store):
    dm = _datamodule(store, synthetic_tasks=5)
    with pytest.raises(ValueError, match=r"holds|written with") as err:
        dm.training_sources()
    assert str(store) in str(err.value) and "prep synth --version 2 --tasks 5" in str(err.value)


def _samplers(sources, **kw):
    common = dict(batch_size=3, support_size=(2, 5), augment=EpisodeAugment(), **kw)
    return EpisodeSampler(sources, **common), EpisodeSampler(sources, defer_augment=True, **common)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if torch.is_tensor(v):
            assert v.dtype == b[k].dtype, k
            torch.testing.assert_close(v, b[k], rtol=0, atol=1e-6, msg=k)
        else:
            assert v == b[k], k


def test_device_augmentation_gives_the_workers_episodes_from_a_store(store):
    source = CorpusTaskSource(Corpus(store), "train", R)
    worker, device = _samplers([source])
    for step in range(4):
        deferred = device.batch(0, 0, 0, step)
        assert deferred["support_images"].dtype == torch.uint8  # a quarter of the bytes to copy
        assert "augment_seed" in deferred
        _assert_same(worker.batch(0, 0, 0, step), finish_batch(deferred, device.augment))


def test_device_augmentation_gives_the_workers_episodes_on_the_fly():
    source = SyntheticTaskSource(_generator())
    worker, device = _samplers([source])
    deferred = device.batch(1, 0, 0, 7)
    assert deferred["query"].dtype == torch.float32  # generated: no uint8 rounding added
    _assert_same(worker.batch(1, 0, 0, 7), finish_batch(deferred, device.augment))


def test_resume_with_device_augmentation_sees_the_uninterrupted_batches(store):
    """Batches 3.. of a stream started at step 3 (a resumed run), augmented after the transfer
    by the datamodule's hook, are the batches 3.. that an uninterrupted worker path makes."""
    dm = _datamodule(store, augment_on_device=True)
    source = CorpusTaskSource(Corpus(store), "train", R)
    source.name = "synthetic"  # as the datamodule names its stored synthetic source
    sampler = dm.train_dataloader().dataset.sampler
    uninterrupted = EpisodeSampler(
        [source], batch_size=3, support_size=(2, 4), augment=dm.augment
    )  # the same draws with the augmentation in the loader
    resumed = iter(EpisodeStream(sampler, dm.seed, 0, start_step=3))
    for step in (3, 4, 5):
        got = dm.on_after_batch_transfer(next(resumed), 0)
        want = uninterrupted.batch(dm.seed, 0, 0, step)
        _assert_same(want, got)


class _TinySource:
    """One task of 100 blank 2x2 examples: support-size draws without data costs."""

    name = "tiny"

    def sample_task(self, rng):
        return TaskKey("tiny", "g", "m", "2d", "0")

    def num_examples(self, key):
        return 100

    def load(self, key, indices):
        return torch.zeros(len(indices), 1, 2, 2), torch.zeros(len(indices), 1, 2, 2)


def test_bucketed_support_sizes_are_uniform_over_powers_of_two():
    """S uniform over {2, 4, 8, 16, 32, 64}: each within 4.5 standard errors of 1/6."""
    assert support_buckets(2, 64) == [2, 4, 8, 16, 32, 64] and support_buckets(3, 40) == [
        4,
        8,
        16,
        32,
    ]
    sampler = EpisodeSampler(
        [_TinySource()], batch_size=1, support_size=(2, 64), support_size_buckets=True,
        support_size_log=True,  # overridden by the buckets
    )  # fmt: skip
    n = 3000
    sizes = [sampler.batch(0, 0, 0, step)["support_images"].shape[1] for step in range(n)]
    values, counts = np.unique(sizes, return_counts=True)
    assert values.tolist() == [2, 4, 8, 16, 32, 64]
    p = 1 / 6
    assert np.all(np.abs(counts / n - p) < 4.5 * np.sqrt(p * (1 - p) / n)), counts
    with pytest.raises(ValueError, match="no power of two"):
        EpisodeSampler([_TinySource()], support_size=(5, 7), support_size_buckets=True)


def test_datamodule_passes_bucketed_sizes_to_the_sampler(store):
    dm = _datamodule(store, support_size=(2, 16), support_size_buckets=True)
    sizes = {
        b["support_images"].shape[1] for b, _ in zip(dm.train_dataloader(), range(12), strict=False)
    }
    assert sizes <= {2, 4, 8, 16} and len(sizes) >= 2


class _BatchLog:
    """A callback keeping, per global step, a digest of the batch the step trained on (after
    the transfer hook, so after the deferred augmentation) and the step's loss."""

    def __init__(self):
        self.batches, self.losses = {}, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        digest = hashlib.sha256()
        for key in ("query", "query_label", "support_images", "support_labels"):
            digest.update(batch[key].detach().cpu().numpy().tobytes())
        self.batches[trainer.global_step] = (digest.hexdigest(), tuple(batch["task"]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def _fit(store, root, max_steps, ckpt_path=None):
    import pytorch_lightning as pl

    from megaseg.training import InContextSegModule

    log = type("Log", (_BatchLog, pl.Callback), {})()
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=root / "checkpoints", every_n_train_steps=3, save_top_k=-1, save_last=False
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoints, log], default_root_dir=root,
    )  # fmt: skip
    torch.manual_seed(0)
    module = InContextSegModule(
        "universeg_v1", {"encoder_widths": [4, 4]}, resolution=R, support_size=4
    )
    dm = _datamodule(store, augment_on_device=True, support_size=(2, 8), support_size_buckets=True)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return log


def test_fit_resumed_from_a_checkpoint_trains_on_the_uninterrupted_batches(store, tmp_path):
    """A fit with the stored synthetic tasks, device augmentation and bucketed support sizes,
    stopped at its step-3 checkpoint and resumed from it, trains steps 3-5 on the very batches
    (bitwise, after the deferred augmentation) and with the losses of an uninterrupted fit."""
    nonstop = _fit(store, tmp_path / "nonstop", 6)
    assert sorted(nonstop.batches) == list(range(6))
    assert len(set(nonstop.batches.values())) == 6  # the steps did see different episodes
    (ckpt,) = (tmp_path / "nonstop" / "checkpoints").glob("*step=3.ckpt")
    resumed = _fit(store, tmp_path / "resumed", 6, ckpt_path=ckpt)
    assert sorted(resumed.batches) == [3, 4, 5]  # continued at step 3, not from the start
    for step in (3, 4, 5):
        assert resumed.batches[step] == nonstop.batches[step], step
        assert abs(resumed.losses[step] - nonstop.losses[step]) <= 1e-5, step


def test_campaign_summary_marks_what_a_cpu_run_did_not_measure(tmp_path, capsys, monkeypatch):
    """benchmarks/campaign_summary.py on a CPU run's logs (no dmon log, no GPU memory): the
    rate and loss come from metrics.csv, GPU busy % and memory read "not measured", and a run
    without logs says so; a dmon log gives the mean of its sm column."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "campaign_summary.py"
    spec = importlib.util.spec_from_file_location("campaign_summary", path)
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    logs = tmp_path / "runs" / "cpu" / "lightning_logs" / "version_0"
    logs.mkdir(parents=True)
    rows = ["step,perf/episodes_per_s,train/loss"]
    rows += [f"{s},{1000 if s == 0 else 40 + s % 2},{2.0 - s / 10}" for s in range(10)]
    (logs / "metrics.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dmon_gpu.txt").write_text(
        "# gpu    sm   mem\n# Idx     %     %\n    0    80    10\n    0    90    12\n"
    )
    argv = ["x", "--runs", "cpu", "gone", "--metrics", str(tmp_path / "runs"), "--dmon",
            str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    summary.main()
    out = capsys.readouterr().out.splitlines()
    cpu = next(line for line in out if line.startswith("| cpu |"))
    cells = [c.strip() for c in cpu.strip("|").split("|")]
    assert cells[1] == "9" and cells[2] == "40.6"  # (5 x 41 + 4 x 40) / 9: steps after the first
    assert cells[3] == cells[4] == "not measured"
    assert cells[5] == "1.950" and cells[6] == "1.150"  # first and last fifth of the losses
    assert any(line.startswith("| gone | no metrics.csv") for line in out)
    assert summary.sm_busy(tmp_path / "dmon_gpu.txt") == 85.0
