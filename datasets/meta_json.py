"""The ``meta.json`` index written by APRIL-GAN, AnomalyCLIP and AdaCLIP for every dataset they prepare.

Schema (ByChelsea/VAND-APRIL-GAN ``data/mvtec.py``; zqhang/AnomalyCLIP ``generate_dataset_json/*.py``)::

    {"train": {cls_name: [record, ...]}, "test": {cls_name: [record, ...]}}
    record = {"img_path": str, "mask_path": str ("" = none), "cls_name": str, "specie_name": str, "anomaly": 0|1}

Paths are absolute (the medical scripts prefix the root) or relative to the folder holding meta.json. The DAGM script
writes capitalised ``Train``/``Test`` keys. As in AnomalyCLIP, a ``mask_path`` that is empty or resolves to a
directory means "no mask": normal images then get an all-zero mask, anomalous ones make the category image-level.
"""

from __future__ import annotations

import json
from pathlib import Path

from zsadbench.data import DataError, DatasetLayoutError
from zsadbench.registry import register_dataset
from zsadbench.types import Dataset, Sample

META_LAYOUT = """\
  {root}/meta.json  with {"train": {...}, "test": {category: [{"img_path", "mask_path", "cls_name",
                          "specie_name", "anomaly"}, ...]}}  (APRIL-GAN / AnomalyCLIP / AdaCLIP format)"""

