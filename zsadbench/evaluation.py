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
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zsadbench.data import MASK_RESIZE_MODES, SampleLoader, check_files, collate, read_image, read_mask, resize_mask
from zsadbench.detector import Detector, FewShot, ImageSet
from zsadbench.metrics import (
    IMAGE_METRICS,
    MAD_RECIPES,
    METRIC_NAMES,
    METRIC_TITLES,
    PIXEL_METRICS,
    CategoryMetrics,
    MetricWarning,
    metric_tags,
)
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
        data = {k: v for k, v in data.items() if k != "tags"}  # runs before 0.2 stored the tags per category
        data["skipped"] = [tuple(x) for x in data.get("skipped", [])]
        return cls(**data)


# The mean row averages each metric group over one set of categories: those where all of the group's metrics are
# defined. mAD-all7 uses the categories where both groups are defined, so no mean mixes category sets.
MEAN_GROUPS: dict[str, tuple[str, ...]] = {"image": IMAGE_METRICS, "pixel": PIXEL_METRICS, "all7": METRIC_NAMES}


@dataclass
class EvaluationResult:
    """Per-category results and their unweighted class mean over consistent category sets."""

    categories: dict[str, CategoryResult]
    tags: dict[str, str] = field(default_factory=metric_tags)  # the implementation behind every metric

    @cached_property
    def mean_categories(self) -> dict[str, list[str]]:
        """Returns, per metric group (image, pixel, all7), the categories its class means average over."""
        return {group: [c for c, r in self.categories.items()
                        if all(not math.isnan(r.metrics.get(m, math.nan)) for m in metrics)]
                for group, metrics in MEAN_GROUPS.items()}

    @cached_property
    def means(self) -> dict[str, float]:
        """Returns the class mean of every metric and the mAD recipes (NaN where no category defines a group)."""
        out: dict[str, float] = {}
        for group in ("image", "pixel"):
            members = self.mean_categories[group]
            for name in MEAN_GROUPS[group]:
                out[name] = float(np.mean([self.categories[c].metrics[name] for c in members])) if members else math.nan
        for recipe in MAD_RECIPES:
            members = self.mean_categories[recipe]
            class_means = [np.mean([self.categories[c].metrics[m] for c in members]) for m in MAD_RECIPES[recipe]]
            out[f"mad_{recipe}"] = float(np.mean(class_means)) if members else math.nan
        return out

    def partial_means(self) -> dict[str, str]:
        """Returns, per group whose mean leaves some categories out, "n of m categories (undefined for: ...)"."""
        notes = {}
        for group, members in self.mean_categories.items():
            if members and len(members) < len(self.categories):
                left_out = [c for c in self.categories if c not in members]
                notes[group] = (f"{len(members)} of {len(self.categories)} categories "
                                f"(undefined for: {', '.join(left_out)})")
        return notes

    def mean(self) -> dict[str, float]:
        """Returns the class means (see :attr:`means`), warning once per group that leaves categories out."""
        for group, note in self.partial_means().items():
            warnings.warn(f"{group} metrics: mean over {note}", MetricWarning, stacklevel=2)
        return dict(self.means)

    def table(self) -> pd.DataFrame:
        """Returns one row per category plus a ``mean`` row, columns = the metric names."""
        rows = {c: {m: r.metrics.get(m, math.nan) for m in SUMMARY_METRICS} for c, r in self.categories.items()}
        rows["mean"] = {m: self.means[m] for m in SUMMARY_METRICS}
        return pd.DataFrame.from_dict(rows, orient="index")[list(SUMMARY_METRICS)]

    def format(self) -> str:
        """Returns the table as text in percent, with a line for every mean that leaves categories out."""
        table = (self.table() * 100).rename(columns=METRIC_TITLES)
        text = table.to_string(float_format=lambda v: f"{v:6.2f}", na_rep="   n/a")
        notes = self.partial_means()
        return text + "".join(f"\nmean of {group} metrics over {note}" for group, note in notes.items())

    def to_json(self) -> dict[str, Any]:
        """Returns {"categories": {category: {metric: value}}, "mean": {...}, "mean_categories": {group: [...]}}."""
        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if math.isnan(v) else v) for k, v in d.items()}

        return {"categories": {c: clean({m: r.metrics[m] for m in SUMMARY_METRICS if m in r.metrics})
                               for c, r in self.categories.items()},
                "mean": clean(self.means), "mean_categories": self.mean_categories, "tags": self.tags}


