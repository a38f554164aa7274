"""MVTec AD and the benchmarks distributed in its folder layout (MPDD, BTAD, DTD-Synthetic).

Layout (Bergmann et al., "MVTec AD — A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection",
CVPR 2019; as read by openvinotoolkit/anomalib ``mvtec_ad.py``)::

    {root}/{category}/train/good/000.png
    {root}/{category}/test/good/000.png
    {root}/{category}/test/{defect}/000.png
    {root}/{category}/ground_truth/{defect}/000_mask.png

Masks are paired with images by file stem (``000`` ↔ ``000_mask`` or ``000``), never by sorted index as the ZSAD
reference scripts do; a mask without an image and an anomalous image without a mask are errors naming the file. A
category without a ``ground_truth`` folder is image-level only (AdaCLIP's re-packs of medical sets).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from zsadbench.data import DataError, DatasetLayoutError, DataWarning, list_images
from zsadbench.registry import Archive, register_dataset
from zsadbench.types import Dataset, Sample

MVTEC_LAYOUT = """\
  {root}/{category}/train/good/*.png
  {root}/{category}/test/good/*.png
  {root}/{category}/test/{defect}/*.png
  {root}/{category}/ground_truth/{defect}/{stem}_mask.png   (or {stem}.png)
  (or {root}/meta.json in the APRIL-GAN / AnomalyCLIP format)"""


def find_categories(root: Path) -> list[Path]:
    """Returns the category folders of an MVTec-style tree (those holding a ``test`` folder), sorted by name."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "test").is_dir())


def _pair_masks(defect_dir: Path, mask_dir: Path, images: list[Path],
                mask_suffixes: tuple[str, ...]) -> dict[Path, Path]:
    """Returns image → mask by stem; raises on a mask that matches no image (never pairs by index)."""
    masks = {p.stem: p for p in list_images(mask_dir)} if mask_dir.is_dir() else {}
    pairs: dict[Path, Path] = {}
    used: set[str] = set()
    for image in images:
        for suffix in mask_suffixes:
            key = image.stem + suffix
            if key in masks:
                pairs[image] = masks[key]
                used.add(key)
                break
    unmatched = sorted(set(masks) - used)
    if unmatched:
        raise DataError(f"mask {masks[unmatched[0]]} matches no image in {defect_dir}"
                        + (f" (and {len(unmatched) - 1} more unmatched masks)" if len(unmatched) > 1 else ""))
    return pairs


def read_tree(root: Path, dataset: str, *, normal_dirs: Iterable[str] = ("good",),
              mask_suffixes: tuple[str, ...] = ("_mask", ""), mask_threshold: int = 0,
              domain: str | Callable[[str], str] = "industrial", layout: str = MVTEC_LAYOUT) -> list[Sample]:
    """Returns the train and test samples of an MVTec-style tree; raises DatasetLayoutError when it is not one."""
    normal = set(normal_dirs)
    categories = find_categories(root)
    if not categories:
        raise DatasetLayoutError(f"{root} is not a {dataset} root: no category folder with a test/ subfolder. "
                                 f"Expected layout:\n{layout}")
    samples: list[Sample] = []
    for cat_dir in categories:
        category = cat_dir.name
        cat_domain = domain(category) if callable(domain) else domain
        gt_root = cat_dir / "ground_truth"
        train_dir = cat_dir / "train"
        if train_dir.is_dir():
            for folder in sorted(p for p in train_dir.iterdir() if p.is_dir()):
                label = 0 if folder.name in normal else 1
                for image in list_images(folder):
                    samples.append(Sample(image, category, label, None, folder.name, dataset, cat_domain, "train",
                                          mask_threshold))
        test_dirs = sorted(p for p in (cat_dir / "test").iterdir() if p.is_dir())
        for defect_dir in test_dirs:
            images = list_images(defect_dir)
            if defect_dir.name in normal:
                samples += [Sample(i, category, 0, None, defect_dir.name, dataset, cat_domain, "test",
                                   mask_threshold) for i in images]
                continue
            pairs = _pair_masks(defect_dir, gt_root / defect_dir.name, images, mask_suffixes)
            for image in images:
                mask = pairs.get(image)
                if mask is None and gt_root.is_dir():
                    raise DataError(f"anomalous image {image} has no mask in {gt_root / defect_dir.name} "
                                    f"(looked for {', '.join(image.stem + s + '.*' for s in mask_suffixes)})")
                samples.append(Sample(image, category, 1, mask, defect_dir.name, dataset, cat_domain, "test",
                                      mask_threshold))
        if not any(s.category == category and s.split == "test" for s in samples):
            # an empty category must not block the others; naming it with --categories is then an error
            warnings.warn(f"category {category!r} of {dataset} has no test images under {cat_dir / 'test'}; it is "
                          "left out", DataWarning, stacklevel=2)
    return samples


def load_tree_or_meta(root: Path, dataset: str, *, domain: str = "industrial", description: str = "",
                      layout: str = MVTEC_LAYOUT, **tree_options) -> Dataset:
    """Returns a dataset read from an MVTec-style tree at ``root``, or from ``root/meta.json`` when there is no tree."""
    from zsadbench.datasets.meta_json import read_meta_json

    if find_categories(root):
        samples = read_tree(root, dataset, domain=domain, layout=layout, **tree_options)
    elif (root / "meta.json").is_file():
        samples = read_meta_json(root / "meta.json", dataset, domain=domain,
                                 mask_threshold=tree_options.get("mask_threshold", 0))
    elif not root.exists():
        raise DatasetLayoutError(f"data root {root} does not exist. Expected layout for {dataset}:\n{layout}")
    else:
        raise DatasetLayoutError(f"{root} is not a {dataset} root: no category folders with test/ and no meta.json. "
                                 f"Expected layout:\n{layout}")
    return Dataset(dataset, root, samples, domain, description)


ANOMALIB = "openvinotoolkit/anomalib @ b7233686172e3485bfbe01272a8cd7a7e4576986"  # where the published hashes are

# train, test good, test defective per category: Bergmann et al., IJCV 2021, Table 1 (totals 3,629 / 467 / 1,258)
MVTEC_COUNTS = {
    category: {"train": train, "test_normal": good, "test_anomalous": bad}
    for category, train, good, bad in [
        ("bottle", 209, 20, 63), ("cable", 224, 58, 92), ("capsule", 219, 23, 109), ("carpet", 280, 28, 89),
        ("grid", 264, 21, 57), ("hazelnut", 391, 40, 70), ("leather", 245, 32, 92), ("metal_nut", 220, 22, 93),
        ("pill", 267, 26, 141), ("screw", 320, 41, 119), ("tile", 230, 33, 84), ("toothbrush", 60, 12, 30),
        ("transistor", 213, 60, 40), ("wood", 247, 19, 60), ("zipper", 240, 32, 119),
    ]
}
MVTEC_COUNTS["total"] = {"train": 3629, "test_normal": 467, "test_anomalous": 1258}


@register_dataset(
    "mvtec", description="MVTec AD (15 industrial categories)", layout=MVTEC_LAYOUT,
    license="CC BY-NC-SA 4.0 (readme.txt in the archive; commercial use by arrangement with MVTec)",
    homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
    archives=(Archive(
        "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
        "mvtec_anomaly_detection.tar.xz",
        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        f"{ANOMALIB} src/anomalib/data/datamodules/image/mvtecad.py DOWNLOAD_INFO",
        mirrors=("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
                 "420938113-1629952094/mvtec_anomaly_detection.tar.xz",)),),
    categories=tuple(c for c in MVTEC_COUNTS if c != "total"), counts=MVTEC_COUNTS,
    counts_source="Bergmann et al., IJCV 2021, Table 1")
def load_mvtec(root: Path) -> Dataset:
    """MVTec AD: 15 industrial categories, 3,629 train / 1,725 test images, pixel masks."""
    return load_tree_or_meta(root, "mvtec", description="MVTec AD")


@register_dataset(
    "mpdd", description="MPDD metal parts (6 categories)", layout=MVTEC_LAYOUT,
    license="not stated (stepanje/MPDD README gives none)", homepage="https://github.com/stepanje/MPDD",
    obtain="Download MPDD from the SharePoint link in https://github.com/stepanje/MPDD (README.md) and unpack it; "
           "its folders are already in the MVTec AD layout.",
    categories=("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"))
def load_mpdd(root: Path) -> Dataset:
    """MPDD: 6 metal-part categories in the MVTec AD layout."""
    return load_tree_or_meta(root, "mpdd", description="MPDD")


BTAD_LAYOUT = MVTEC_LAYOUT.replace("good", "ok").replace("{defect}", "ko").replace("{stem}_mask.png", "{stem}.png|.bmp")


@register_dataset(
    "btad", description="BTAD beanTech (3 categories; normal = ok, anomalous = ko)", layout=BTAD_LAYOUT,
    license="conflicting: CC-BY-SA per the dataset README, CC BY-NC-SA per anomalib's docstring",
    homepage="https://avires.dimi.uniud.it/papers/btad/btad.zip",
    archives=(Archive("https://avires.dimi.uniud.it/papers/btad/btad.zip",
                      "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
                      f"{ANOMALIB} src/anomalib/data/datamodules/image/btech.py DOWNLOAD_INFO"),),
    categories=("01", "02", "03"))
def load_btad(root: Path) -> Dataset:
    """BTAD: products 01/02/03, normal folder ``ok``, masks with the image's stem (.png or .bmp)."""
    if (root / "BTech_Dataset_transformed").is_dir():  # the zip's top folder
        root = root / "BTech_Dataset_transformed"
    return load_tree_or_meta(root, "btad", description="BTAD", layout=BTAD_LAYOUT, normal_dirs=("ok", "good"),
                             mask_suffixes=("", "_mask"))


@register_dataset(
    "dtd", description="DTD-Synthetic (12 textures)", layout=MVTEC_LAYOUT,
    license="unclear (derived from DTD)", homepage="https://github.com/zqhang/AnomalyCLIP",
    obtain="Download DTD-Synthetic from the Google Drive folder 10OyPzvI3H6llCZBxKxFlKWt1Pw1tkMK1 (linked in "
           "zqhang/AnomalyCLIP README.md) and unpack it; its folders are in the MVTec AD layout.",
    categories=("Blotchy_099", "Fibrous_183", "Marbled_078", "Matted_069", "Mesh_114", "Perforated_037",
                "Stratified_154", "Woven_001", "Woven_068", "Woven_104", "Woven_125", "Woven_127"))
def load_dtd(root: Path) -> Dataset:
    """DTD-Synthetic: 12 textures with synthetic defects in the MVTec AD layout."""
    return load_tree_or_meta(root, "dtd", description="DTD-Synthetic")
