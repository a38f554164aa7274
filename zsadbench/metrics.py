"""Anomaly-detection metrics per category (interim exact implementation; the streaming engine replaces it).

Public API (stable): :data:`METRIC_NAMES`, :data:`MAD_RECIPES`, :data:`IMPLEMENTATION_TAGS`, :func:`mad`,
:class:`CategoryMetrics` (``update`` per batch, ``compute`` once per category), and the functional forms
:func:`auroc`, :func:`average_precision`, :func:`f1_max`, :func:`aupro`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
MAD_RECIPES = {"image": IMAGE_METRICS, "pixel": PIXEL_METRICS, "all7": METRIC_NAMES}
IMPLEMENTATION_TAGS = {
    "image_auroc": "auroc.exact", "image_ap": "ap.step.exact", "image_f1max": "f1max.exact",
    "pixel_auroc": "auroc.exact", "pixel_ap": "ap.step.exact", "pixel_f1max": "f1max.exact",
    "pixel_aupro": "aupro.exact@0.3",
}


class MetricWarning(UserWarning):
    """A metric is undefined for a category (one label only, no defect regions) and reported as NaN."""


def _curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.int64)
    tps, fps = np.cumsum(y), np.cumsum(1 - y)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    return tps[last], fps[last], int(tps[-1]), int(fps[-1])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Returns the exact ROC AUC (ties count one half); NaN with a warning if only one class is present."""
    tps, fps, p, n = _curve(np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel())
    if p == 0 or n == 0:
        warnings.warn("AUROC undefined: only one class present", MetricWarning, stacklevel=2)
        return math.nan
    tpr, fpr = np.r_[0, tps] / p, np.r_[0, fps] / n
    return float(np.trapezoid(tpr, fpr))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Returns step-wise average precision (sklearn's definition); NaN with a warning without positives."""
    tps, fps, p, _ = _curve(np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel())
    if p == 0:
        warnings.warn("AP undefined: no positive samples", MetricWarning, stacklevel=2)
        return math.nan
    precision, recall = tps / (tps + fps), tps / p
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Returns the maximum F1 over all distinct thresholds; NaN with a warning without positives."""
    tps, fps, p, _ = _curve(np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel())
    if p == 0:
        warnings.warn("F1-max undefined: no positive samples", MetricWarning, stacklevel=2)
        return math.nan
    precision, recall = tps / (tps + fps), tps / p
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(f1.max())


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Returns the official MVTec AD AU-PRO up to ``fpr_limit``, normalised by it; NaN if undefined."""
    scores, fp, pro, n_components = [], [], [], 0
    for amap, mask in zip(maps, masks):
        labels, k = ndimage.label(mask, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel())
        scores.append(np.asarray(amap, np.float64).ravel())
        fp.append((labels.ravel() == 0).astype(np.float64))
        inc = np.zeros(labels.size)
        inside = labels.ravel() > 0
        inc[inside] = 1.0 / areas[labels.ravel()[inside]]
        pro.append(inc)
        n_components += k
    s, f, r = np.concatenate(scores), np.concatenate(fp), np.concatenate(pro)
    negatives = f.sum()
    if n_components == 0 or negatives == 0:
        warnings.warn("AUPRO undefined: no defect regions or no negative pixels", MetricWarning, stacklevel=2)
        return math.nan
    order = np.argsort(-s, kind="stable")
    s, fpr, prov = s[order], np.cumsum(f[order]) / negatives, np.cumsum(r[order]) / n_components
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    fpr, prov = np.r_[0.0, fpr[last], 1.0], np.r_[0.0, prov[last], 1.0]
    keep = fpr <= fpr_limit
    x, y = fpr[keep], prov[keep]
    if x[-1] < fpr_limit:
        i = np.searchsorted(fpr, fpr_limit)
        t = (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        x, y = np.r_[x, fpr_limit], np.r_[y, prov[i - 1] + t * (prov[i] - prov[i - 1])]
    return float(np.trapezoid(y, x) / fpr_limit)


def mad(metrics: dict[str, float], recipe: str) -> float:
    """Returns the unweighted mean of the recipe's metrics; NaN if any of them is missing or NaN."""
    values = [metrics.get(name, math.nan) for name in MAD_RECIPES[recipe]]
    return math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))


class CategoryMetrics:
    """Accumulates one category's predictions batch by batch and computes its metrics once."""

    def __init__(self, pixel: bool = True, aupro: str = "exact", fpr_limit: float = 0.3) -> None:
        if aupro != "exact":
            raise NotImplementedError(f"AUPRO variant {aupro!r} is not available in the interim engine")
        self.pixel = pixel
        self.fpr_limit = fpr_limit
        self.tags = dict(IMPLEMENTATION_TAGS)
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []

    def update(self, image_scores: np.ndarray, labels: np.ndarray, anomaly_maps: Sequence[np.ndarray] | None = None,
               masks: Sequence[np.ndarray] | None = None) -> None:
        """Adds a batch: image scores (B,), labels (B,), and when pixel-level, maps and boolean masks (each H, W)."""
        self._scores.append(np.asarray(image_scores, np.float64).ravel())
        self._labels.append(np.asarray(labels).ravel().astype(bool))
        if self.pixel:
            if anomaly_maps is None or masks is None:
                raise ValueError("pixel-level metrics need anomaly maps and masks for every batch")
            for amap, mask in zip(anomaly_maps, masks):
                amap, mask = np.asarray(amap, np.float32), np.asarray(mask, bool)
                if amap.shape != mask.shape:
                    raise ValueError(f"anomaly map {amap.shape} and mask {mask.shape} differ in size")
                self._maps.append(amap)
                self._masks.append(mask)

    def compute(self) -> dict[str, float]:
        """Returns every metric of :data:`METRIC_NAMES` (pixel ones NaN when not pixel-level) plus the mAD recipes."""
        scores, labels = np.concatenate(self._scores), np.concatenate(self._labels)
        out = {"image_auroc": auroc(scores, labels), "image_ap": average_precision(scores, labels),
               "image_f1max": f1_max(scores, labels)}
        if self.pixel and self._maps:
            px = np.concatenate([m.ravel() for m in self._maps])
            gt = np.concatenate([m.ravel() for m in self._masks])
            out |= {"pixel_auroc": auroc(px, gt), "pixel_ap": average_precision(px, gt),
                    "pixel_f1max": f1_max(px, gt), "pixel_aupro": aupro(self._maps, self._masks, self.fpr_limit)}
        else:
            out |= dict.fromkeys(PIXEL_METRICS, math.nan)
        for recipe in MAD_RECIPES:
            out[f"mad_{recipe}"] = mad(out, recipe)
        return out