def _check_prediction(detector: Detector, prediction: Prediction,
                      samples: list[Sample]) -> tuple[np.ndarray, torch.Tensor]:
    """Returns the prediction as (float64 scores, float32 maps on the CPU) after checking shapes and finiteness."""
    batch = len(samples)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    expected = (batch, *detector.input_size)
    if tuple(scores.shape) != (batch,) or tuple(maps.shape) != expected:
        raise RuntimeError(f"method {detector.name!r} returned image scores {tuple(scores.shape)} and maps "
                           f"{tuple(maps.shape)} for a batch of {batch}; expected ({batch},) and {expected}")
    scores, maps = scores.detach().double().cpu(), maps.detach().float().cpu()
    finite = torch.isfinite(scores) & torch.isfinite(maps).flatten(1).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        what = "image score" if not torch.isfinite(scores[i]) else "anomaly map"
        value = scores[i] if what == "image score" else maps[i][~torch.isfinite(maps[i])][0]
        raise ValueError(f"method {detector.name!r} returned a non-finite {what} ({float(value)}) for "
                         f"{samples[i].image_path}")
    return scores.numpy(), maps


def _to_mask_size(maps: torch.Tensor, masks: list[np.ndarray]) -> list[np.ndarray]:
    """Returns each map at its mask's size (bilinear, align_corners=False) for native-resolution evaluation."""
    out = []
    for amap, mask in zip(maps, masks):
        if tuple(amap.shape) != mask.shape:
            amap = F.interpolate(amap[None, None], size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
        out.append(amap.numpy())
    return out


BatchHook = Callable[[list[Sample], np.ndarray, torch.Tensor], None]


@dataclass
class CategoryPlan:
    """One category, checked before any compute: its readable test samples, the skipped ones, its shots."""

    category: str
    samples: list[Sample]
    skipped: list[tuple[Sample, str]]
    pixel: bool  # every anomalous test image has a mask
    references: list[Sample]  # the few-shot normal reference images drawn for it (empty when zero-shot)


def plan_category(detector: Detector, dataset: Dataset, category: str, options: EvalOptions) -> CategoryPlan:
    """Returns the category's plan after opening every test image's and mask's header and drawing its shots.

    A broken file or too few normal images for ``--shots`` stops here, before the first forward pass.
    """
    samples = dataset.test(category)
    if not samples:
        raise ValueError(f"category {category!r} of dataset {dataset.name!r} has no test images")
    samples, skipped = check_files(samples, options.skip_bad)
    if not samples:
        raise ValueError(f"category {category!r}: every test image was skipped as unreadable")
    anomalous = [s for s in samples if s.label == 1]
    annotated = [s for s in anomalous if s.mask_path is not None]
    pixel = len(annotated) == len(anomalous)
    references: list[Sample] = []
    if isinstance(detector, FewShot) and detector.shots > 0:
        normals = [s for s in dataset.train(category) if s.label == 0]
        references = [normals[i] for i in detector.reference_indices(len(normals), category)]
        check_files(references)
    return CategoryPlan(category, samples, skipped, pixel, references)


def evaluate_category(detector: Detector, dataset: Dataset, category: str | CategoryPlan, options: EvalOptions,
                      progress: bool = True, on_batch: BatchHook | None = None) -> CategoryResult:
    """Returns the metrics of ``detector`` on one category, streaming batches into the metric accumulator.

    ``category`` is a name or its :class:`CategoryPlan` (already checked). ``on_batch(samples, image_scores,
    anomaly_maps)`` sees every batch as the method returned it (maps at its input resolution, in test-sample order);
    the regression check summarises maps through it.
    """
    start = time.perf_counter()
    plan = category if isinstance(category, CategoryPlan) else plan_category(detector, dataset, category, options)
    category, samples, pixel = plan.category, plan.samples, plan.pixel
    for sample, reason in plan.skipped:
        log.warning("skipped %s: %s", sample.image_path, reason)
    anomalous = [s for s in samples if s.label == 1]
    missing = [s for s in anomalous if s.mask_path is None]
    if missing and len(missing) < len(anomalous):
        warnings.warn(f"category {category!r}: {len(missing)} of {len(anomalous)} anomalous images have no mask; "
                      "pixel metrics are not computed", MetricWarning, stacklevel=2)
    mask_size = detector.input_size if options.resolution == "input" else None
    if plan.references:  # raw images: a method may augment them before its own preprocessing (AnomalyDINO)
        detector.set_reference_images([read_image(s.image_path) for s in plan.references], category)  # type: ignore[attr-defined]

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

    bar = tqdm(total=len(samples), desc=f"  {category}", unit="img", leave=False,
               disable=None if progress else True)  # None: shown on a terminal only, no control characters in logs
    with torch.no_grad():
        if detector.transductive:
            image_set = ImageSet(samples, detector.transform, options.batch_size, options.num_workers)
            scores, maps = _check_prediction(detector, detector.predict_set(image_set, category), samples)  # type: ignore[attr-defined]
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
                batch_samples = [samples[i] for i in indices]
                scores, maps = _check_prediction(detector, prediction, batch_samples)
                consume(batch_samples, scores, maps, masks)
                bar.update(len(indices))
    bar.close()
    metrics = accumulator.compute()
    return CategoryResult(category, metrics, [str(s.image_path) for s in samples], [s.label for s in samples],
                          scores_all, [(str(s.image_path), r) for s, r in plan.skipped],
                          [str(s.image_path) for s in plan.references], time.perf_counter() - start, overlays)


def _mask(sample: Sample, size: tuple[int, int] | None, options: EvalOptions, pixel: bool) -> np.ndarray | None:
    if not pixel:
        return None
    mask = read_mask(sample)
    return resize_mask(mask, size, options.mask_resize) if size is not None else mask


def plan_categories(detector: Detector, dataset: Dataset, categories: list[str], options: EvalOptions,
                    progress: bool = True) -> list[CategoryPlan]:
    """Returns the plans of ``categories``: every file header opened and every shot drawn, before any compute."""
    known = dataset.categories("test")
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise ValueError(f"dataset {dataset.name!r} has no test images for categor"
                         f"{'y' if len(unknown) == 1 else 'ies'} {unknown}; available: {known}")
    return [plan_category(detector, dataset, c, options)
            for c in tqdm(categories, desc="checking files", unit="category", leave=False,
                          disable=None if progress else True)]


def evaluate(detector: Detector, dataset: Dataset, categories: list[str] | None = None,
             options: EvalOptions | None = None, done: dict[str, CategoryResult] | None = None,
             on_category: Callable[[CategoryResult], None] | None = None, progress: bool = True,
             on_batch: BatchHook | None = None, plans: list[CategoryPlan] | None = None) -> EvaluationResult:
    """Returns per-category results of ``detector`` on ``dataset``; categories in ``done`` are not recomputed.

    Every category's files are checked before the first forward pass (:func:`plan_categories`), unless ``plans``
    brings them already checked.
    """
    options = options or EvalOptions()
    categories = categories or dataset.categories("test")
    results = {c: r for c, r in (done or {}).items() if c in categories}
    if plans is None:
        plans = plan_categories(detector, dataset, [c for c in categories if c not in results], options, progress)
    bar = tqdm(plans, desc=f"{detector.name or type(detector).__name__} on {dataset.name}", unit="category",
               disable=None if progress else True)
    for plan in bar:
        bar.set_postfix_str(plan.category)
        result = evaluate_category(detector, dataset, plan, options, progress, on_batch)
        results[plan.category] = result
        if on_category is not None:
            on_category(result)
    return EvaluationResult({c: results[c] for c in categories}, metric_tags(options.aupro))
