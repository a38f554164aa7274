"""Uncertainty of image-level results: bootstrap intervals over test images, and a paired test between two runs.

Both work on a run's per-image scores (the ``scores.csv`` every run records: category, image, label, score).

- Bootstrap interval: within each category the normal and the anomalous test images are resampled separately with
  replacement (a stratified bootstrap, so every replicate keeps both classes and AUROC stays defined), the category
  metric is recomputed, the replicate's class mean is the unweighted mean over categories (the papers' convention),
  and the interval is the 2.5 / 97.5 percentiles of the replicates. Seeded, so a report is reproducible.
- Paired test: two runs scored the same images (matched by category and path). Each replicate resamples the images
  once and recomputes the class-mean metric of both runs on that same resample, so the difference keeps the pairing.
  The interval is the percentile interval of the difference; the two-sided p-value inverts it,
  ``p = 2 min(P*(d <= 0), P*(d >= 0))`` with the (count + 1) / (R + 1) correction, so p < 0.05 exactly when the 95 %
  interval excludes 0 (up to the replicate resolution 2 / (R + 1)).

Resampling with replacement gives every image an integer weight (how often it was drawn). All replicates are
therefore computed at once from weighted cumulative counts over the images sorted once by score; the values are
exactly those :mod:`zsadbench.metrics` gives on the resampled arrays (the tests check it), at a fraction of the cost.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import pandas as pd

from zsadbench.metrics import IMAGE_METRICS, MetricWarning, auroc, average_precision, f1_max

DEFAULT_REPLICATES = 1000
_POINT = {"image_auroc": auroc, "image_ap": average_precision, "image_f1max": f1_max}
_CELLS_PER_CHUNK = 4_000_000  # replicates x images per vectorised block (about 32 MB of float64 per array)


@dataclass(frozen=True)
class Interval:
    """A class-mean metric with its bootstrap percentile interval."""

    metric: str
    estimate: float  # the class mean on the original test images
    low: float
    high: float
    replicates: int
    level: float = 0.95


@dataclass(frozen=True)
class PairedTest:
    """The paired comparison of two runs on the same test images (difference = first run minus second)."""

    metric: str
    estimate_a: float
    estimate_b: float
    difference: float
    low: float
    high: float
    p_value: float
    replicates: int
    images: int
    categories: int
    level: float = 0.95

    def significant(self, alpha: float = 0.05) -> bool:
        """Returns whether the two runs differ at level ``alpha``."""
        return self.p_value < alpha


def image_key(category: str, path: str) -> tuple[str, str]:
    """Returns how an image is matched across runs: its category and the last three parts of its path.

    The tail (``test/<defect>/000.png``) identifies an image within a category in every supported layout and does
    not depend on where the dataset lives, so runs made on different machines still pair up.
    """
    return str(category), "/".join(PurePath(str(path)).parts[-3:])


def _check_scores(scores: pd.DataFrame, what: str) -> pd.DataFrame:
    missing = {"category", "image", "label", "score"} - set(scores.columns)
    if missing:
        raise ValueError(f"{what}: per-image scores need the columns category, image, label, score; "
                         f"missing {sorted(missing)}")
    if scores["score"].isna().any():
        raise ValueError(f"{what}: {int(scores['score'].isna().sum())} image scores are missing (NaN)")
    labels = set(pd.unique(scores["label"]))
    if not labels <= {0, 1}:
        raise ValueError(f"{what}: labels must be 0 or 1, got {sorted(labels)}")
    return scores


def _stratified_counts(rng: np.random.Generator, labels: np.ndarray, replicates: int) -> np.ndarray:
    """Returns (replicates, n) draw counts: each class of ``labels`` resampled with replacement within itself."""
    counts = np.zeros((replicates, len(labels)), np.int64)
    for value in (0, 1):
        members = np.flatnonzero(labels == value)
        m = len(members)
        if m == 0:
            continue
        draws = rng.integers(0, m, size=(replicates, m)) + (np.arange(replicates) * m)[:, None]
        counts[:, members] = np.bincount(draws.ravel(), minlength=replicates * m).reshape(replicates, m)
    return counts


class _SortedCategory:
    """One category's images sorted by descending score, with the boundaries of runs of equal scores."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.order = np.argsort(-scores, kind="stable")
        s = scores[self.order]
        self.positive = labels[self.order].astype(bool)
        self.last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of every distinct score

    def metrics(self, weights: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Returns each metric for every row of ``weights`` (replicates, n), in the original image order."""
        w = weights[:, self.order].astype(np.float64)
        tps = np.cumsum(w * self.positive, axis=1)[:, self.last]
        fps = np.cumsum(w * ~self.positive, axis=1)[:, self.last]
        p, n = tps[:, -1:], fps[:, -1:]
        out: dict[str, np.ndarray] = {}
        with np.errstate(invalid="ignore", divide="ignore"):
            if "image_auroc" in names:
                tpr = np.c_[np.zeros(len(w)), tps] / p
                fpr = np.c_[np.zeros(len(w)), fps] / n
                area = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
                out["image_auroc"] = np.where((p[:, 0] > 0) & (n[:, 0] > 0), area, np.nan)
            # A distinct score none of whose images was drawn repeats the previous curve point: its recall step is
            # zero, so it adds nothing to AP and cannot raise F1, whatever precision 0/0 is set to.
            precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
            if "image_ap" in names:
                recall_step = np.diff(np.c_[np.zeros(len(w)), tps], axis=1) / p
                out["image_ap"] = np.where(p[:, 0] > 0, np.sum(recall_step * precision, axis=1), np.nan)
            if "image_f1max" in names:
                f1 = np.where(tps > 0, 2 * tps / (tps + fps + p), 0.0)
                out["image_f1max"] = np.where(p[:, 0] > 0, f1.max(axis=1), np.nan)
        return out


def _categories(scores: pd.DataFrame) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(str(c), g["score"].to_numpy(np.float64), g["label"].to_numpy(np.int64))
            for c, g in scores.groupby("category", sort=True)]


def _point(groups: list[tuple[str, np.ndarray, np.ndarray]], metric: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        values = [_POINT[metric](s, y) for _, s, y in groups]
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _class_mean_replicates(groups: list[tuple[str, np.ndarray, np.ndarray]], runs: list[list[np.ndarray]],
                           metrics: tuple[str, ...], replicates: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Returns, for each run, metric -> (replicates,) class means over the same stratified resamples.

    ``runs[r][c]`` holds run r's scores of category c, in the order of ``groups``' labels.
    """
    rng = np.random.default_rng(seed)
    totals = [{m: np.zeros(replicates) for m in metrics} for _ in runs]
    defined = [{m: np.zeros(replicates) for m in metrics} for _ in runs]
    for c, (_, _, labels) in enumerate(groups):
        sorted_runs = [_SortedCategory(run[c], labels) for run in runs]
        chunk = max(1, _CELLS_PER_CHUNK // max(1, len(labels)))
        for begin in range(0, replicates, chunk):
            size = min(chunk, replicates - begin)
            counts = _stratified_counts(rng, labels, size)
            for r, category in enumerate(sorted_runs):
                for name, values in category.metrics(counts, metrics).items():
                    ok = ~np.isnan(values)
                    totals[r][name][begin:begin + size] += np.where(ok, values, 0.0)
                    defined[r][name][begin:begin + size] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return [{m: totals[r][m] / defined[r][m] for m in metrics} for r in range(len(runs))]


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _check_level(level: float, replicates: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if replicates < 1:
        raise ValueError(f"the bootstrap needs at least one replicate, got {replicates}")


def bootstrap_intervals(scores: pd.DataFrame, metrics: tuple[str, ...] = IMAGE_METRICS,
                        replicates: int = DEFAULT_REPLICATES, level: float = 0.95,
                        seed: int = 0) -> dict[str, Interval]:
    """Returns metric -> class-mean estimate with its stratified bootstrap percentile interval over test images."""
    _check_level(level, replicates)
    unknown = [m for m in metrics if m not in _POINT]
    if unknown:
        raise ValueError(f"bootstrap intervals are available for {list(_POINT)}, not {unknown}")
    groups = _categories(_check_scores(scores, "bootstrap"))
    reps = _class_mean_replicates(groups, [[s for _, s, _ in groups]], metrics, replicates, seed)[0]
    return {m: Interval(m, _point(groups, m), *_percentiles(reps[m], level), replicates, level) for m in metrics}


def align_scores(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Returns one table of the images two runs share: category, key, label, score_a, score_b.

    Raises ValueError naming the differing images when the two runs did not score the same image set.
    """
    frames = []
    for name, frame in (("a", _check_scores(a, "first run")), ("b", _check_scores(b, "second run"))):
        keys = [image_key(c, p) for c, p in zip(frame["category"], frame["image"])]
        indexed = pd.DataFrame({"category": [k[0] for k in keys], "key": [k[1] for k in keys],
                                "label": frame["label"].to_numpy(), f"score_{name}": frame["score"].to_numpy()})
        duplicated = indexed.duplicated(["category", "key"])
        if duplicated.any():
            example = indexed[duplicated].iloc[0]
            raise ValueError(f"{'first' if name == 'a' else 'second'} run: image {example.key!r} of category "
                             f"{example.category!r} appears more than once; cannot pair images")
        frames.append(indexed.set_index(["category", "key"]))
    only_a = frames[0].index.difference(frames[1].index)
    only_b = frames[1].index.difference(frames[0].index)
    if len(only_a) or len(only_b):
        def show(index: pd.Index) -> str:
            return ", ".join(f"{c}/{k}" for c, k in list(index)[:3]) + (" ..." if len(index) > 3 else "")

        raise ValueError(f"the two runs did not score the same images ({len(only_a)} only in the first run"
                         f"{': ' + show(only_a) if len(only_a) else ''}; {len(only_b)} only in the second"
                         f"{': ' + show(only_b) if len(only_b) else ''}); a paired test needs identical image sets")
    joined = frames[0].join(frames[1][["label", "score_b"]].rename(columns={"label": "label_b"}))
    conflicting = joined["label"] != joined["label_b"]
    if conflicting.any():
        category, key = joined.index[conflicting.to_numpy()][0]
        raise ValueError(f"image {category}/{key} has label {joined['label'][conflicting].iloc[0]} in the first run "
                         f"and {joined['label_b'][conflicting].iloc[0]} in the second; not the same dataset")
    return joined.drop(columns="label_b").reset_index()


def paired_test(a: pd.DataFrame, b: pd.DataFrame, metric: str = "image_auroc", replicates: int = DEFAULT_REPLICATES,
                level: float = 0.95, seed: int = 0) -> PairedTest:
    """Returns the paired bootstrap comparison of run ``a`` against run ``b`` on a class-mean image metric."""
    _check_level(level, replicates)
    if metric not in _POINT:
        raise ValueError(f"paired tests are available for {list(_POINT)}, not {metric!r}")
    joined = align_scores(a, b)
    groups_a, groups_b = [], []
    for category, g in joined.groupby("category", sort=True):
        labels = g["label"].to_numpy(np.int64)
        groups_a.append((str(category), g["score_a"].to_numpy(np.float64), labels))
        groups_b.append((str(category), g["score_b"].to_numpy(np.float64), labels))
    reps_a, reps_b = _class_mean_replicates(groups_a, [[s for _, s, _ in groups_a], [s for _, s, _ in groups_b]],
                                            (metric,), replicates, seed)
    difference = reps_a[metric] - reps_b[metric]
    estimate_a, estimate_b = _point(groups_a, metric), _point(groups_b, metric)
    valid = difference[~np.isnan(difference)]
    if len(valid) == 0:
        p_value = math.nan
    else:
        below = (np.count_nonzero(valid <= 0) + 1) / (len(valid) + 1)
        above = (np.count_nonzero(valid >= 0) + 1) / (len(valid) + 1)
        p_value = float(min(1.0, 2 * min(below, above)))
    return PairedTest(metric, estimate_a, estimate_b, estimate_a - estimate_b, *_percentiles(difference, level),
                      p_value, replicates, len(joined), len(groups_a), level)
