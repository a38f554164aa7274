"""Real-IAD (Wang et al., "Real-IAD: A Real-World Multi-View Dataset for Benchmarking Versatile Industrial Anomaly
Detection", CVPR 2024, https://arxiv.org/abs/2403.12580), gated on Hugging Face (REAL-IAD/Real-IAD).

Layout (openvinotoolkit/anomalib ``data/datasets/image/realiad.py``)::

    {root}/realiad_{256,512,1024,raw}/{category}/OK/SXXXX/{category}_XXXX_OK_C{1..5}_{time}.jpg
    {root}/realiad_{res}/{category}/NG/{defect}/SXXXX/{category}_XXXX_NG_C{1..5}_{time}.jpg  (+ ..._mask.png)
    {root}/realiad_jsons/{realiad_jsons,realiad_jsons_sv,realiad_jsons_fuiad_0.0..0.4}/{category}.json

Each split file is ``{"meta": {...}, "train": [entry, ...], "test": [entry, ...]}`` with entries
``{"category", "anomaly_class", "image_path", "mask_path"}``; ``anomaly_class == "OK"`` is normal (also for the
views of a defective part in which the defect is not visible), anything else is the defect code; ``mask_path`` is
null for normal views. Paths are relative to ``realiad_{res}/{category}`` (anomalib) or to ``realiad_{res}`` when they
start with the category; the loader accepts both.

Protocol: the image-level one ZSAD papers report on Real-IAD: every view is an independent test image (no
aggregation of the five views of a part into one sample score). Options: ``resolution`` (256/512/1024/raw; default:
the only ``realiad_*`` folder present), ``split_files`` (default ``realiad_jsons``, the multi-view split; ``_sv`` is
the single-view one) and ``views`` (e.g. ``C1,C3``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from zsadbench.data import DataError, DatasetLayoutError
from zsadbench.registry import register_dataset
from zsadbench.types import Dataset, Sample

REALIAD_LAYOUT = """\
  {root}/realiad_{256|512|1024|raw}/{category}/OK/SXXXX/{category}_XXXX_OK_C{1..5}_*.jpg
  {root}/realiad_{res}/{category}/NG/{defect}/SXXXX/*_NG_C{1..5}_*.jpg and *_mask.png
  {root}/realiad_jsons/{realiad_jsons|realiad_jsons_sv|realiad_jsons_fuiad_0.x}/{category}.json"""

RESOLUTIONS = ("256", "512", "1024", "raw")
CATEGORIES = ("audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
              "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
              "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1",
              "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper")
VIEW = re.compile(r"_(C[1-5])_")

OBTAIN = """\
Real-IAD is gated (CC BY-NC-SA 4.0, non-commercial):
  1. Sign in to Hugging Face and accept the terms at https://huggingface.co/datasets/REAL-IAD/Real-IAD
  2. pip install -U huggingface_hub && huggingface-cli login
  3. huggingface-cli download REAL-IAD/Real-IAD --repo-type dataset --local-dir <root>
  4. Unzip every archive there in place (the JSON split files and at least one resolution), so that the folders
     below exist; the other resolutions can be left out."""


def _split_dir(root: Path, split_files: str) -> Path:
    for candidate in (root / "realiad_jsons" / split_files, root / split_files):
        if candidate.is_dir():
            return candidate
    raise DatasetLayoutError(f"{root}: no split files folder realiad_jsons/{split_files}/ (unzip realiad_jsons.zip "
                             f"there). Expected layout:\n{REALIAD_LAYOUT}")


def _image_dir(root: Path, resolution: str | None) -> Path:
    present = [r for r in RESOLUTIONS if (root / f"realiad_{r}").is_dir()]
    if resolution is not None:
        resolution = str(resolution)
        if resolution not in RESOLUTIONS:
            raise ValueError(f"realiad option resolution={resolution!r}: choose one of {RESOLUTIONS}")
        if resolution not in present:
            raise DatasetLayoutError(f"{root} has no realiad_{resolution}/ folder (present: "
                                     f"{', '.join(f'realiad_{r}' for r in present) or 'none'})")
        return root / f"realiad_{resolution}"
    if len(present) == 1:
        return root / f"realiad_{present[0]}"
    if not present:
        raise DatasetLayoutError(f"{root} is not a Real-IAD root: no realiad_<resolution>/ folder. Expected "
                                 f"layout:\n{REALIAD_LAYOUT}")
    raise ValueError(f"{root} holds several resolutions ({', '.join(present)}); choose one with the dataset option "
                     "resolution=...")


def _resolve(images: Path, category: str, relative: str) -> Path:
    """Returns the file an entry path names: relative to realiad_{res}/{category}, or to realiad_{res}."""
    inside = images / category / relative
    return inside if inside.exists() or not (images / relative).exists() else images / relative


@register_dataset("realiad", description="Real-IAD (30 categories x 5 views; image-level protocol, JSON splits)",
                  layout=REALIAD_LAYOUT, license="CC BY-NC-SA 4.0 (gated: accept the terms on Hugging Face)",
                  homepage="https://huggingface.co/datasets/REAL-IAD/Real-IAD", obtain=OBTAIN,
                  categories=CATEGORIES)
def load_realiad(root: Path, resolution: str | None = None, split_files: str = "realiad_jsons",
                 views: str = "C1,C2,C3,C4,C5") -> Dataset:
    """Real-IAD: 30 categories, five camera views, JSON split files; each view is one test image."""
    if not root.is_dir():
        raise DatasetLayoutError(f"data root {root} does not exist. Expected layout for realiad:\n{REALIAD_LAYOUT}")
    wanted = {v.strip().upper() for v in views.split(",") if v.strip()}
    if not wanted or not wanted <= {f"C{i}" for i in range(1, 6)}:
        raise ValueError(f"realiad option views={views!r}: a comma-separated subset of C1..C5")
    splits = _split_dir(root, split_files)
    images = _image_dir(root, resolution)
    files = sorted(splits.glob("*.json"))
    if not files:
        raise DatasetLayoutError(f"{splits} holds no <category>.json split files")
    samples: list[Sample] = []
    for file in files:
        category = file.stem
        if not (images / category).is_dir():
            continue  # a category whose images were not unzipped at this resolution
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {file}: {exc}") from None
        if not isinstance(meta, dict) or "test" not in meta:
            raise DataError(f"{file}: expected an object with 'train' and 'test' lists")
        for split in ("train", "test"):
            for n, entry in enumerate(meta.get(split) or []):
                where = f"{file} [{split}][{n}]"
                try:
                    relative, anomaly_class = entry["image_path"], entry["anomaly_class"]
                except (KeyError, TypeError):
                    raise DataError(f"{where}: entry lacks image_path or anomaly_class") from None
                match = VIEW.search(Path(relative).name)
                if match is None:
                    raise DataError(f"{where}: cannot read the camera view (_C1_.._C5_) from {relative!r}")
                if match.group(1) not in wanted:
                    continue
                image = _resolve(images, category, relative)
                if not image.is_file():
                    raise DataError(f"{where}: image not found: {image}")
                label = 0 if anomaly_class == "OK" else 1
                mask = None
                if entry.get("mask_path") and label:
                    mask = _resolve(images, category, entry["mask_path"])
                    if not mask.is_file():
                        raise DataError(f"{where}: mask not found: {mask}")
                samples.append(Sample(image, category, label, mask, "good" if not label else str(anomaly_class),
                                      "realiad", "industrial", split))
    if not any(s.split == "test" for s in samples):
        raise DatasetLayoutError(f"{root}: no test image found for the categories in {splits} under {images}. "
                                 f"Expected layout:\n{REALIAD_LAYOUT}")
    return Dataset("realiad", root, samples, "industrial", f"Real-IAD ({images.name}, {split_files})")
