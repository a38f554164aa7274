"""BMAD medical subsets (Bao et al., "BMAD: Benchmarks for Medical Anomaly Detection", CVPR Workshops 2024,
https://arxiv.org/abs/2306.11876; DorisBao/BMAD), in BMAD's layout.

Six re-organised sets: BrainMRI (BraTS2021 slices), LiverCT (BTCV + LiTS), RESC (retinal OCT) with pixel labels;
OCT17 (OCT2017), ChestXray (RSNA) and HIS (Camelyon16 patches) image-level only. Layout (DorisBao/BMAD README.md)::

    pixel-level:  {root}/{train,valid,test}/good/img/*.png
                  {root}/{valid,test}/Ungood/img/*.png  with  {root}/{valid,test}/Ungood/label/*.png (same name)
    image-level:  {root}/{train,valid,test}/good/*.png   {root}/{valid,test}/Ungood/*.png

``Ungood`` is the literal name of the anomalous folder. ``root`` may be the subset's folder itself or a folder that
holds it under one of its usual names (BMAD's Drive folder, anomalib's re-pack, the MVFA preparation use different
ones). ``valid`` becomes the ``validation`` split. A ``label`` folder beside ``good/img`` (all-zero masks) is ignored;
MVFA's ``anomaly_mask`` folder name is accepted for ``label``.
"""

from __future__ import annotations

from pathlib import Path

from zsadbench.data import DataError, DatasetLayoutError, list_images
from zsadbench.registry import register_dataset
from zsadbench.types import Dataset, Sample

BMAD_LAYOUT = """\
  pixel-level (bmad_brainmri, bmad_liverct, bmad_resc):
    {root}/{train,valid,test}/good/img/*.png
    {root}/{valid,test}/Ungood/img/*.png and {root}/{valid,test}/Ungood/label/*.png (same file names)
  image-level (bmad_oct17, bmad_chestxray, bmad_his):
    {root}/{train,valid,test}/good/*.png and {root}/{valid,test}/Ungood/*.png
  ({root} may also be a folder holding the subset under its usual name, e.g. Brain/ or Retina_RESC/)"""

OBTAIN = """\
BMAD is distributed through Google Drive (no direct download):
  1. Open https://drive.google.com/drive/folders/1La5H_3tqWioPmGN04DM1vdl3rbcBez62 and download the subset's
     archive (the folder also holds the other subsets).
  2. Unzip it; point --root at the subset's folder (the one holding train/, valid/, test/) or at its parent.
  (anomalib also fetches an unofficial re-pack of all six, huggingface.co/datasets/code-dev05/BMAD bmad.zip, SHA-256
  df655def31f3f638a91c567550de54d6e45a74b2368f666c13a6a3052c063165 per openvinotoolkit/anomalib
  src/anomalib/data/datamodules/image/bmad.py @ b7233686; its folders are Brain, Liver, Retina_RESC, Retina_OCT2017,
  Chest, Histopathology.)
  Licences follow the source datasets (BraTS2021, BTCV/LiTS, RESC, OCT2017, RSNA, Camelyon16)."""

SPLITS = {"train": "train", "valid": "validation", "test": "test"}
MASK_FOLDERS = ("label", "anomaly_mask")

# name -> (category, pixel-level, folder names it is found under, description, source datasets)
SUBSETS = {
    "bmad_brainmri": ("brain", True, ("Brain", "BrainMRI", "BraTS2021_slice", "brain", "Brain_AD"),
                      "BMAD Brain MRI (BraTS2021 slices; pixel-level)", "BraTS2021"),
    "bmad_liverct": ("liver", True, ("Liver", "LiverCT", "liver", "Liver_AD"),
                     "BMAD Liver CT (BTCV + LiTS; pixel-level)", "BTCV, LiTS"),
    "bmad_resc": ("retina_resc", True, ("RESC", "Retina_RESC", "resc", "Retina_RESC_AD"),
                  "BMAD RESC retinal OCT (pixel-level)", "RESC"),
    "bmad_oct17": ("retina_oct2017", False, ("OCT2017", "Retina_OCT2017", "OCT17", "oct2017", "Retina_OCT2017_AD"),
                   "BMAD OCT2017 retinal OCT (image-level)", "OCT2017 (Kermany et al.)"),
    "bmad_chestxray": ("chest", False, ("Chest", "ChestXray", "RSNA", "chest", "Chest_AD"),
                       "BMAD chest X-ray (RSNA; image-level)", "RSNA Pneumonia Detection Challenge"),
    "bmad_his": ("histopathology", False, ("Histopathology", "HIS", "camelyon16", "Camelyon16", "His",
                                           "Histopathology_AD"),
                 "BMAD histopathology (Camelyon16 patches; image-level)", "Camelyon16"),
}


