"""MVTec LOCO AD (Bergmann et al., "Beyond Dents and Scratches: Logical Constraints in Unsupervised Anomaly
Detection and Localization", IJCV 2022), as distributed in ``mvtec_loco_anomaly_detection.tar.xz``.

Layout (as read by openvinotoolkit/anomalib ``data/datasets/image/mvtec_loco.py``)::

    {root}/{category}/train/good/NNN.png
    {root}/{category}/validation/good/NNN.png
    {root}/{category}/test/{good,logical_anomalies,structural_anomalies}/NNN.png
    {root}/{category}/ground_truth/{logical_anomalies,structural_anomalies}/NNN/000.png[, 001.png ...]

Each anomalous image has a *folder* of masks (one per defect region); their pixel values encode the defect type
(238..255). As the ZSAD papers do, the annotation is the union of all masks binarised at > 0 (the sample's
``mask_path`` is the folder; :func:`zsadbench.data.read_mask` merges it). ``anomalies="logical"`` or
``"structural"`` keeps only that kind among the anomalous test images (all normal test images stay), so the two
kinds can be scored separately.
"""

from __future__ import annotations

from pathlib import Path

from zsadbench.data import DataError, DatasetLayoutError, list_images
from zsadbench.registry import Archive, register_dataset
from zsadbench.types import Dataset, Sample

LOCO_LAYOUT = """\
  {root}/{category}/train/good/*.png
  {root}/{category}/validation/good/*.png
  {root}/{category}/test/{good,logical_anomalies,structural_anomalies}/NNN.png
  {root}/{category}/ground_truth/{logical_anomalies,structural_anomalies}/NNN/000.png (one folder per image)"""

KINDS = {"logical": "logical_anomalies", "structural": "structural_anomalies"}
CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")


def find_root(root: Path, marker: str, layout: str, dataset: str) -> tuple[Path, list[Path]]:
    """Returns (the folder holding the category folders, those folders): ``root`` itself or its only sub-folder
    (archives that unpack into one top folder); each category folder holds ``marker``."""
    def categories(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir() and (p / marker).is_dir()) if folder.is_dir() else []

    if not root.exists():
        raise DatasetLayoutError(f"data root {root} does not exist. Expected layout for {dataset}:\n{layout}")
    found = categories(root)
    if not found:
        subfolders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subfolders) == 1 and categories(subfolders[0]):
            return subfolders[0], categories(subfolders[0])
        raise DatasetLayoutError(f"{root} is not a {dataset} root: no category folder with a {marker}/ subfolder. "
                                 f"Expected layout:\n{layout}")
    return root, found


@register_dataset(
    "mvtec_loco", description="MVTec LOCO AD (5 categories; logical and structural anomalies, merged masks)",
    layout=LOCO_LAYOUT, license="CC BY-NC-SA 4.0",
    homepage="https://www.mvtec.com/company/research/datasets/mvtec-loco",
    archives=(Archive(
        "https://www.mydrive.ch/shares/48237/1b9106ccdfbb09a0c414bd49fe44a14a/download/430647091-1646842701/"
        "mvtec_loco_anomaly_detection.tar.xz",
        "9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687",
        "openvinotoolkit/anomalib src/anomalib/data/datasets/image/mvtec_loco.py DOWNLOAD_INFO "
        "@ b7233686172e3485bfbe01272a8cd7a7e4576986"),),
    categories=CATEGORIES)
def load_mvtec_loco(root: Path, anomalies: str = "all") -> Dataset:
    """MVTec LOCO AD: 5 categories, logical and structural anomalies, masks merged per image (option anomalies)."""
    if anomalies not in ("all", *KINDS):
        raise ValueError(f"mvtec_loco option anomalies={anomalies!r}: choose all, logical or structural")
    keep = set(KINDS.values()) if anomalies == "all" else {KINDS[anomalies]}
    root, categories = find_root(root, "test", LOCO_LAYOUT, "mvtec_loco")
    samples: list[Sample] = []
    for cat_dir in categories:
        category = cat_dir.name
        for split, folder in (("train", cat_dir / "train" / "good"), ("validation", cat_dir / "validation" / "good"),
                              ("test", cat_dir / "test" / "good")):
            if folder.is_dir():
                samples += [Sample(i, category, 0, None, "good", "mvtec_loco", "industrial", split)
                            for i in list_images(folder)]
        for kind in sorted(KINDS.values()):
            folder = cat_dir / "test" / kind
            if not folder.is_dir():
                continue
            for image in list_images(folder):
                mask_dir = cat_dir / "ground_truth" / kind / image.stem
                if not mask_dir.is_dir():
                    raise DataError(f"anomalous image {image} has no mask folder {mask_dir} (LOCO keeps one folder "
                                    f"of masks per image). Expected layout:\n{LOCO_LAYOUT}")
                if kind in keep:
                    samples.append(Sample(image, category, 1, mask_dir, kind, "mvtec_loco", "industrial", "test"))
        if not any(s.category == category and s.split == "test" for s in samples):
            raise DataError(f"category {category!r} of mvtec_loco has no test images under {cat_dir / 'test'}")
    suffix = "" if anomalies == "all" else f" ({anomalies} anomalies only)"
    return Dataset("mvtec_loco", root, samples, "industrial", "MVTec LOCO AD" + suffix)
