"""LightningDataModule: episodes from corpora and synthetic tasks, never from held-out datasets.

Training batches come from an endless :class:`~megaseg.data.tasks.EpisodeStream`, one stream per
DDP rank, started at the step the trainer resumes from, so a resumed run sees exactly the
batches an uninterrupted run would have seen. Validation and test are fixed
:class:`~megaseg.data.tasks.EpisodeSet` s, one per source (corpus val split of the training
datasets; synthetic tasks from a seed range used neither for training nor for held-out
evaluation), each batch with a foreign support set for the support-swap metric.

Synthetic tasks come from generator v1 (:mod:`megaseg.data.synthetic`, the default) or v2
(:mod:`megaseg.data.synthetic.v2`, ``synthetic_version: 2``: objects on backgrounds, per-subject
geometry, label-to-image on the MNI152 label maps); the same seed ranges either way. Training
can read them from a store written once by ``megaseg prep synth`` (``synthetic_store``) instead
of generating them per episode: then the loader's work per episode is a few array reads, and
with ``augment_on_device`` the augmentation runs batched on the training device after the
transfer (:meth:`EpisodeDataModule.on_after_batch_transfer`), uint8 over the bus (issue #21).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from megaseg.data.store import Corpus, load_protocol
from megaseg.data.synthetic import HELDOUT_SEED_OFFSET, versions
from megaseg.data.tasks import (
    TEST_STREAM,
    TRAIN_STREAM,
    VAL_STREAM,
    Augment,
    CorpusTaskSource,
    EmptySplitError,
    EpisodeSampler,
    EpisodeSet,
    EpisodeStream,
    SyntheticTaskSource,
    finish_batch,
)

# Synthetic validation tasks: a seed range between the training range [0, num_tasks) and the
# held-out evaluation range [HELDOUT_SEED_OFFSET, ...), so validation never peeks at either.
SYNTHETIC_VAL_SEED_OFFSET = HELDOUT_SEED_OFFSET // 2


AUGMENT_PRESETS = ("reference", "task", "in_task", "generalist", "light")


def make_augment(preset: str | None) -> Augment | None:
    """The episode augmentation of a preset name (see :data:`AUGMENT_PRESETS`), None for none."""
    if preset in (None, "none"):
        return None
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"augment must be one of {AUGMENT_PRESETS} or null, got {preset!r}")
    from megaseg.data.augment import EpisodeAugment

    if preset == "task":
        return EpisodeAugment(in_task=None)
    if preset == "in_task":
        return EpisodeAugment(task=None)
    if preset == "generalist":
        from megaseg.data.augment import GENERALIST_IN_TASK_AUGMENTATIONS

        return EpisodeAugment(in_task=GENERALIST_IN_TASK_AUGMENTATIONS)
    if preset == "light":
        from megaseg.data.augment import LIGHT_TASK_AUGMENTATIONS

        return EpisodeAugment(task=LIGHT_TASK_AUGMENTATIONS, in_task=None)
    return EpisodeAugment()


class HeldOutError(ValueError):
    """A dataset the evaluation protocol holds out was asked for as training data."""


class EpisodeDataModule(pl.LightningDataModule):
    """Episodes over zero or more corpora plus on-the-fly synthetic tasks.

    Args:
        corpora: corpus roots (built by ``megaseg prep build``); their tasks are pooled and
            drawn hierarchically (dataset -> group -> modality -> axis -> label).
        datasets: train only on these datasets of the corpora (default: all but held-out).
        protocol: evaluation protocol YAML; its held-out datasets are refused for training
            (asking for one in ``datasets`` raises :class:`HeldOutError`).
        held_out: more dataset names to hold out, on top of the protocol's.
        synthetic_ratio: fraction of training episodes from synthetic tasks, in [0, 1]; must
            be 1 without corpora.
        synthetic_tasks: number of synthetic training tasks (seeds ``[0, synthetic_tasks)``).
        synthetic_version: synthetic task generator, 1 (:mod:`megaseg.data.synthetic`) or 2
            (:mod:`megaseg.data.synthetic.v2`).
        synthetic_config: overrides of :class:`~megaseg.data.synthetic.SyntheticConfig`, or of
            :class:`~megaseg.data.synthetic.v2.SyntheticV2Config` for version 2 (``size`` is
            always ``resolution``).
        synthetic_real_maps: version 2 only: the real label maps of its label-to-image ("real")
            tasks: true or "mni152" (:func:`~megaseg.data.synthetic.v2.mni152_label_maps`),
            "mni152+spm12" (also SPM12's tissue maps and Neuromorphometrics labels, fetched
            from the spm-runtime wheel on first use), false: no such tasks.
        resolution: image side R; corpora must store it.
        support_size: S, fixed, or ``[lo, hi]`` drawn per batch.
        support_size_log: draw S log-uniformly in ``[lo, hi]`` (as many batches with S in
            [4, 8) as in [32, 64)): a batch costs about S, so this buys ~2x the batches of a
            uniform draw over [4, 64] while still training at 64.
        batch_size: episodes per training batch, B.
        val_support_size: S for validation and test (default: ``hi`` of ``support_size``).
        val_batches, val_batch_size: size of each validation set (per source).
        test_batches: size of each test set (per source); test uses the corpus test split of
            the training datasets and held-out-range synthetic tasks.
        synthetic_val: also validate on synthetic tasks (always when there is no corpus).
        augment: training augmentation preset (:mod:`megaseg.data.augment`, reference
            probabilities): "reference" (task-level and in-task), "task", "in_task",
            "generalist" (reference task-level, in-task with per-subject zoom x0.5-2, shift,
            rotation and field-of-view crops), "light" (task-level flips and intensity
            inversion only), or None.
            From Python, any ``(images, labels, generator) -> (images, labels)`` callable.
        num_workers: DataLoader workers (the batches are the same for any number); None: chosen
            by ``megaseg fit`` from the cores (:mod:`megaseg.training.threads`), 0 from Python.
        seed: seed of the episode streams.
        cross_subject: probability that a training episode of a corpus task with several
            subjects takes its support only from subjects other than the query's
            (:class:`~megaseg.data.tasks.EpisodeSampler`); validation keeps the usual draw.
        synthetic_store: a corpus written by ``megaseg prep synth --version V --tasks
            synthetic_tasks`` (dataset ``synthetic`` or ``synthetic-v2``): training reads its
            synthetic episodes there (its train split: 70% of each task's subjects) instead of
            generating them; validation and test still generate theirs (other seed ranges).
        support_size_buckets: S uniform over the powers of two in ``support_size``'s range
            (2, 4, ..., 64 for [2, 64], 1/6 each), so ``model.compile: true`` compiles a
            handful of graphs; overrides ``support_size_log``.
        augment_on_device: run ``augment`` after the batch reaches the training device
            (``on_after_batch_transfer``), batched there, with the seeds the loader would have
            used (the same episodes); images and labels travel as uint8 when every training
            source is stored.
        pin_memory: page-lock batches for the copy to the GPU; None: when training on CUDA.
    """

    def __init__(
        self,
        corpora: Sequence[str] = (),
        datasets: Sequence[str] | None = None,
        protocol: str | None = None,
        held_out: Sequence[str] = (),
        synthetic_ratio: float = 1.0,
        synthetic_tasks: int = 1000,
        synthetic_config: dict | None = None,
        resolution: int = 128,
        support_size: int | tuple[int, int] = 64,
        batch_size: int = 8,
        val_support_size: int | None = None,
        val_batches: int = 8,
        val_batch_size: int = 8,
        test_batches: int = 16,
        synthetic_val: bool = True,
        augment: str | None = None,
        num_workers: int | None = None,
        seed: int = 0,
        synthetic_version: int = 1,
        synthetic_real_maps: bool | str = True,
        support_size_log: bool = False,
        cross_subject: float = 0.0,
        synthetic_store: str | None = None,
        support_size_buckets: bool = False,
        augment_on_device: bool = False,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= synthetic_ratio <= 1.0:
            raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio}")
        if not corpora and synthetic_ratio != 1.0:
            raise ValueError("without corpora every episode is synthetic: set synthetic_ratio: 1.0")
        if synthetic_tasks >= SYNTHETIC_VAL_SEED_OFFSET:
            raise ValueError(f"synthetic_tasks must be < {SYNTHETIC_VAL_SEED_OFFSET}")
        self.corpora_roots = [str(c) for c in corpora]
        self.datasets = None if datasets is None else list(datasets)
        self.protocol = load_protocol(protocol) if protocol else None
        self.held_out = sorted({*(self.protocol or ()), *held_out}, key=str.casefold)
        self._check_not_held_out()
        self.synthetic_ratio = synthetic_ratio
        self.synthetic_tasks = synthetic_tasks
        self.synthetic_version = versions.check_version(synthetic_version, "synthetic_version")
        self.synthetic_real_maps = versions.label_maps_name(synthetic_real_maps)
        self.support_size_log = support_size_log
        if not 0.0 <= cross_subject <= 1.0:
            raise ValueError(f"cross_subject must be in [0, 1], got {cross_subject}")
        self.cross_subject = cross_subject
        self.synthetic_config = versions.make_config(
            synthetic_version, synthetic_config, size=resolution
        )
        self.resolution = resolution
        self.support_size = support_size
        self.batch_size = batch_size
        self.val_support_size = val_support_size or (
            support_size if isinstance(support_size, int) else int(support_size[-1])
        )
        self.val_batches, self.val_batch_size = val_batches, val_batch_size
        self.test_batches = test_batches
        self.synthetic_val = synthetic_val or not corpora
        self.augment = make_augment(augment) if isinstance(augment, str) else augment
        self.num_workers = 0 if num_workers is None else num_workers
        self.seed = seed
        self.synthetic_store = None if synthetic_store is None else str(synthetic_store)
        self.support_size_buckets = support_size_buckets
        self.augment_on_device = augment_on_device
        self.pin_memory = pin_memory
        self._corpora: list[Corpus] | None = None
        self.eval_names: dict[str, list[str]] = {}

    # -- sources ------------------------------------------------------------------------------

    def _check_not_held_out(self) -> None:
        held = {n.casefold() for n in self.held_out}  # names or shell patterns ("WBC-*")
        bad = [d for d in self.datasets or ()
               if any(fnmatch.fnmatchcase(d.casefold(), p) for p in held)]  # fmt: skip
        if bad:
            where = f"protocol {self.protocol.path}" if self.protocol else "held_out"
            raise HeldOutError(
                f"dataset(s) {bad} are held out by {where} and cannot be used for training; "
                "remove them from data.datasets or evaluate with another protocol"
            )

    @property
    def corpora(self) -> list[Corpus]:
        if self._corpora is None:
            self._corpora = [Corpus(root, exclude=self.held_out) for root in self.corpora_roots]
            self._check_datasets_exist()
        return self._corpora

    def _check_datasets_exist(self) -> None:
        names = {d.casefold() for c in self._corpora for d in c.datasets}
        missing = [d for d in self.datasets or () if d.casefold() not in names]
        if missing:
            raise ValueError(
                f"data.datasets {missing} are in none of the corpora {self.corpora_roots}"
            )
        seen: dict[str, str] = {}
        for c in self._corpora:
            for d in c.datasets:
                if d.casefold() in seen:
                    raise ValueError(
                        f"dataset {d!r} is in two corpora: {seen[d.casefold()]}, {c.root}"
                    )
                seen[d.casefold()] = str(c.root)

    def _corpus_sources(self, split: str, skip_empty: bool = False) -> list[CorpusTaskSource]:
        """One source per corpus for ``split``; ``skip_empty``: leave out, with a log line, a
        corpus without a task of >= 2 examples in that split (e.g. sources whose every subject
        is in train), instead of an error."""
        sources = []
        for corpus in self.corpora:
            wanted = self.datasets
            if wanted is not None and not {d.casefold() for d in wanted} & {
                d.casefold() for d in corpus.datasets
            }:
                continue
            # The store already refuses held-out train/val; test must be refused here.
            try:
                source = CorpusTaskSource(
                    corpus, split, self.resolution, wanted, exclude=self.held_out
                )
            except EmptySplitError as e:
                if not skip_empty:
                    raise
                print(f"megaseg: {e}: no {split} episodes from this corpus", flush=True)
                continue
            sources.append(source)
        return sources

    def _synthetic(self, split: str) -> SyntheticTaskSource | CorpusTaskSource:
        if split == "train" and self.synthetic_store is not None:
            return self._stored_synthetic()
        offset = {"train": 0, "val": SYNTHETIC_VAL_SEED_OFFSET}.get(split, HELDOUT_SEED_OFFSET)
        return SyntheticTaskSource(self.synthetic_generator(offset))

    def _stored_synthetic(self) -> CorpusTaskSource:
        """The training split of the synthetic tasks in ``synthetic_store``, checked against
        this module's generator version, task count and label maps (the dataset's record)."""
        # data_prep.synth names the dataset so (a library module does not import the command)
        name = "synthetic" + ("-v2" if self.synthetic_version == 2 else "")
        corpus = Corpus(self.synthetic_store)
        maps = f" --label-maps {self.synthetic_real_maps}" if self.synthetic_version == 2 else ""
        write = (
            f"megaseg prep synth --version {self.synthetic_version} --tasks "
            f"{self.synthetic_tasks}{maps} --resolutions {self.resolution} "
            f"--store {self.synthetic_store}"
        )
        if name not in corpus.datasets:
            raise ValueError(
                f"synthetic_store {self.synthetic_store}: no dataset {name!r} (has "
                f"{corpus.datasets}); write it with `{write}`"
            )
        record = str(corpus.manifest["datasets"][name].get("spec", {}).get("version", ""))
        tasks = re.search(r"(\d+) tasks x", record)
        stored_maps = re.search(r"label maps (\S+)", record)
        wrong = []
        if tasks is None or int(tasks[1]) != self.synthetic_tasks:
            wrong.append(
                f"tasks {tasks and tasks[1]} (data.synthetic_tasks {self.synthetic_tasks})"
            )
        if (
            self.synthetic_version == 2
            and (stored_maps and stored_maps[1]) != self.synthetic_real_maps
        ):
            wrong.append(
                f"label maps {stored_maps and stored_maps[1]} "
                f"(data.synthetic_real_maps {self.synthetic_real_maps})"
            )
        if wrong:
            raise ValueError(
                f"synthetic_store {self.synthetic_store}: {name} was written with "
                f"{', '.join(wrong)}; write it with `{write}` into another folder, or change "
                "the data settings to match"
            )
        source = CorpusTaskSource(corpus, "train", self.resolution, [name])
        source.name = "synthetic"
        return source

    def synthetic_generator(self, seed_offset: int = 0):
        """The synthetic tasks ``[seed_offset, seed_offset + synthetic_tasks)`` of this module's
        generator version and config (train: 0)."""
        from data_prep.label_maps import make_tasks  # builds the named label maps (v2)

        return make_tasks(
            self.synthetic_version,
            self.synthetic_tasks,
            seed_offset,
            self.synthetic_config,
            self.synthetic_real_maps,
        )

    def training_sources(self) -> tuple[list, list[float]]:
        """Sources and weights of training episodes."""
        sources, weights = [], []
        corpus = self._corpus_sources("train") if self.synthetic_ratio < 1 else []
        for s in corpus:  # corpora share the non-synthetic weight equally per dataset
            sources.append(s)
            weights.append((1 - self.synthetic_ratio) * len(s.datasets))
        if corpus:
            total = sum(len(s.datasets) for s in corpus)
            weights = [w / total for w in weights]
        if self.synthetic_ratio > 0:
            sources.append(self._synthetic("train"))
            weights.append(self.synthetic_ratio)
        return sources, weights

    def eval_sets(self, split: str) -> list[tuple[str, EpisodeSampler]]:
        """``(name, sampler)`` per evaluation source of ``split`` ("val" or "test")."""
        out = []
        if self.corpora_roots and self.synthetic_ratio < 1:
            sources = self._corpus_sources(split, skip_empty=True)
            if sources:
                out.append(("corpus", self._eval_sampler(sources)))
        if self.synthetic_val:
            out.append(("synthetic", self._eval_sampler([self._synthetic(split)])))
        return out

    def _eval_sampler(self, sources) -> EpisodeSampler:
        # The support-swap metric needs a second task; a corpus split may have only one.
        corpus_tasks = [len(s.tree) for s in sources if isinstance(s, CorpusTaskSource)]
        foreign = len(corpus_tasks) < len(sources) or sum(corpus_tasks) >= 2
        if not foreign:
            warnings.warn(
                "only one corpus task in this split: no support-swap metric", stacklevel=2
            )
        return EpisodeSampler(
            sources, batch_size=self.val_batch_size, support_size=self.val_support_size,
            foreign_support=foreign,
        )  # fmt: skip

    # -- loaders ------------------------------------------------------------------------------

    def _start_step(self) -> int:
        """Training batches already consumed: ``global_step * accumulate_grad_batches`` (the
        resumable checkpoints are written at optimizer-step boundaries)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def _rank(self) -> int:
        return 0 if self.trainer is None else self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        sources, weights = self.training_sources()
        sampler = EpisodeSampler(
            sources, weights, batch_size=self.batch_size, support_size=self.support_size,
            augment=self.augment, support_size_log=self.support_size_log,
            cross_subject=self.cross_subject, support_size_buckets=self.support_size_buckets,
            defer_augment=self.augment_on_device,
        )  # fmt: skip
        stream = EpisodeStream(sampler, self.seed, self._rank(), self._start_step(), TRAIN_STREAM)
        return self._loader(stream)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the training device: uint8 -> float and the deferred augmentation
        (:func:`~megaseg.data.tasks.finish_batch`); other batches pass unchanged."""
        return finish_batch(batch, self.augment)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val", self.val_batches, VAL_STREAM)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test", self.test_batches, TEST_STREAM)

    def predict_dataloader(self) -> list[DataLoader]:
        """``megaseg predict``: the test episodes (the same draws as ``megaseg test``)."""
        loaders = self._eval_loaders("test", self.test_batches, TEST_STREAM)
        self.eval_names["predict"] = self.eval_names["test"]
        return loaders

    def _eval_loaders(self, split: str, num_batches: int, stream: int) -> list[DataLoader]:
        sets = self.eval_sets(split)
        self.eval_names[split] = [name for name, _ in sets]  # read by the module to name metrics
        return [self._loader(EpisodeSet(s, self.seed, num_batches, stream)) for _, s in sets]

    def _loader(self, dataset) -> DataLoader:
        from megaseg.training.workers import worker_init_fn

        # the workers ignore SIGTERM and die with this process (megaseg.training.workers)
        init = worker_init_fn() if self.num_workers else None
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers,
            persistent_workers=False, pin_memory=self._pin(), worker_init_fn=init,
        )  # fmt: skip

    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = self.trainer
        return bool(
            trainer is not None and torch.cuda.is_available()
            and trainer.strategy.root_device.type == "cuda"
        )  # fmt: skip

    # -- provenance (for the checkpoint card) -------------------------------------------------

    def describe(self) -> dict:
        """What the training data is: datasets with manifest checksums, synthetic seeds, held-out."""
        import hashlib

        corpora = []
        if self.synthetic_ratio < 1:
            for corpus in self.corpora:
                manifest = Path(corpus.root) / "manifest.json"
                corpora.append({
                    "root": str(corpus.root),
                    "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
                    "datasets": sorted(
                        {s for src in self._corpus_sources("train") if src.corpus is corpus
                         for s in src.datasets}
                    ),
                })  # fmt: skip
        synthetic = None
        if self.synthetic_ratio > 0:
            from megaseg.data.synthetic.v1 import GENERATOR_VERSION

            synthetic = {
                "generator_version": GENERATOR_VERSION,
                "seed_range": [0, self.synthetic_tasks],
                "config": dataclasses.asdict(self.synthetic_config),
            }
            if self.synthetic_version != 1:
                # v2 tasks also depend on the label maps: the fingerprint names their checksum.
                tasks = self.synthetic_generator(0)
                synthetic.update(
                    generator_version=tasks.version,
                    label_maps=self.synthetic_real_maps,
                    fingerprint=tasks.fingerprint(),
                )
            if self.synthetic_store is not None:  # training read the stored copy
                manifest = Path(self.synthetic_store) / "manifest.json"
                synthetic["store"] = {
                    "root": self.synthetic_store,
                    "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
                }
        return {
            "corpora": corpora,
            "synthetic_ratio": self.synthetic_ratio,
            "synthetic": synthetic,
            "held_out": list(self.held_out),
            "protocol": None if self.protocol is None else self.protocol.path,
            "resolution": self.resolution,
            "support_size": self.support_size,
            "support_size_log": self.support_size_log,
            "support_size_buckets": self.support_size_buckets,
            "augment_on_device": self.augment_on_device,
            "cross_subject": self.cross_subject,
            "batch_size": self.batch_size,
            "augment": None if self.augment is None else repr(self.augment),
            "augment_preset": self.hparams.get("augment"),
            "seed": self.seed,
        }
