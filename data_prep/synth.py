"""``megaseg prep synth``: write synthetic tasks (``megaseg.data.synthetic``) into a corpus.

The synthetic subjects go through the same pipeline and store writer as real data
(``data_prep.pipeline.build_corpus``): one dataset, one case and one subject per synthetic
subject, the task as the subject group, each label a binary task on the "2d" axis. Splits are
by subject (70/15/15), so every task has subjects in train, val and test. Images are generated
at the largest stored resolution and shrunk by the shared blur-then-resize path (labels become
soft masks there). Like any build it is resumable: a rerun reuses the finished shards.

Training generates these tasks on the fly unless a stored copy is named as its
``data.synthetic_store`` (``megaseg prep synth --version 2 --tasks N --store DIR``, written once):
the loader then reads a few rows per episode instead of generating them (issue #21,
benchmarks/input_speed.py). A stored copy also serves evaluation, sharing, and corpora mixing
real and synthetic tasks. Each example is the generator's output rounded to uint8 (the store's
format), the same bytes on every run. It is large: ~13.5 slices per subject (1 image + 5-20
labels) for v1, so 1,000 x 100 subjects at 128 px is ~22 GB, twice that while building.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.readers.base import Case, LoadedCase

if TYPE_CHECKING:
    from megaseg.data.synthetic import SyntheticConfig, SyntheticTasks

# megaseg.data.synthetic (torch) is imported where it is used, so `prep synth --help` is quick

MODALITY = "synthetic"
_CASE_ID = re.compile(r"t(?P<task>\d+)_s(?P<index>\d+)")
_SLICES_PER_SUBJECT = 13.5  # 1 image + on average 12.5 labels


def dataset_name(seed_offset: int) -> str:
    """``synthetic`` (training range), ``synthetic-heldout`` or ``synthetic-<offset>``."""
    if seed_offset == 0:
        return "synthetic"
    from megaseg.data.synthetic import HELDOUT_SEED_OFFSET

    if seed_offset == HELDOUT_SEED_OFFSET:
        return "synthetic-heldout"
    return f"synthetic-{seed_offset}"


def label_name(label: int) -> str:
    return f"label{label:02d}"


class SyntheticLoader:
    """``load(case)`` of the synthetic dataset: generates the case's subject (picklable).

    The pipeline reads value 0 as background, so label ``k`` must be value ``k + 1``: the
    generator's map value of label ``k`` is ``k + label_offset`` (v1: 0, its maps have no
    background; v2: 1), shifted here by ``1 - label_offset``.
    """

    def __init__(self, synthetic: SyntheticTasks):
        self.synthetic = synthetic
        self.shift = 1 - synthetic.label_offset

    def task_index(self, case: Case) -> tuple[int, int]:
        match = _CASE_ID.fullmatch(case.case_id)
        if match is None:
            raise ValueError(f"{case.case_id}: not a synthetic case id (t<task>_s<index>)")
        return int(match["task"]), int(match["index"])

    def __call__(self, case: Case) -> LoadedCase:
        task, index = self.task_index(case)
        image, labels = self.synthetic.subject(task, index)
        return LoadedCase(
            image=image.numpy(),  # (1, H, W) float32 in [0, 1]
            label=labels.numpy() + self.shift,  # (H, W) int64, label k = value k + 1
            affine=None,
            channel_names=[MODALITY],
        )

    def fingerprint(self, case: Case) -> str:
        """What a case's shard depends on: generator version, global task id, index, config."""
        task, index = self.task_index(case)
        seed = self.synthetic.subject_seed(task, index)
        fingerprint = getattr(self.synthetic, "fingerprint", None)
        if fingerprint is not None:  # v2: version, config and label maps
            return f"{fingerprint()}:{seed}"
        return f"v{self.synthetic.version}:{seed}:{self.synthetic.config!r}"


