"""Runs a detector over a dataset category by category and computes exact metrics as batches arrive.

Protocol (the papers'): metrics per category, then the unweighted mean over categories; mAD recipes are means of the
class-averaged metrics. Maps are compared with masks at the method's input resolution by default (masks resized with
PIL bilinear then > 0.5, as the reference implementations do), or at each image's native size.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zsadbench.data import MASK_RESIZE_MODES, SampleLoader, check_files, collate, load_images, read_mask, resize_mask
from zsadbench.detector import Detector, FewShot, ImageSet
from zsadbench.metrics import MAD_RECIPES, METRIC_NAMES, CategoryMetrics, MetricWarning, mad
from zsadbench.types import Dataset, Prediction, Sample

log = logging.getLogger(__name__)

SUMMARY_METRICS = METRIC_NAMES + tuple(f"mad_{r}" for r in MAD_RECIPES)


@dataclass
class EvalOptions:
    """How a dataset is evaluated (recorded with every run)."""

    batch_size: int = 8
    num_workers: int = 0
    resolution: str = "input"  # "input": the method's input size (the papers' protocol); "native": each image's size
    mask_resize: str = "bilinear"  # masks to input size: PIL bilinear then > 0.5 (references); see MASK_RESIZE_MODES
    aupro: str = "exact"  # "step200" = the AnomalyCLIP/MuSc variant, for paper comparison only
    skip_bad: bool = False  # skip unreadable or inconsistent files (counted, logged, recorded) instead of stopping
    overlays: int = 2  # anomaly-map overlays kept per category for the run's artifacts

    def __post_init__(self) -> None:
        choices = {"resolution": ("input", "native"), "mask_resize": MASK_RESIZE_MODES,
                   "aupro": ("exact", "step200")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"evaluation option {name}={getattr(self, name)!r}: choose one of {allowed}")


@dataclass
class Overlay:
    """An image with its anomaly map and mask, kept for visual inspection."""

    sample: Sample
    anomaly_map: np.ndarray
    mask: np.ndarray | None


@dataclass
class CategoryResult:
    """Metrics and per-image scores of one category."""

    category: str
    metrics: dict[str, float]
    tags: dict[str, str]
    image_paths: list[str]
    labels: list[int]
    image_scores: list[float]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    seconds: float = 0.0
    overlays: list[Overlay] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict (overlays excluded)."""
        data = asdict(self)
        data.pop("overlays")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CategoryResult:
        """Returns the result stored by :meth:`to_json`."""
        data = dict(data)
        data["skipped"] = [tuple(x) for x in data.get("skipped", [])]
        return cls(**data)


