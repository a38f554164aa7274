"""VisA (Zou et al., "SPot-the-Difference Self-Supervised Pre-training for Anomaly Detection and Segmentation",
ECCV 2022, https://arxiv.org/abs/2207.14315; amazon-science/spot-diff), raw or converted.

Raw layout (the released tarball) with the 1-class split of ``split_csv/1cls.csv`` (header
``object,split,label,image,mask``, CRLF line endings, mask empty for normal images)::

    {root}/split_csv/1cls.csv
    {root}/{category}/Data/Images/{Normal,Anomaly}/NNNN.JPG
    {root}/{category}/Data/Masks/Anomaly/NNN.png        (class-index maps 0..N: every non-zero pixel is a defect)

Converted ("1cls", MVTec-like) layout, written by spot-diff's ``prepare_data.py`` (under ``1cls/``) and anomalib
(under ``visa_pytorch/``): ``{category}/{train/good,test/good,test/bad,ground_truth/bad}``, masks with the image's
stem and a ``.png`` extension (anomalib's are 3-channel).
"""

from __future__ import annotations

import csv
from pathlib import Path

from zsadbench.data import DataError, DatasetLayoutError
from zsadbench.registry import Archive, register_dataset
from zsadbench.types import Dataset, Sample

VISA_LAYOUT = """\
  raw:       {root}/split_csv/1cls.csv and {root}/{category}/Data/Images/{Normal,Anomaly}/*.JPG,
             {root}/{category}/Data/Masks/Anomaly/*.png
  converted: {root}/{category}/{train/good, test/good, test/bad, ground_truth/bad}  (also under {root}/1cls or
             {root}/visa_pytorch)
  (or {root}/meta.json in the APRIL-GAN / AnomalyCLIP format)"""


def read_split_csv(root: Path, csv_path: Path) -> list[Sample]:
    """Returns the samples of the VisA 1-class split; every listed image and mask must exist."""
    samples = []
    with csv_path.open(newline="", encoding="utf-8") as handle:  # newline="" keeps CRLF out of the last field
        reader = csv.DictReader(handle)
        expected = {"object", "split", "label", "image", "mask"}
        if not reader.fieldnames or not expected <= {f.strip() for f in reader.fieldnames}:
            raise DataError(f"{csv_path}: expected the header object,split,label,image,mask, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items()}
            label = {"normal": 0, "anomaly": 1}.get(row["label"])
            if label is None:
                raise DataError(f"{csv_path}:{line}: label must be normal or anomaly, got {row['label']!r}")
            image = root / row["image"]
            if not image.is_file():
                raise DataError(f"{csv_path}:{line}: image not found: {image}")
            mask = root / row["mask"] if row["mask"] else None
            if mask is not None and not mask.is_file():
                raise DataError(f"{csv_path}:{line}: mask not found: {mask}")
            if label == 1 and mask is None:
                raise DataError(f"{csv_path}:{line}: anomalous image {image} has no mask")
            samples.append(Sample(image, row["object"], label, mask, "bad" if label else "good", "visa",
                                  "industrial", row["split"].lower()))
    return samples


# train normal, test normal, test anomalous per category, counted from split_csv/1cls.csv (amazon-science/spot-diff)
VISA_COUNTS = {
    category: {"train": train, "test_normal": good, "test_anomalous": bad}
    for category, train, good, bad in [
        ("candle", 900, 100, 100), ("capsules", 542, 60, 100), ("cashew", 450, 50, 100),
        ("chewinggum", 453, 50, 100), ("fryum", 450, 50, 100), ("macaroni1", 900, 100, 100),
        ("macaroni2", 900, 100, 100), ("pcb1", 904, 100, 100), ("pcb2", 901, 100, 100), ("pcb3", 905, 101, 100),
        ("pcb4", 904, 101, 100), ("pipe_fryum", 450, 50, 100),
    ]
}
VISA_COUNTS["total"] = {"train": 8659, "test_normal": 962, "test_anomalous": 1200}


@register_dataset(
    "visa", description="VisA (12 industrial categories; raw 1cls split or converted)", layout=VISA_LAYOUT,
    license="CC BY 4.0 (amazon-science/spot-diff LICENSE-DATASET)", homepage="https://github.com/amazon-science/spot-diff",
    archives=(Archive("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
                      "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
                      "openvinotoolkit/anomalib src/anomalib/data/datamodules/image/visa.py DOWNLOAD_INFO "
                      "@ b7233686172e3485bfbe01272a8cd7a7e4576986"),),
    categories=tuple(c for c in VISA_COUNTS if c != "total"), counts=VISA_COUNTS,
    counts_source="split_csv/1cls.csv of amazon-science/spot-diff")
def load_visa(root: Path) -> Dataset:
    """VisA: 12 categories, 1-class split 8,659 train / 2,162 test images, pixel masks."""
    from zsadbench.datasets.mvtec import find_categories, load_tree_or_meta

    csv_path = root / "split_csv" / "1cls.csv"
    if csv_path.is_file():
        return Dataset("visa", root, read_split_csv(root, csv_path), "industrial", "VisA (raw, split_csv/1cls.csv)")
    for candidate in (root, root / "1cls", root / "visa_pytorch"):
        if find_categories(candidate) or (candidate / "meta.json").is_file():
            return load_tree_or_meta(candidate, "visa", description="VisA (converted 1cls layout)",
                                     layout=VISA_LAYOUT, mask_suffixes=("", "_mask"))
    raise DatasetLayoutError(f"{root} is not a VisA root (no split_csv/1cls.csv, no converted tree, no meta.json). "
                             f"Expected layout:\n{VISA_LAYOUT}")
