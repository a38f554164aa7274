"""Exact anomaly-detection metrics per category, accumulated batch by batch in bounded memory.

Definitions (docs/metrics.md): AUROC = sklearn ``roc_auc_score`` (ties count one half); AP = sklearn
``average_precision_score`` (step-wise); F1-max = the maximum of 2PR/(P+R) over the points of sklearn's
``precision_recall_curve``; AUPRO = the official MVTec AD AU-PRO (8-connected ground-truth components per image, one
curve point per distinct score, (0, 0) prepended and (1, 1) appended, trapezoid up to ``fpr_limit`` with linear
interpolation there, divided by ``fpr_limit``). ``aupro="step200"`` is the cflow / AnomalyCLIP / MuSc variant
(200 threshold steps, rescaled FPR axis), for paper-comparable numbers only: it is not invariant to monotone
transforms of the scores and is never the default.

How it stays exact and fast (a category can hold several hundred million pixels):

- Every curve point that can change a metric sits at a distinct *positive* score. For those (typically ~1 % of the
  pixels) the engine needs the number of negatives below and tied with the score, which binary searches in the
  sorted scores give (negatives = all scores minus positives). Negatives therefore only need their values in order:
  one values-only sort (no argsort, no index arrays) of the scores as stored, and nothing else per negative pixel.
  AUPRO is then integrated in closed form over the pieces between positive scores (see :func:`_aupro_exact`).
- Counts are int64 and the AUROC numerator is an integer (Mann-Whitney U doubled), so nothing stops counting at
  2^24 the way float32 running sums do; PRO sums are float64.
- :class:`CategoryMetrics` keeps one copy of each map's scores (4 bytes per pixel for float32, appended to address
  space reserved up front, so nothing is reallocated) and the positive pixels' scores with their component ids;
  masks are not kept. ``compute`` sorts the stored scores in place, so peak memory stays close to one copy of the
  category's scores.

Scores are compared in the dtype they arrive in (float32 maps stay float32; a float64 map makes the category
float64, never the other way round), so no two distinct scores are ever merged by a cast.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
MAD_RECIPES = {"image": IMAGE_METRICS, "pixel": PIXEL_METRICS, "all7": METRIC_NAMES}
AUPRO_VARIANTS = ("exact", "step200")
# Column titles of every reported value, used by the CLI tables, the leaderboard and the plots.
METRIC_TITLES = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max", "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP", "pixel_f1max": "P-F1max", "pixel_aupro": "AUPRO", "mad_image": "mAD-img",
    "mad_pixel": "mAD-px", "mad_all7": "mAD-all7",
}
IMPLEMENTATION_TAGS = {
    "image_auroc": "auroc.exact", "image_ap": "ap.step.exact", "image_f1max": "f1max.exact",
    "pixel_auroc": "auroc.exact", "pixel_ap": "ap.step.exact", "pixel_f1max": "f1max.exact",
    "pixel_aupro": "aupro.exact@0.3",
    "mad_image": "mad.image", "mad_pixel": "mad.pixel", "mad_all7": "mad.all7",
}

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Scores of these dtypes are exact in float32; anything wider is kept as float64.
_FLOAT32_EXACT = {np.dtype(t) for t in (np.float16, np.float32, np.bool_, np.int8, np.uint8, np.int16, np.uint16)}


class MetricWarning(UserWarning):
    """A metric is undefined for a category (one label only, no defect regions) and reported as NaN."""


def aupro_tag(variant: str = "exact", fpr_limit: float = 0.3) -> str:
    """Returns the implementation tag of an AUPRO variant, e.g. ``aupro.exact@0.3``."""
    if variant not in AUPRO_VARIANTS:
        raise ValueError(f"unknown AUPRO variant {variant!r}; choose one of {AUPRO_VARIANTS}")
    return f"aupro.{variant}@{fpr_limit:g}"


def metric_tags(aupro: str = "exact", fpr_limit: float = 0.3) -> dict[str, str]:
    """Returns the implementation tag of every reported metric for an AUPRO variant (what a run records once)."""
    return {**IMPLEMENTATION_TAGS, "pixel_aupro": aupro_tag(aupro, fpr_limit)}


def _warn(message: str, where: str | None) -> None:
    warnings.warn(f"{where}: {message}" if where else message, MetricWarning, stacklevel=3)


def _score_dtype(dtype: np.dtype) -> np.dtype:
    """Returns the dtype scores of ``dtype`` are stored in (never narrower than needed to keep them distinct)."""
    if dtype in _FLOAT32_EXACT:
        return np.dtype(np.float32)
    if dtype.kind in "fiub":
        return np.dtype(np.float64)
    raise TypeError(f"anomaly scores must be real numbers, got dtype {dtype}")


def _as_scores(values: object, what: str) -> np.ndarray:
    array = np.asarray(values)
    array = array.astype(_score_dtype(array.dtype), copy=False)
    if array.dtype.kind == "f" and array.size:
        # max and min propagate NaN and reach +/-inf, with no temporary array
        highest, lowest = array.max(), array.min()
        if np.isnan(highest):
            raise ValueError(f"{what} contain NaN")
        if np.isinf(highest) or np.isinf(lowest):
            raise ValueError(f"{what} contain {'+inf' if np.isinf(highest) and highest > 0 else '-inf'}")
    return array


# --------------------------------------------------------------------------------------------------------------------
# The exact sweep over distinct positive scores (shared by image- and pixel-level metrics)
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class _PositiveRuns:
    """Distinct positive scores in descending order with what the curves need at each of them."""

    values: np.ndarray  # distinct positive scores, descending
    counts: np.ndarray  # int64: positives with exactly this score
    neg_at_or_above: np.ndarray  # int64: negatives with score >= value
    neg_equal: np.ndarray  # int64: negatives with score == value
    n_pos: int
    n_neg: int


def _positive_runs(others_sorted: np.ndarray, pos_sorted: np.ndarray, others_include_positives: bool = False,
                   ) -> tuple[_PositiveRuns, np.ndarray]:
    """Returns the runs of equal positive scores (descending) and the start index of each run in ``pos_sorted``.

    ``others_sorted`` holds the negatives' scores, or every score when ``others_include_positives`` (the negatives
    are then counted as all minus positives); both arrays are ascending and of the same dtype.
    """
    n_pos, n_others = len(pos_sorted), len(others_sorted)
    own = n_pos if others_include_positives else 0
    starts = np.flatnonzero(np.r_[True, pos_sorted[1:] != pos_sorted[:-1]]) if n_pos else np.zeros(0, np.int64)
    values = pos_sorted[starts]
    counts = np.diff(np.r_[starts, n_pos]).astype(np.int64)
    below = np.searchsorted(others_sorted, values, side="left").astype(np.int64)
    # Past a run's own copies (when included) the next score differs unless a negative ties with it; such ties
    # are rare in real maps, so only those are looked up.
    after_own = below + counts if own else below
    equal = counts.copy() if own else np.zeros(len(values), np.int64)
    probe = np.minimum(after_own, max(n_others - 1, 0))
    tied = np.flatnonzero((after_own < n_others) & (others_sorted[probe] == values)) if n_others else probe[:0]
    if len(tied):
        equal[tied] = np.searchsorted(others_sorted, values[tied], side="right") - below[tied]
    if own:
        below -= starts  # positives below each run
        equal -= counts
    n_neg = n_others - own
    runs = _PositiveRuns(values[::-1], counts[::-1], (n_neg - below)[::-1], equal[::-1], n_pos, n_neg)
    return runs, starts


def _auroc(runs: _PositiveRuns, where: str | None, level: str = "") -> float:
    if runs.n_pos == 0 or runs.n_neg == 0:
        present = "no" if runs.n_pos == runs.n_neg == 0 else "only negative" if runs.n_neg else "only positive"
        _warn(f"{level}AUROC undefined: {present} samples", where)
        return math.nan
    below = runs.n_neg - runs.neg_at_or_above
    # 2U = sum over positives of (2 * #negatives below + #negatives tied): an exact integer while 2PN < 2^62.
    if 2 * runs.n_pos * runs.n_neg < 2 ** 62:
        twice_u = int(np.sum(runs.counts * (2 * below + runs.neg_equal)))
        return float(twice_u / (2 * runs.n_pos * runs.n_neg))
    terms = runs.counts.astype(np.float64) * (2 * below + runs.neg_equal).astype(np.float64)
    return math.fsum(terms) / (2.0 * runs.n_pos * runs.n_neg)


def _precision_recall(runs: _PositiveRuns) -> tuple[np.ndarray, np.ndarray]:
    # Same floating-point operations as sklearn's precision_recall_curve at the points where recall changes.
    tps = np.cumsum(runs.counts).astype(np.float64)
    precision = tps / (tps + runs.neg_at_or_above)
    recall = tps / runs.n_pos
    return precision, recall


def _one_class(runs: _PositiveRuns, metric: str, where: str | None) -> bool:
    """Warns and returns True when only one class is present: AP and F1-max are then undefined (as AUROC is).

    Without negatives every threshold has precision 1, so AP = F1-max = 1.0 would be reported for any scores.
    """
    if runs.n_pos and runs.n_neg:
        return False
    _warn(f"{metric} undefined: {'no positive' if runs.n_neg else 'no negative'} samples", where)
    return True


def _average_precision(runs: _PositiveRuns, where: str | None, level: str = "") -> float:
    if _one_class(runs, f"{level}AP", where):
        return math.nan
    precision, recall = _precision_recall(runs)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _f1_max(runs: _PositiveRuns, where: str | None, level: str = "") -> float:
    if _one_class(runs, f"{level}F1-max", where):
        return math.nan
    # Between two distinct positive scores TP is constant and FP only grows, so the maximum sits at a positive score.
    precision, recall = _precision_recall(runs)
    return float(np.max(2 * precision * recall / (precision + recall)))


def _ranking_runs(scores: np.ndarray, labels: np.ndarray) -> _PositiveRuns:
    scores, labels = np.ravel(scores), np.ravel(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in length")
    labels = _as_labels(labels, "labels")
    scores = _as_scores(scores, "scores")
    neg, pos = np.sort(scores[~labels]), np.sort(scores[labels])
    return _positive_runs(neg, pos)[0]


def _as_labels(labels: object, what: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iu" or (array.size and not np.isin(array, (0, 1)).all()):
        raise ValueError(f"{what} must be boolean or 0/1 integers, got dtype {array.dtype}")
    return array.astype(bool)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Returns the exact ROC AUC (ties count one half); NaN with a warning if only one class is present."""
    return _auroc(_ranking_runs(scores, labels), None)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Returns step-wise average precision (sklearn's definition); NaN with a warning if only one class is present."""
    return _average_precision(_ranking_runs(scores, labels), None)


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Returns the maximum F1 over all distinct thresholds (0/0 counts as 0); NaN with a warning for one class only."""
    return _f1_max(_ranking_runs(scores, labels), None)


# --------------------------------------------------------------------------------------------------------------------
# AU-PRO
# --------------------------------------------------------------------------------------------------------------------

def _aupro_exact(runs: _PositiveRuns, run_pro: np.ndarray, n_regions: int, fpr_limit: float) -> float:
    """Returns the area under the official PRO curve up to ``fpr_limit`` divided by it.

    ``run_pro`` holds, per run of ``runs``, the sum of 1/|C_k| over its positive pixels. The official curve has a
    vertex per distinct score; between two distinct positive scores only negatives enter, so PRO is flat there and
    the curve is (1) a horizontal piece over the negatives strictly between the two scores, then (2) a straight piece
    from the previous PRO to the new one over the negatives tied with the positive score (a vertical jump without
    such ties). Integrating these pieces in closed form gives the official area without visiting any negative pixel.
    """
    n_neg = runs.n_neg
    pro = np.cumsum(run_pro) / n_regions
    pro_before = np.r_[0.0, pro[:-1]]
    fpr_end = runs.neg_at_or_above / n_neg  # vertex of each positive score
    fpr_start = (runs.neg_at_or_above - runs.neg_equal) / n_neg  # where its tied negatives begin
    fpr_prev = np.r_[0.0, fpr_end[:-1]]
    limit = fpr_limit
    # (1) horizontal pieces, plus the tail after the lowest positive score up to FPR 1 at the final PRO
    area = float(np.sum(pro_before * (np.minimum(fpr_start, limit) - np.minimum(fpr_prev, limit))))
    last = fpr_end[-1] if len(fpr_end) else 0.0
    area += (pro[-1] if len(pro) else 0.0) * (min(1.0, limit) - min(last, limit))
    # (2) sloped pieces (tie runs): complete ones, then the one crossing the limit, interpolated linearly there
    full = fpr_end <= limit
    area += float(np.sum(((fpr_end - fpr_start) * (pro_before + pro) / 2)[full]))
    crossing = np.flatnonzero((fpr_start < limit) & (fpr_end > limit))
    if len(crossing):
        i = crossing[0]
        t = (limit - fpr_start[i]) / (fpr_end[i] - fpr_start[i])
        pro_at_limit = pro_before[i] + t * (pro[i] - pro_before[i])
        area += (limit - fpr_start[i]) * (pro_before[i] + pro_at_limit) / 2
    return area / fpr_limit


def _aupro_step200(all_sorted: np.ndarray, pos_sorted: np.ndarray, pos_weight_sorted: np.ndarray, n_regions: int,
                   fpr_limit: float, where: str | None, steps: int = 200) -> float:
    """Returns the cflow / AnomalyCLIP / MuSc PRO score (``steps`` thresholds, FPR < limit rescaled to [0, 1]).

    ``all_sorted`` holds every pixel's score (negatives and positives), ascending. Thresholds and comparisons are
    those of the reference code run under NumPy 2 (step in the maps' dtype, float64 thresholds and comparisons).
    Under NumPy 1, which the papers' runs used, the step was float64 and ``maps > th`` compared in float32; that can
    move pixels lying within a float32 rounding of a threshold, a difference far below the variant's own bias.
    """
    dtype = all_sorted.dtype
    lowest, highest = all_sorted[0], all_sorted[-1]
    # The reference computes its thresholds with np.arange on scalars of the maps' dtype; so does this.
    with np.errstate(all="ignore"):
        delta = (highest - lowest) / steps
        if not (np.isfinite(delta) and delta > 0):
            _warn("AUPRO (step200) undefined: all scores are equal or infinite", where)
            return math.nan
        thresholds = np.arange(lowest, highest, delta)
    # np.arange returns float64 even for float32 scalars, and the reference then compares `maps > th` in float64.
    # For float32 scores that test equals `score > th32` with th32 the largest float32 not above th, which keeps
    # the big sorted array in its own dtype (no float64 copy).
    if thresholds.dtype != dtype:
        rounded = thresholds.astype(dtype)
        above = rounded > thresholds
        rounded[above] = np.nextafter(rounded[above], dtype.type(-np.inf))
        thresholds = rounded
    # PRO(th) = mean over regions of the fraction of the region above th = (sum over pixels > th of 1/|C|) / K
    above_weight = np.r_[np.cumsum(pos_weight_sorted[::-1])[::-1], 0.0]
    pos_at_or_below = np.searchsorted(pos_sorted, thresholds, side="right")
    pros = above_weight[pos_at_or_below] / n_regions
    n_neg = len(all_sorted) - len(pos_sorted)
    neg_above = n_neg - (np.searchsorted(all_sorted, thresholds, side="right") - pos_at_or_below)
    fprs = neg_above / n_neg
    keep = fprs < fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    if len(fprs) < 2 or fprs.max() == fprs.min():
        _warn(f"AUPRO (step200) undefined: fewer than two distinct FPR values below {fpr_limit:g}", where)
        return math.nan
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    # sklearn.metrics.auc on a decreasing x: minus the trapezoid along the thresholds' order
    return float(-np.trapezoid(pros, fprs))


# --------------------------------------------------------------------------------------------------------------------
# Streaming accumulation of one category's pixels
# --------------------------------------------------------------------------------------------------------------------

def _allocate(length: int, dtype: np.dtype) -> np.ndarray:
    """Returns an uninitialised 1-D array whose pages become resident only when written and go back when freed.

    A private anonymous mapping of its own (not numpy's allocator): no transparent-huge-page advice, whose page
    compaction can stall the first write of fresh memory for seconds, and no dependence on the C allocator's
    thresholds for returning freed memory to the OS.
    """
    nbytes = max(length, 1) * dtype.itemsize
    flags = getattr(mmap, "MAP_PRIVATE", None)
    if flags is not None:
        try:
            return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype, count=length)
        except (OSError, ValueError, OverflowError):
            pass
    return np.empty(length, dtype)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 8 << 30


class _Blocks:
    """A growable 1-D store of scores that never reallocates.

    The first block reserves address space for up to 2^29 values (at most half the physical memory): pages are backed
    only as they are written, so it costs no memory beyond what is stored, and a category of up to 537 M pixels ends
    in one array that is sorted in place, with no gathering copy. Further blocks hold larger categories; gathering
    them copies block by block, freeing each as it goes.
    """

    FIRST_BLOCK = 1 << 29  # elements of address space reserved up front
    BLOCK = 1 << 23  # elements per further block

    def __init__(self) -> None:
        self._blocks: list[np.ndarray] = []
        self._used = 0  # elements written to the last block

    def __len__(self) -> int:
        return sum(len(b) for b in self._blocks[:-1]) + self._used

    @property
    def dtypes(self) -> list[np.dtype]:
        """Returns the dtypes of the stored blocks."""
        return [b.dtype for b in self._blocks]

    def append(self, values: np.ndarray) -> None:
        """Appends a 1-D array (copied)."""
        while len(values):
            if not self._blocks or self._used == len(self._blocks[-1]) or self._blocks[-1].dtype != values.dtype:
                if self._blocks:
                    self._blocks[-1] = self._blocks[-1][:self._used]
                self._blocks.append(self._new_block(values.dtype, len(values)))
                self._used = 0
            block = self._blocks[-1]
            take = min(len(values), len(block) - self._used)
            block[self._used:self._used + take] = values[:take]
            self._used += take
            values = values[take:]

    def _new_block(self, dtype: np.dtype, needed: int) -> np.ndarray:
        if not self._blocks:
            try:
                first = min(self.FIRST_BLOCK, _physical_memory() // 2 // dtype.itemsize)
                return _allocate(max(first, needed), dtype)
            except MemoryError:  # no address space to spare (e.g. a commit limit): small blocks only
                pass
        return _allocate(max(self.BLOCK, needed), dtype)

    def gather(self, dtype: np.dtype) -> np.ndarray:
        """Returns every stored value in one array of ``dtype`` (freeing the blocks as they are copied)."""
        if self._blocks:
            self._blocks[-1] = self._blocks[-1][:self._used]
        if len(self._blocks) == 1 and self._blocks[0].dtype == dtype:
            out = self._blocks.pop()
        else:
            out = _allocate(sum(len(b) for b in self._blocks), dtype)
            offset = 0
            while self._blocks:  # order is irrelevant (the caller sorts); last first lets each block go at once
                block = self._blocks.pop()
                out[offset:offset + len(block)] = block
                offset += len(block)
                del block
        self._blocks, self._used = [out], len(out)
        return out

    @property
    def nbytes(self) -> int:
        """Returns the bytes of the values written so far."""
        last = self._used * self._blocks[-1].itemsize if self._blocks else 0
        return sum(b.nbytes for b in self._blocks[:-1]) + last


class PixelAccumulator:
    """Keeps one category's pixel scores compactly: every score once, and the positives' scores with component ids.

    The negatives are never separated: counts of negatives are counts of all scores minus counts of positives, so an
    image costs one contiguous copy of its map plus its (few) positive pixels.
    """

    def __init__(self) -> None:
        self._scores = _Blocks()
        self._positives: list[np.ndarray] = []
        self._positive_regions: list[np.ndarray] = []
        self._region_areas: list[np.ndarray] = []
        self.n_regions = 0
        self.n_images = 0

    def add(self, anomaly_map: object, mask: object, what: str = "anomaly map") -> None:
        """Adds one image: its (H, W) score map and boolean mask of the same size."""
        scores = _as_scores(anomaly_map, what)
        mask = _as_labels(mask, f"mask of {what}")
        if scores.ndim != 2 or mask.shape != scores.shape:
            raise ValueError(f"{what} has shape {scores.shape} but its mask has shape {mask.shape}; "
                             "both must be the same (H, W)")
        self.n_images += 1
        self._scores.append(scores.ravel())
        if not mask.any():
            return
        # Components are labelled inside the mask's bounding box only (defects are small); row-major order is kept,
        # so the positives' scores and their component ids line up.
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        regions, count = ndimage.label(mask[box], structure=_EIGHT_CONNECTED)
        if self.n_regions + count >= np.iinfo(np.int32).max:
            raise ValueError("more than 2^31 ground-truth regions in one category")
        inside = mask[box]
        self._positives.append(scores[box][inside])
        ids = regions[inside]
        self._region_areas.append(np.bincount(ids, minlength=count + 1)[1:].astype(np.int64))
        ids += self.n_regions - 1  # global, 0-based component ids
        self._positive_regions.append(ids.astype(np.int32, copy=False))
        self.n_regions += count

    @property
    def nbytes(self) -> int:
        """Returns the bytes held by the stored scores and component ids."""
        return self._scores.nbytes + sum(a.nbytes for part in (self._positives, self._positive_regions,
                                                                   self._region_areas) for a in part)

    def sorted_scores(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns all scores ascending, the positives' scores ascending and their 1/|C| weights.

        The scores are gathered into one array and sorted in place (values only: no argsort, no index array); the
        sorted array stays the store, so a later ``add`` and another call still work.
        """
        dtypes = self._scores.dtypes
        dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float32)
        scores = self._scores.gather(dtype)
        scores.sort()
        if not self._positives:
            return scores, np.zeros(0, dtype), np.zeros(0)
        positives = np.concatenate(self._positives).astype(dtype, copy=False)
        regions = np.concatenate(self._positive_regions)
        areas = np.concatenate(self._region_areas)
        self._positives, self._positive_regions, self._region_areas = [positives], [regions], [areas]
        order = np.argsort(positives)  # positives are few (~1 % of the pixels); ties are summed, so any order works
        weights = (1.0 / areas)[regions[order]]
        return scores, positives[order], weights

    def compute(self, aupro: str = "exact", fpr_limit: float = 0.3, where: str | None = None) -> dict[str, float]:
        """Returns pixel AUROC, AP, F1-max and AUPRO (NaN with a warning where undefined)."""
        scores, positives, weights = self.sorted_scores()
        runs, starts = _positive_runs(scores, positives, others_include_positives=True)
        out = {"pixel_auroc": _auroc(runs, where, "pixel "), "pixel_ap": _average_precision(runs, where, "pixel "),
               "pixel_f1max": _f1_max(runs, where, "pixel ")}
        if self.n_regions == 0 or runs.n_neg == 0:
            _warn(f"pixel AUPRO undefined: {'no defect regions' if self.n_regions == 0 else 'no negative pixels'}",
                  where)
            out["pixel_aupro"] = math.nan
        elif aupro == "exact":
            run_pro = np.add.reduceat(weights, starts)[::-1] if len(starts) else np.zeros(0)
            out["pixel_aupro"] = _aupro_exact(runs, run_pro, self.n_regions, fpr_limit)
        else:
            out["pixel_aupro"] = _aupro_step200(scores, positives, weights, self.n_regions, fpr_limit, where)
        return out


def _check_aupro_options(variant: str, fpr_limit: float) -> None:
    if variant not in AUPRO_VARIANTS:
        raise ValueError(f"unknown AUPRO variant {variant!r}; choose one of {AUPRO_VARIANTS}")
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3,
          variant: str = "exact") -> float:
    """Returns the official MVTec AD AU-PRO up to ``fpr_limit``, normalised by it; NaN with a warning if undefined.

    ``variant="step200"`` gives the cflow / AnomalyCLIP / MuSc approximation instead (paper comparison only).
    """
    _check_aupro_options(variant, fpr_limit)
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} anomaly maps but {len(masks)} masks")
    accumulator = PixelAccumulator()
    for i, (amap, mask) in enumerate(zip(maps, masks)):
        accumulator.add(amap, mask, f"anomaly map {i}")
    scores, positives, weights = accumulator.sorted_scores()
    if accumulator.n_regions == 0 or len(scores) == len(positives):
        _warn(f"AUPRO undefined: {'no defect regions' if accumulator.n_regions == 0 else 'no negative pixels'}",
              None)
        return math.nan
    if variant == "step200":
        return _aupro_step200(scores, positives, weights, accumulator.n_regions, fpr_limit, None)
    runs, starts = _positive_runs(scores, positives, others_include_positives=True)
    return _aupro_exact(runs, np.add.reduceat(weights, starts)[::-1], accumulator.n_regions, fpr_limit)