@dataclass
class EvaluationResult:
    """Per-category results and their unweighted mean."""

    categories: dict[str, CategoryResult]

    def mean(self) -> dict[str, float]:
        """Returns the class mean of every metric (categories where it is undefined are left out, with a warning)."""
        out: dict[str, float] = {}
        for name in METRIC_NAMES:
            values = [r.metrics.get(name, math.nan) for r in self.categories.values()]
            defined = [v for v in values if not math.isnan(v)]
            if defined and len(defined) < len(values):
                undefined = [c for c, r in self.categories.items() if math.isnan(r.metrics.get(name, math.nan))]
                warnings.warn(f"{name}: mean over {len(defined)} of {len(values)} categories "
                              f"(undefined for {', '.join(undefined)})", MetricWarning, stacklevel=2)
            out[name] = float(np.mean(defined)) if defined else math.nan
        for recipe in MAD_RECIPES:
            out[f"mad_{recipe}"] = mad(out, recipe)
        return out

    def table(self) -> pd.DataFrame:
        """Returns one row per category plus a ``mean`` row, columns = the metric names."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            mean = self.mean()
        rows = {c: {m: r.metrics.get(m, math.nan) for m in SUMMARY_METRICS} for c, r in self.categories.items()}
        rows["mean"] = {m: mean[m] for m in SUMMARY_METRICS}
        return pd.DataFrame.from_dict(rows, orient="index")[list(SUMMARY_METRICS)]

    def to_json(self) -> dict[str, Any]:
        """Returns {"categories": {category: {metric: value}}, "mean": {metric: value}} (NaN as null)."""
        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if math.isnan(v) else v) for k, v in d.items()}

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            mean = self.mean()
        return {"categories": {c: clean({m: r.metrics[m] for m in SUMMARY_METRICS if m in r.metrics})
                               for c, r in self.categories.items()},
                "mean": clean(mean)}


def _check_prediction(detector: Detector, prediction: Prediction, batch: int) -> tuple[np.ndarray, torch.Tensor]:
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    expected = (batch, *detector.input_size)
    if tuple(scores.shape) != (batch,) or tuple(maps.shape) != expected:
        raise RuntimeError(f"method {detector.name!r} returned image scores {tuple(scores.shape)} and maps "
                           f"{tuple(maps.shape)} for a batch of {batch}; expected ({batch},) and {expected}")
    return scores.detach().double().cpu().numpy(), maps.detach().float().cpu()


def _to_mask_size(maps: torch.Tensor, masks: list[np.ndarray]) -> list[np.ndarray]:
    """Returns each map at its mask's size (bilinear, align_corners=False) for native-resolution evaluation."""
    out = []
    for amap, mask in zip(maps, masks):
        if tuple(amap.shape) != mask.shape:
            amap = F.interpolate(amap[None, None], size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
        out.append(amap.numpy())
    return out


BatchHook = Callable[[list[Sample], np.ndarray, torch.Tensor], None]


def evaluate_category(detector: Detector, dataset: Dataset, category: str, options: EvalOptions,
                      progress: bool = True, on_batch: BatchHook | None = None) -> CategoryResult:
    """Returns the metrics of ``detector`` on one category, streaming batches into the metric accumulator.

    ``on_batch(samples, image_scores, anomaly_maps)`` sees every batch as the method returned it (maps at its input
    resolution, in test-sample order); the regression check summarises maps through it.
    """
    start = time.perf_counter()
    samples = dataset.test(category)
    if not samples:
        raise ValueError(f"category {category!r} of dataset {dataset.name!r} has no test images")
    samples, skipped = check_files(samples, options.skip_bad)
    for sample, reason in skipped:
        log.warning("skipped %s: %s", sample.image_path, reason)
    if not samples:
        raise ValueError(f"category {category!r}: every test image was skipped as unreadable")
    anomalous = [s for s in samples if s.label == 1]
    annotated = [s for s in anomalous if s.mask_path is not None]
    pixel = len(annotated) == len(anomalous)
    if annotated and not pixel:
        warnings.warn(f"category {category!r}: {len(anomalous) - len(annotated)} of {len(anomalous)} anomalous images "
                      "have no mask; pixel metrics are not computed", MetricWarning, stacklevel=2)
    mask_size = detector.input_size if options.resolution == "input" else None

    references: list[str] = []
    if isinstance(detector, FewShot) and detector.shots > 0:
        normals = [s for s in dataset.train(category) if s.label == 0]
        chosen = [normals[i] for i in detector.reference_indices(len(normals), category)]
        detector.set_reference(load_images(chosen, detector.transform).to(detector.device), category)
        references = [str(s.image_path) for s in chosen]

    accumulator = CategoryMetrics(pixel=pixel, aupro=options.aupro, category=category)
    scores_all: list[float] = []
    overlays: list[Overlay] = []

    def consume(batch_samples: list[Sample], scores: np.ndarray, maps: torch.Tensor,
                masks: list[np.ndarray | None]) -> None:
        labels = np.array([s.label for s in batch_samples])
        if on_batch is not None:
            on_batch(batch_samples, scores, maps)
        if pixel:
            known_masks = [m for m in masks if m is not None]  # every mask is read when the category is pixel-level
            map_arrays = _to_mask_size(maps, known_masks) if options.resolution == "native" else list(maps.numpy())
            accumulator.update(scores, labels, map_arrays, known_masks)
        else:
            map_arrays = list(maps.numpy())
            accumulator.update(scores, labels)
        scores_all.extend(scores.tolist())
        for s, amap, mask in zip(batch_samples, map_arrays, masks):
            if s.label == 1 and len(overlays) < options.overlays:
                overlays.append(Overlay(s, np.asarray(amap, np.float32), mask))

    bar = tqdm(total=len(samples), desc=f"  {category}", unit="img", leave=False, disable=not progress)
    with torch.no_grad():
        if detector.transductive:
            image_set = ImageSet(samples, detector.transform, options.batch_size, options.num_workers)
            scores, maps = _check_prediction(detector, detector.predict_set(image_set, category), len(samples))  # type: ignore[attr-defined]
            for begin in range(0, len(samples), options.batch_size):
                chunk = samples[begin:begin + options.batch_size]
                masks = [_mask(s, mask_size, options, pixel) for s in chunk]
                consume(chunk, scores[begin:begin + len(chunk)], maps[begin:begin + len(chunk)], masks)
                bar.update(len(chunk))
        else:
            loader = torch.utils.data.DataLoader(
                SampleLoader(samples, detector.transform, mask_size, options.mask_resize, with_masks=pixel),
                batch_size=options.batch_size, num_workers=options.num_workers, collate_fn=collate)
            for images, masks, indices in loader:
                prediction = detector.predict(images.to(detector.device), category)
                scores, maps = _check_prediction(detector, prediction, len(indices))
                consume([samples[i] for i in indices], scores, maps, masks)
                bar.update(len(indices))
    bar.close()
    metrics = accumulator.compute()
    return CategoryResult(category, metrics, dict(accumulator.tags), [str(s.image_path) for s in samples],
                          [s.label for s in samples], scores_all, [(str(s.image_path), r) for s, r in skipped],
                          references, time.perf_counter() - start, overlays)


def _mask(sample: Sample, size: tuple[int, int] | None, options: EvalOptions, pixel: bool) -> np.ndarray | None:
    if not pixel:
        return None
    mask = read_mask(sample)
    return resize_mask(mask, size, options.mask_resize) if size is not None else mask


def evaluate(detector: Detector, dataset: Dataset, categories: list[str] | None = None,
             options: EvalOptions | None = None, done: dict[str, CategoryResult] | None = None,
             on_category: Callable[[CategoryResult], None] | None = None, progress: bool = True,
             on_batch: BatchHook | None = None) -> EvaluationResult:
    """Returns per-category results of ``detector`` on ``dataset``; categories in ``done`` are not recomputed."""
    options = options or EvalOptions()
    categories = categories or dataset.categories("test")
    unknown = [c for c in categories if c not in dataset.categories("test")]
    if unknown:
        raise ValueError(f"dataset {dataset.name!r} has no test images for categor"
                         f"{'y' if len(unknown) == 1 else 'ies'} {unknown}; available: {dataset.categories('test')}")
    results = {c: r for c, r in (done or {}).items() if c in categories}
    todo = [c for c in categories if c not in results]
    bar = tqdm(todo, desc=f"{detector.name or type(detector).__name__} on {dataset.name}", unit="category",
               disable=not progress)
    for category in bar:
        bar.set_postfix_str(category)
        result = evaluate_category(detector, dataset, category, options, progress, on_batch)
        results[category] = result
        if on_category is not None:
            on_category(result)
    return EvaluationResult({c: results[c] for c in categories})