_REQUIRED = ("img_path", "mask_path", "cls_name", "anomaly")


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def read_meta_json(path: Path, dataset: str, *, domain: str = "industrial", mask_threshold: int = 0) -> list[Sample]:
    """Returns the samples listed in a meta.json file; every referenced image must exist."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetLayoutError(f"{path} not found. Expected layout:\n{META_LAYOUT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: top level must be an object with train/test keys")
    splits = {key.lower(): value for key, value in meta.items()}
    if "test" not in splits:
        raise DataError(f"{path}: no 'test' (or 'Test') key; found {sorted(meta)}")
    base = path.parent
    samples: list[Sample] = []
    for split in ("train", "test"):
        for category, records in (splits.get(split) or {}).items():
            for n, record in enumerate(records):
                where = f"{path} [{split}][{category!r}][{n}]"
                missing = [k for k in _REQUIRED if k not in record]
                if missing:
                    raise DataError(f"{where}: record lacks {', '.join(missing)}")
                image = _resolve(base, record["img_path"])
                if not image.is_file():
                    raise DataError(f"{where}: image not found: {image}")
                label = int(record["anomaly"])
                mask = None
                if record["mask_path"]:
                    mask = _resolve(base, record["mask_path"])
                    if mask.is_dir():
                        mask = None
                    elif not mask.is_file():
                        raise DataError(f"{where}: mask not found: {mask}")
                defect = record.get("specie_name") or ("anomaly" if label else "good")
                samples.append(Sample(image, str(record["cls_name"]), label, mask, defect, dataset, domain,
                                      split, mask_threshold))
    if not any(s.split == "test" for s in samples):
        raise DataError(f"{path}: the test split lists no images")
    return samples


@register_dataset("meta", description="any dataset indexed by an APRIL-GAN/AnomalyCLIP meta.json", layout=META_LAYOUT)
def load_meta(root: Path, name: str = "meta", domain: str = "industrial", mask_threshold: int = 0) -> Dataset:
    """Any benchmark prepared with a meta.json (options: name, domain, mask_threshold)."""
    file = root if root.suffix == ".json" else root / "meta.json"
    return Dataset(name, file.parent, read_meta_json(file, name, domain=domain, mask_threshold=int(mask_threshold)),
                   domain, f"meta.json at {file}")


def _register_prepared(name: str, description: str, domain: str, mask_threshold: int, source: str,
                       license: str) -> None:
    """Registers a benchmark prepared with the ZSAD reference scripts (meta.json) or as an MVTec-style tree."""
    from zsadbench.datasets.mvtec import MVTEC_LAYOUT, load_tree_or_meta

    def load(root: Path) -> Dataset:
        return load_tree_or_meta(root, name, domain=domain, description=description, mask_threshold=mask_threshold)

    load.__doc__ = description
    obtain = (f"1. Download the raw data: {source}.\n"
              f"2. Either write meta.json with the matching script of zqhang/AnomalyCLIP generate_dataset_json/ "
              f"(paths relative to the root or absolute), or use the pre-converted MVTec-style archive linked in "
              f"caoyunkang/AdaCLIP README.md (Google Drive / Baidu).")
    register_dataset(name, domain=domain, description=description, layout=MVTEC_LAYOUT, license=license,
                     obtain=obtain)(load)


# Benchmarks distributed in their own formats and prepared by AnomalyCLIP's generate_dataset_json scripts (meta.json)
# or by AdaCLIP's converters (MVTec-style trees). JPEG masks (TN3K, Kvasir-SEG) are binarised at > 127.
KAGGLE_TERMS = "Kaggle dataset terms (see its page)"
for _name, _description, _domain, _threshold, _source, _license in [
    ("sdd", "KolektorSDD as prepared by AnomalyCLIP (SDD.py)", "industrial", 0,
     "KolektorSDD, https://go.vicos.si/kolektorsdd (KolektorSDD.zip; SHA-256 65dc621693418585de9c4467d1340ea7958a"
     "6181816f0dc2883a1e8b61f9d4dc per openvinotoolkit/anomalib datamodules/image/kolektor.py)", "CC BY-NC-SA 4.0"),
    ("dagm", "DAGM 2007 (10 textures; capitalised Train/Test keys)", "industrial", 0,
     "Kaggle mhskjelvareid/dagm-2007-competition-dataset-optical-inspection", "unclear (competition data)"),
    ("brainmri", "BrainMRI (image-level)", "medical", 0,
     "Kaggle navoneel/brain-mri-images-for-brain-tumor-detection (brain_tumor_dataset/{yes,no})", KAGGLE_TERMS),
    ("headct", "HeadCT (image-level)", "medical", 0,
     "Kaggle felipekitamura/head-ct-hemorrhage (head_ct/*.png + labels.csv)", KAGGLE_TERMS),
    ("br35h", "Br35H (image-level)", "medical", 0,
     "Kaggle ahmedhamada0/brain-tumor-detection ({yes,no}; delete pred/)", KAGGLE_TERMS),
    ("isic", "ISIC 2016 skin lesions (pixel-level)", "medical", 0,
     "https://isic-challenge-data.s3.amazonaws.com/2016/ISBI2016_ISIC_Part1_Test_Data.zip and its ground truth",
     "ISIC challenge terms"),
    ("clinicdb", "CVC-ClinicDB polyps (pixel-level)", "medical", 0,
     "the PraNet/Polyp-PVT polyp pack, figshare 21221579", "source dataset terms"),
    ("colondb", "CVC-ColonDB polyps (pixel-level)", "medical", 0,
     "the PraNet/Polyp-PVT polyp pack, figshare 21221579", "source dataset terms"),
    ("kvasir", "Kvasir-SEG polyps (pixel-level; JPEG masks at > 127)", "medical", 127,
     "the PraNet/Polyp-PVT polyp pack, figshare 21221579", "source dataset terms"),
    ("endo", "EndoTect polyps (pixel-level)", "medical", 0,
     "Google Drive file 1LNpLkv5ZlEUzr_RPN5rdOHaqk0SkZa3m (linked in zqhang/AnomalyCLIP README.md)",
     "source dataset terms"),
    ("tn3k", "TN3K thyroid nodules (pixel-level; JPEG masks at > 127)", "medical", 127,
     "via haifangong/TRFE-Net-for-thyroid-nodule-segmentation (tn3k/test-image, test-mask)", "source dataset terms"),
]:
    _register_prepared(_name, _description, _domain, _threshold, _source, _license)
