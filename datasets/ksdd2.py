"""KolektorSDD2 (Božič et al., "Mixed supervision for surface-defect detection: from weakly to fully supervised
learning", Computers in Industry 2021, https://arxiv.org/abs/2104.06064), as distributed by ViCoS.

Layout (vicoslab/mixed-segdec-net-comind2021 ``data/input_ksdd2.py``)::

    {root}/train/NNNNN.png  {root}/train/NNNNN_GT.png
    {root}/test/NNNNN.png   {root}/test/NNNNN_GT.png

Every image has a ground-truth file; an image is defective iff its GT has a non-zero pixel (the all-zero GTs of
normal images are dropped: the evaluator gives normal images an all-zero mask of their own size). Images are
non-square (about 230 x 630). One category, ``ksdd2``; the official train split also holds defective images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from zsadbench.data import DataError, DatasetLayoutError, list_images
from zsadbench.registry import Archive, register_dataset
from zsadbench.types import Dataset, Sample

KSDD2_LAYOUT = """\
  {root}/train/NNNNN.png and NNNNN_GT.png
  {root}/test/NNNNN.png and NNNNN_GT.png   (defective iff the GT has a non-zero pixel)"""


def _gt_has_defect(path: Path) -> bool:
    try:
        with Image.open(path) as gt:
            return bool(np.asarray(gt.convert("L")).any())
    except OSError as exc:
        raise DataError(f"cannot read ground truth {path}: {exc}") from None


@register_dataset(
    "ksdd2", description="KolektorSDD2 (surface defects; GT for every image, positive iff non-zero)",
    layout=KSDD2_LAYOUT, license="CC BY-NC-SA 4.0 (as commonly reported; not confirmed from a primary source)",
    homepage="https://www.vicos.si/resources/kolektorsdd2/",
    archives=(Archive("https://go.vicos.si/kolektorsdd2", None,
                      "none published: vicoslab/mixed-segdec-net-comind2021 datasets/KSDD2/download_and_extract.py "
                      "downloads http://go.vicos.si/kolektorsdd2 without a checksum", filename="KolektorSDD2.zip",
                      mirrors=("http://go.vicos.si/kolektorsdd2",)),),
    categories=("ksdd2",),
    counts={"total": {"train": 2331, "test_normal": 894, "test_anomalous": 110}},
    counts_source="official split as commonly reported: train 246 defective + 2085 normal, test 110 + 894")
def load_ksdd2(root: Path) -> Dataset:
    """KolektorSDD2: train/test folders, NNNNN.png with NNNNN_GT.png, defective iff the GT is non-zero."""
    from zsadbench.datasets.mvtec_loco import find_root

    base = root
    if not (root / "test").is_dir():
        parent, found = find_root(root, "test", KSDD2_LAYOUT, "ksdd2")  # the archive's top folder, if any
        base = found[0] if len(found) == 1 else parent
    if not (base / "test").is_dir():
        raise DatasetLayoutError(f"{root} is not a KolektorSDD2 root (no test/ folder). Expected layout:\n"
                                 f"{KSDD2_LAYOUT}")
    samples: list[Sample] = []
    for split in ("train", "test"):
        folder = base / split
        if not folder.is_dir():
            continue
        files = list_images(folder)
        gts = {p.stem.removesuffix("_GT"): p for p in files if p.stem.endswith("_GT")}
        images = [p for p in files if not p.stem.endswith("_GT")]
        stray = sorted(set(gts) - {p.stem for p in images})
        if stray:
            raise DataError(f"ground truth {gts[stray[0]]} matches no image in {folder}")
        for image in images:
            gt = gts.get(image.stem)
            if gt is None:
                raise DataError(f"image {image} has no ground truth {folder / (image.stem + '_GT.png')} (KSDD2 has "
                                "one for every image)")
            defective = _gt_has_defect(gt)
            samples.append(Sample(image, "ksdd2", int(defective), gt if defective else None,
                                  "defect" if defective else "good", "ksdd2", "industrial", split))
    return Dataset("ksdd2", base, samples, "industrial", "KolektorSDD2")