def synthetic_job(
    num_tasks: int = 1000,
    num_subjects: int = 100,
    seed_offset: int = 0,
    size: int = 128,
    config: SyntheticConfig | None = None,
    generator_version: int = 1,
    label_maps: str = "mni152",
):
    """The ``DatasetJob`` of ``num_tasks`` synthetic tasks generated at ``size`` pixels.

    ``generator_version`` 2: :class:`~megaseg.data.synthetic.v2.SyntheticTasksV2` with real
    label maps (dataset name suffixed ``-v2``; ``config`` a ``SyntheticV2Config``):
    ``label_maps`` ``"mni152"`` (nilearn's template) or ``"mni152+spm12"`` (also SPM12's tissue
    maps and Neuromorphometrics labels, :func:`data_prep.specs.packaged.packaged_label_maps`,
    fetched on first use)."""
    from data_prep.label_maps import make_tasks
    from data_prep.pipeline import DatasetJob
    from data_prep.specs import DatasetSpec
    from megaseg.data.synthetic import versions

    versions.check_version(generator_version, "generator_version")
    if generator_version == 2 and label_maps not in versions.LABEL_MAPS:
        raise ValueError(f"label_maps must be 'mni152' or 'mni152+spm12', got {label_maps!r}")
    base = config or versions.make_config(generator_version)
    config = versions.make_config(
        generator_version, vars(base), size=size, num_subjects=num_subjects
    )
    synthetic = make_tasks(generator_version, num_tasks, seed_offset, config, label_maps)
    version = synthetic.version
    name = dataset_name(seed_offset) + ("-v2" if generator_version == 2 else "")
    spec = DatasetSpec(
        name=name,
        reader="synthetic",
        root="",
        modality=MODALITY,
        # The generator's images are already in [0, 1]: stored as generated (rounded to uint8),
        # not stretched per subject by the min-max of an unknown modality.
        window=(0.0, 1.0),
        licence="generated by megaseg (Apache-2.0)",
        source=versions.SOURCES[generator_version],
        version=(
            f"generator v{version}, seed_offset {seed_offset}, "
            f"{num_tasks} tasks x {num_subjects} subjects"
            + (f", label maps {label_maps}" if generator_version == 2 else "")
        ),
    )
    width = max(4, len(str(num_tasks - 1))), max(3, len(str(num_subjects - 1)))
    cases = []
    for task in range(num_tasks):
        labels = tuple((k + 1, label_name(k)) for k in range(synthetic.num_labels(task)))
        for index in range(num_subjects):
            case_id = f"t{task:0{width[0]}d}_s{index:0{width[1]}d}"
            cases.append(
                Case(
                    dataset=name,
                    case_id=case_id,
                    subject=case_id,
                    image_paths=(),
                    label_path=Path(name) / case_id,  # only named in messages
                    group=f"task{seed_offset + task:04d}",
                    channel_names=(MODALITY,),
                    labels=labels,
                )
            )
    loader = SyntheticLoader(synthetic)
    return DatasetJob(spec, cases, loader, loader.fingerprint)


def estimated_bytes(num_tasks: int, num_subjects: int, resolutions: Sequence[int]) -> int:
    """Rough size of the stored arrays (uint8): slices per subject x pixels per slice."""
    return int(num_tasks * num_subjects * _SLICES_PER_SUBJECT * sum(r * r for r in resolutions))


def write_synthetic(
    out: str | Path,
    num_tasks: int = 1000,
    num_subjects: int = 100,
    seed_offset: int = 0,
    resolutions: Sequence[int] = (128,),
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
    generator_version: int = 1,
    label_maps: str = "mni152",
):
    """Write (or finish writing) the synthetic dataset into corpus ``out``; returns the
    pipeline's ``BuildSummary``. Other datasets already in ``out`` are kept."""
    from data_prep.pipeline import build_corpus

    resolutions = tuple(sorted({int(r) for r in resolutions}))
    job = synthetic_job(
        num_tasks, num_subjects, seed_offset, size=resolutions[-1],
        generator_version=generator_version, label_maps=label_maps,
    )  # fmt: skip
    return build_corpus(
        [job], out, workers=workers, resolutions=resolutions, seed=seed, progress=progress
    )
