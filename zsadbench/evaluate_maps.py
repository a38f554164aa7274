"""Scores anomaly maps written by any tool with zsadbench's metric engine (``zsadbench evaluate``).

The maps are stored as the MVTec AD evaluation scripts expect them::

    {maps_dir}/{category}/test/{defect}/{image stem}.tiff     one float map per test image, any size
    {maps_dir}/{category}/scores.csv                          optional image scores (columns: image, score)

Each map is resized to its ground-truth mask (bilinear, ``align_corners=False``: what the evaluator does at native
resolution; recorded as the ``map_resize`` setting) and compared with it there. An image's score is the maximum of
its map as stored, unless ``scores.csv`` gives one; that file's ``image`` column names the image as
``{defect}/{stem}`` (a leading ``test/`` and a file extension are accepted), and when present it must list every
test image of the category.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zsadbench.data import DataError, read_mask
from zsadbench.evaluation import CategoryResult, EvaluationResult
from zsadbench.metrics import CategoryMetrics, metric_tags
from zsadbench.types import Dataset, Sample

MAP_EXTENSIONS = (".tiff", ".tif")
_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}  # image extensions accepted in scores.csv
SETTINGS = {"map_resize": "bilinear, align_corners=False, to the mask's size", "image_score": "map max or scores.csv"}


def map_path(maps_dir: Path, sample: Sample) -> Path:
    """Returns where the map of ``sample`` is expected: ``{maps_dir}/{category}/test/{defect}/{stem}.tiff``."""
    folder = Path(maps_dir) / sample.category / "test" / sample.defect_type
    stem = Path(sample.image_path).stem
    for extension in MAP_EXTENSIONS:
        if (folder / f"{stem}{extension}").is_file():
            return folder / f"{stem}{extension}"
    return folder / f"{stem}.tiff"


def read_map(path: Path) -> np.ndarray:
    """Returns the (H, W) float map stored in a TIFF file; errors name the file."""
    import tifffile

    if not path.is_file():
        raise DataError(f"anomaly map not found: {path}")
    try:
        data = tifffile.imread(path)
    except Exception as exc:  # tifffile raises a variety of errors on damaged files
        raise DataError(f"cannot read anomaly map {path}: {exc}") from None
    data = np.squeeze(np.asarray(data))
    if data.ndim != 2:
        raise DataError(f"anomaly map {path} has shape {data.shape}; expected one (H, W) channel")
    if data.dtype.kind not in "fiu":
        raise DataError(f"anomaly map {path} has dtype {data.dtype}; expected float scores")
    if data.dtype.kind == "f" and np.isnan(data.max()):
        raise DataError(f"anomaly map {path} contains NaN")
    return data


def read_scores(path: Path, samples: list[Sample]) -> dict[Path, float]:
    """Returns the image scores listed in a ``scores.csv`` keyed by image path (every sample must be listed)."""
    by_key = {f"{s.defect_type}/{Path(s.image_path).stem}": s for s in samples}
    scores: dict[Path, float] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "score"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a header with columns 'image' and 'score', got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            key = row["image"].strip().removeprefix("test/")
            key = str(Path(key).with_suffix("")) if Path(key).suffix.lower() in _SUFFIXES else key
            if key not in by_key:
                raise DataError(f"{path}:{line}: image {row['image']!r} is not a test image of category "
                                f"{samples[0].category!r} (expected '<defect>/<stem>')")
            try:
                value = float(row["score"])
            except ValueError:
                raise DataError(f"{path}:{line}: score {row['score']!r} is not a number") from None
            if np.isnan(value):
                raise DataError(f"{path}:{line}: score is NaN")
            scores[Path(by_key[key].image_path)] = value
    missing = [k for k, s in by_key.items() if Path(s.image_path) not in scores]
    if missing:
        raise DataError(f"{path} has no score for {len(missing)} test image(s) of category "
                        f"{samples[0].category!r}, e.g. {missing[:3]}")
    return scores


def resize_to(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Returns ``amap`` bilinearly resized to (H, W) (align_corners=False), float32; unchanged if already that size."""
    if amap.shape == tuple(size):
        return amap
    tensor = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def evaluate_category_maps(maps_dir: str | Path, dataset: Dataset, category: str, aupro: str = "exact",
                           fpr_limit: float = 0.3, progress: bool = True) -> CategoryResult:
    """Returns the metrics of the maps stored for one category of ``dataset``."""
    start = time.perf_counter()
    maps_dir = Path(maps_dir)
    samples = dataset.test(category)
    if not samples:
        raise DataError(f"category {category!r} of dataset {dataset.name!r} has no test images")
    if not (maps_dir / category).is_dir():
        raise DataError(f"no anomaly maps for category {category!r}: {maps_dir / category} is not a folder")
    anomalous = [s for s in samples if s.label == 1]
    pixel = all(s.mask_path is not None for s in anomalous)
    csv_path = maps_dir / category / "scores.csv"
    given = read_scores(csv_path, samples) if csv_path.is_file() else {}
    metrics = CategoryMetrics(pixel=pixel, aupro=aupro, fpr_limit=fpr_limit, category=category)
    image_scores: list[float] = []
    bar = tqdm(samples, desc=f"  {category}", unit="img", leave=False, disable=None if progress else True)
    for sample in bar:
        score = given.get(Path(sample.image_path))
        if pixel or score is None:  # an image-level category with scores.csv needs no maps
            amap = read_map(map_path(maps_dir, sample))
            score = float(amap.max()) if score is None else score
        image_scores.append(score)
        if pixel:
            mask = read_mask(sample)
            metrics.update(np.array([score]), np.array([sample.label]), [resize_to(amap, mask.shape)], [mask])
        else:
            metrics.update(np.array([score]), np.array([sample.label]))
    return CategoryResult(category, metrics.compute(), [str(s.image_path) for s in samples],
                          [s.label for s in samples], image_scores, seconds=time.perf_counter() - start)


def evaluate_anomaly_maps(maps_dir: str | Path, dataset: Dataset, categories: list[str] | None = None,
                          aupro: str = "exact", fpr_limit: float = 0.3, progress: bool = True) -> EvaluationResult:
    """Returns per-category results (and their mean, via the result) of the maps stored under ``maps_dir``."""
    maps_dir = Path(maps_dir)
    if not maps_dir.is_dir():
        raise DataError(f"anomaly-map folder not found: {maps_dir}")
    known = dataset.categories("test")
    categories = categories or known
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise DataError(f"dataset {dataset.name!r} has no test images for {unknown}; available: {known}")
    bar = tqdm(categories, desc=f"anomaly maps on {dataset.name}", unit="category",
               disable=None if progress else True)
    return EvaluationResult({c: evaluate_category_maps(maps_dir, dataset, c, aupro, fpr_limit, progress)
                             for c in bar}, metric_tags(aupro, fpr_limit))