def find_subset(root: Path, names: tuple[str, ...]) -> Path:
    """Returns the subset folder (holding test/): ``root`` itself or ``root/<one of names>``."""
    if (root / "test").is_dir():
        return root
    for name in names:
        if (root / name / "test").is_dir():
            return root / name
    if not root.exists():
        raise DatasetLayoutError(f"data root {root} does not exist. Expected BMAD layout:\n{BMAD_LAYOUT}")
    raise DatasetLayoutError(f"{root} holds no BMAD subset: no test/ folder in it or in {', '.join(names)}. "
                             f"Expected layout:\n{BMAD_LAYOUT}")


def read_bmad(root: Path, dataset: str, category: str, pixel_level: bool) -> list[Sample]:
    """Returns the samples of one BMAD subset folder."""
    samples: list[Sample] = []
    for folder_name, split in SPLITS.items():
        split_dir = root / folder_name
        if not split_dir.is_dir():
            continue
        for kind, label in (("good", 0), ("Ungood", 1)):
            kind_dir = split_dir / kind
            if not kind_dir.is_dir():
                continue
            image_dir = kind_dir / "img"
            if pixel_level != image_dir.is_dir():
                expected = f"{kind_dir}/img/" if pixel_level else f"images directly in {kind_dir}/"
                raise DataError(f"{dataset}: expected {expected} (BMAD's "
                                f"{'pixel' if pixel_level else 'image'}-level layout). Expected layout:\n{BMAD_LAYOUT}")
            images = list_images(image_dir if pixel_level else kind_dir)
            masks: dict[str, Path] = {}
            if pixel_level and label:
                mask_dir = next((kind_dir / m for m in MASK_FOLDERS if (kind_dir / m).is_dir()), None)
                if mask_dir is None:
                    raise DataError(f"{kind_dir} has img/ but no label/ folder: the anomalous images of {dataset} "
                                    "need their masks")
                masks = {p.stem: p for p in list_images(mask_dir)}
                stray = sorted(set(masks) - {p.stem for p in images})
                if stray:
                    raise DataError(f"mask {masks[stray[0]]} matches no image in {image_dir}")
            for image in images:
                mask = masks.get(image.stem) if label else None
                if pixel_level and label and mask is None:
                    raise DataError(f"anomalous image {image} has no mask with the same name in "
                                    f"{kind_dir / 'label'}")
                samples.append(Sample(image, category, label, mask, kind if label else "good", dataset, "medical",
                                      split))
    if not any(s.split == "test" for s in samples):
        raise DataError(f"{dataset}: no test images under {root / 'test'}")
    return samples


def _register(name: str) -> None:
    category, pixel_level, folder_names, description, sources = SUBSETS[name]

    def load(root: Path) -> Dataset:
        subset = find_subset(root, folder_names)
        return Dataset(name, subset, read_bmad(subset, name, category, pixel_level), "medical", description)

    load.__doc__ = description
    register_dataset(name, domain="medical", description=description, layout=BMAD_LAYOUT,
                     license=f"research use; terms of the source data ({sources})",
                     homepage="https://github.com/DorisBao/BMAD", obtain=OBTAIN, categories=(category,))(load)


for _name in SUBSETS:
    _register(_name)
