"""Public datasets that share subjects: training on one and evaluating on the other leaks.

Only overlaps stated by the datasets' own documentation are listed; names may refer to datasets
that are not in the catalog (LiTS). ``megaseg prep verify`` reports the pairs present in a corpus.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Overlap:
    """Datasets ``a`` and ``b`` hold scans of the same subjects, for ``reason``."""

    a: str
    b: str
    reason: str


KNOWN_OVERLAPS: tuple[Overlap, ...] = (
    Overlap("Task03_Liver", "LiTS", "the Decathlon liver task is the LiTS 2017 training data"),
    Overlap(
        "KiTS19",
        "KiTS21",
        "KiTS21's 300 cases are KiTS19's 210 training and 90 test cases, re-annotated",
    ),
    Overlap(
        "Task01_BrainTumour",
        "BraTS2021",
        "the Decathlon brain tumour task is BraTS 2016/2017 data, which BraTS 2021 includes",
    ),
    Overlap(
        "PkgAtlasreader",
        "PkgNimare",
        "both image the FSL MNI152NLin6Asym template (1 mm brain-extracted / 1 and 2 mm head)",
    ),
    Overlap(
        "PkgBrainHeads",
        "PkgNimare",
        "PkgBrainHeads' MNI152NLin6Asym head and brain mask are PkgNimare's (the same files)",
    ),
    Overlap(
        "PkgBrainHeads",
        "PkgITKKmeans",
        "PkgBrainHeads' KmeansTest T1 and brain are PkgITKKmeans' (the same files)",
    ),
    # Only the query side of the cross-subject benchmark: its support candidates are PkgNimare's
    # and PkgITKKmeans' brain items (PkgBrainHeads holds both) by design (support is given at
    # test time; the query head must be unseen), and listing them would make `megaseg evaluate`
    # refuse the benchmark for every checkpoint trained on those sources.
    Overlap(
        "PkgBrainXS",
        "PkgPyrobex",
        "PkgBrainXS's queries are PkgPyrobex's ROBEX head and brain mask (the same files)",
    ),
)


def overlaps_among(names: Iterable[str]) -> list[Overlap]:
    """The known overlaps whose two datasets are both in ``names`` (case-insensitive)."""
    present = {n.lower() for n in names}
    return [o for o in KNOWN_OVERLAPS if o.a.lower() in present and o.b.lower() in present]