def mad(metrics: dict[str, float], recipe: str) -> float:
    """Returns the unweighted mean of the recipe's metrics; NaN if any of them is missing or NaN."""
    values = [metrics.get(name, math.nan) for name in MAD_RECIPES[recipe]]
    return math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))


class CategoryMetrics:
    """Accumulates one category's predictions batch by batch and computes its metrics once.

    ``aupro`` picks the AUPRO implementation ("exact", the default, or "step200" for paper comparison) and
    ``fpr_limit`` its integration limit; :attr:`tags` names the implementation behind every reported value.
    ``category`` only names the category in warnings and errors.
    """

    def __init__(self, pixel: bool = True, aupro: str = "exact", fpr_limit: float = 0.3,
                 category: str | None = None) -> None:
        _check_aupro_options(aupro, fpr_limit)
        self.pixel = pixel
        self.aupro = aupro
        self.fpr_limit = fpr_limit
        self.category = category
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pixels = PixelAccumulator()

    @property
    def tags(self) -> dict[str, str]:
        """Returns the implementation tag of every metric that :meth:`compute` reports."""
        return metric_tags(self.aupro, self.fpr_limit)

    @property
    def nbytes(self) -> int:
        """Returns the bytes the accumulated pixel scores occupy."""
        return self._pixels.nbytes

    def update(self, image_scores: np.ndarray, labels: np.ndarray, anomaly_maps: Sequence[np.ndarray] | None = None,
               masks: Sequence[np.ndarray] | None = None) -> None:
        """Adds a batch: image scores (B,), labels (B,), and when pixel-level, maps and boolean masks (each H, W)."""
        where = f"category {self.category!r}" if self.category else "batch"
        scores = _as_scores(np.ravel(image_scores), f"{where}: image scores")
        labels = _as_labels(np.ravel(labels), f"{where}: labels")
        if len(scores) != len(labels):
            raise ValueError(f"{where}: {len(scores)} image scores but {len(labels)} labels")
        if self.pixel:
            if anomaly_maps is None or masks is None:
                raise ValueError(f"{where}: pixel-level metrics need anomaly maps and masks for every batch")
            if not len(anomaly_maps) == len(masks) == len(scores):
                raise ValueError(f"{where}: {len(scores)} image scores, {len(anomaly_maps)} anomaly maps and "
                                 f"{len(masks)} masks in one batch")
            for amap, mask in zip(anomaly_maps, masks):
                self._pixels.add(amap, mask, f"{where}: anomaly map {self._pixels.n_images}")
        self._scores.append(scores)
        self._labels.append(labels)

    def compute(self) -> dict[str, float]:
        """Returns every metric of :data:`METRIC_NAMES` (pixel ones NaN when not pixel-level) plus the mAD recipes."""
        where = f"category {self.category!r}" if self.category else None
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, bool)
        runs = _positive_runs(np.sort(scores[~labels]), np.sort(scores[labels]))[0]
        out = {"image_auroc": _auroc(runs, where, "image "), "image_ap": _average_precision(runs, where, "image "),
               "image_f1max": _f1_max(runs, where, "image ")}
        if self.pixel:
            out |= self._pixels.compute(self.aupro, self.fpr_limit, where)
        else:
            out |= dict.fromkeys(PIXEL_METRICS, math.nan)
        for recipe in MAD_RECIPES:
            out[f"mad_{recipe}"] = mad(out, recipe)
        return out
