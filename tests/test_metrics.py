"""The metric engine against sklearn and against slow, literal implementations of the AU-PRO algorithms."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from bisect import bisect_right
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from zsadbench.metrics import (
    IMPLEMENTATION_TAGS,
    MAD_RECIPES,
    METRIC_NAMES,
    CategoryMetrics,
    MetricWarning,
    aupro,
    auroc,
    average_precision,
    f1_max,
    mad,
)

# --------------------------------------------------------------------------------------------------------------------
# Slow, literal references (written from the definitions in docs/metrics.md)
# --------------------------------------------------------------------------------------------------------------------


def literal_aupro(maps, masks, fpr_limit=0.3):
    """The official MVTec AD algorithm step by step: per-pixel increments, argsort, cumsum, tie merge, trapezoid."""
    scores, fp_inc, pro_inc, n_regions = [], [], [], 0
    for amap, mask in zip(maps, masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        n_regions += count
        fp = (labels == 0).astype(np.float64)
        pro = np.zeros(labels.shape)
        for k in range(1, count + 1):
            region = labels == k
            pro[region] = 1.0 / region.sum()
        scores.append(np.asarray(amap).ravel())
        fp_inc.append(fp.ravel())
        pro_inc.append(pro.ravel())
    scores, fp_inc, pro_inc = np.concatenate(scores), np.concatenate(fp_inc), np.concatenate(pro_inc)
    order = np.argsort(scores)[::-1]
    scores, fpr, pro = scores[order], np.cumsum(fp_inc[order]), np.cumsum(pro_inc[order])
    fpr, pro = fpr / fp_inc.sum(), pro / n_regions
    keep = np.append(np.diff(scores) != 0, True)
    fpr = np.concatenate(([0.0], np.clip(fpr[keep], None, 1.0), [1.0]))
    pro = np.concatenate(([0.0], np.clip(pro[keep], None, 1.0), [1.0]))
    correction = 0.0
    if fpr_limit not in fpr:
        i = bisect_right(fpr.tolist(), fpr_limit)
        pro_at = pro[i - 1] + (pro[i] - pro[i - 1]) * (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        correction = 0.5 * (pro_at + pro[i - 1]) * (fpr_limit - fpr[i - 1])
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / fpr_limit


def literal_step200(maps, masks, max_step=200, expect_fpr=0.3):
    """The cflow-ad / AnomalyCLIP / MuSc loop: binarise at each of 200 thresholds, per-region overlap, sklearn auc."""
    maps, masks = np.asarray(maps), np.asarray(masks)
    binary = np.zeros_like(maps, dtype=bool)
    lowest, highest = maps.min(), maps.max()
    delta = (highest - lowest) / max_step
    pros, fprs = [], []
    for th in np.arange(lowest, highest, delta):
        binary[maps <= th], binary[maps > th] = 0, 1
        overlaps = []
        for b, mask in zip(binary, masks):
            for region in measure.regionprops(measure.label(mask)):
                overlaps.append(b[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        inverse = 1 - masks
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros.append(np.array(overlaps).mean())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    fprs = fprs[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return sk_auc(fprs, pros[keep])


def sk_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(f1.max())


def random_category(rng, sizes, levels=12, density=0.04, normal_every=3, dtype=np.float32):
    """Maps with many ties (``levels`` values) and masks with many small 8-connected components."""
    maps, masks = [], []
    for i, (h, w) in enumerate(sizes):
        mask = np.zeros((h, w), bool)
        if i % normal_every:
            mask = rng.random((h, w)) < density  # sparse pixels: many components, many diagonal contacts
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            mask[y:y + rng.integers(2, 5), x:x + rng.integers(2, 5)] = True
        scores = rng.integers(0, levels, (h, w)) + mask * rng.integers(0, levels // 2, (h, w))
        maps.append((scores / levels).astype(dtype))
        masks.append(mask)
    return maps, masks


def category_metrics(maps, masks, batch=3, **options):
    metrics = CategoryMetrics(**options)
    image_scores = np.array([m.max() for m in maps], np.float64)
    labels = np.array([m.any() for m in masks])
    for b in range(0, len(maps), batch):
        metrics.update(image_scores[b:b + batch], labels[b:b + batch], maps[b:b + batch], masks[b:b + batch])
    return metrics


SIZES = [(17, 23), (23, 17), (30, 30), (12, 40), (17, 23), (25, 9), (9, 25), (31, 18), (18, 31), (20, 20)]


# --------------------------------------------------------------------------------------------------------------------
# AUROC, AP, F1-max
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_ranking_metrics_equal_sklearn_on_tied_scores(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 3000))
    levels = int(rng.choice([2, 5, 30, 1000, 10 ** 9]))
    labels = rng.random(n) < rng.choice([0.01, 0.2, 0.5, 0.9])
    labels[:2] = [True, False]
    scores = rng.integers(0, levels, n) + labels * rng.integers(0, 3, n)
    scores = (scores / levels).astype(rng.choice([np.float32, np.float64]))
    assert abs(auroc(scores, labels) - roc_auc_score(labels, scores)) <= 1e-12
    assert abs(average_precision(scores, labels) - average_precision_score(labels, scores)) <= 1e-12
    assert abs(f1_max(scores, labels) - sk_f1_max(labels, scores)) <= 1e-12


def test_ranking_metrics_accept_integer_labels_and_scores():
    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    scores = np.array([3, 5, 3, 1, 9, 3, 0])
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-15)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-15)
    assert f1_max(scores, labels) == pytest.approx(sk_f1_max(labels, scores), abs=1e-15)


def test_f1_max_takes_the_best_threshold_not_the_last():
    # At threshold 0.9: P = 1, R = 0.5 -> F1 2/3; at 0.1 (all positive): P = 0.5, R = 1 -> F1 2/3; at 0.5: 0.8.
    scores = np.array([0.9, 0.5, 0.1, 0.1, 0.1])
    labels = np.array([1, 1, 0, 0, 0], bool)
    assert f1_max(scores, labels) == pytest.approx(1.0)
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    labels = np.array([1, 1, 0, 0], bool)
    assert f1_max(scores, labels) == pytest.approx(0.8)


# --------------------------------------------------------------------------------------------------------------------
# Pixel level: the streaming engine against sklearn and the literal official AU-PRO
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_category_metrics_equal_references(seed):
    rng = np.random.default_rng(100 + seed)
    sizes = [SIZES[i] for i in rng.permutation(len(SIZES))]
    maps, masks = random_category(rng, sizes, levels=int(rng.choice([3, 12, 200])))
    got = category_metrics(maps, masks).compute()
    flat_scores = np.concatenate([m.ravel() for m in maps])
    flat_labels = np.concatenate([m.ravel() for m in masks])
    image_scores = [m.max() for m in maps]
    image_labels = [m.any() for m in masks]
    want = {
        "image_auroc": roc_auc_score(image_labels, image_scores),
        "image_ap": average_precision_score(image_labels, image_scores),
        "image_f1max": sk_f1_max(image_labels, image_scores),
        "pixel_auroc": roc_auc_score(flat_labels, flat_scores),
        "pixel_ap": average_precision_score(flat_labels, flat_scores),
        "pixel_f1max": sk_f1_max(flat_labels, flat_scores),
    }
    for name, value in want.items():
        assert abs(got[name] - value) <= 1e-12, name
    assert abs(got["pixel_aupro"] - literal_aupro(maps, masks)) <= 1e-9
    for recipe, members in MAD_RECIPES.items():
        assert got[f"mad_{recipe}"] == pytest.approx(np.mean([got[m] for m in members]), abs=1e-15)


@pytest.mark.parametrize("limit", [0.3, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_aupro_equals_literal_official_algorithm(seed, limit):
    rng = np.random.default_rng(seed)
    maps, masks = random_category(rng, SIZES[: 4 + seed], levels=[2, 4, 25, 10 ** 6][seed], density=0.08)
    assert abs(aupro(maps, masks, fpr_limit=limit) - literal_aupro(maps, masks, limit)) <= 1e-9


def test_aupro_uses_eight_connectivity():
    # Two diagonal pixels are one region (8-connectivity), the isolated pixel another: K = 2, not 3.
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = mask[4, 4] = True
    amap = np.zeros((6, 6), np.float32)
    amap[1, 1] = 1.0  # only one of the two diagonal pixels is found
    amap[4, 4] = 1.0
    # First curve vertex: FPR 0, PRO = (1/2 + 1) / 2 = 0.75; then straight to (1, 1).
    expected = (0.75 * 0.3 + 0.25 * 0.3 * 0.3 / 2) / 0.3
    assert aupro([amap], [mask]) == pytest.approx(expected, abs=1e-12)
    assert aupro([amap], [mask]) == pytest.approx(literal_aupro([amap], [mask]), abs=1e-12)


def test_aupro_limit_on_a_vertex_and_on_a_tie_run():
    # 10 negatives: 3 score 2 (FPR exactly 0.3 at that vertex); one region of 2 pixels scored 1 and 3.
    amap = np.array([[2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 3, 1]], np.float32)
    mask = np.array([[0] * 10 + [1, 1]], bool)
    assert aupro([amap], [mask]) == pytest.approx(literal_aupro([amap], [mask]), abs=1e-12)
    assert aupro([amap], [mask]) == pytest.approx(0.5, abs=1e-12)  # PRO 0.5 over FPR [0, 0.3]
    # The tie run crosses 0.3: five negatives tied with the second region pixel -> interpolation inside the run.
    amap = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 3, 1]], np.float32)
    want = literal_aupro([amap], [mask])
    assert aupro([amap], [mask]) == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx((0.3 * (0.5 + 0.5 + 0.5 * 0.3 / 0.5) / 2) / 0.3, abs=1e-12)


def test_step200_equals_literal_cflow_loop():
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        maps, masks = random_category(rng, [(24, 32)] * 5, levels=10 ** 6, density=0.02, dtype=dtype)
        maps = [m + 0.4 * k for m, k in zip(maps, masks)]  # a map where the 30 % FPR cut keeps many steps
        want = literal_step200(maps, masks)
        assert aupro(maps, masks, variant="step200") == pytest.approx(want, abs=1e-9)
        assert category_metrics(maps, masks, aupro="step200").compute()["pixel_aupro"] == pytest.approx(want, abs=1e-9)
    # Integer scores 0..200: every threshold sits exactly on a score, so `> th` and `>= th` differ.
    maps, masks = random_category(rng, [(24, 32)] * 5, levels=201, density=0.02)
    maps = [np.minimum(np.round(m * 150), 200).astype(np.float32) for m in maps]
    maps[0][0, 0], maps[1][0, 0] = 0, 200
    assert aupro(maps, masks, variant="step200") == pytest.approx(literal_step200(maps, masks), abs=1e-9)
    # Scores on the float32 roundings of the (float64) thresholds: `score > th` must be decided in float64.
    thresholds = np.arange(np.float32(0), np.float32(1), (np.float32(1) - np.float32(0)) / 200)
    on_threshold = thresholds.astype(np.float32)
    assert (on_threshold > thresholds).any()
    maps = [np.resize(np.r_[on_threshold, 0, 1].astype(np.float32), (24, 32)) for _ in range(3)]
    masks = [np.zeros((24, 32), bool), maps[1] > 0.6, np.eye(24, 32, 5, dtype=bool)]  # min 0 and max 1 stay
    assert aupro(maps, masks, variant="step200") == pytest.approx(literal_step200(maps, masks), abs=1e-9)


def test_step200_is_opt_in_and_tagged():
    rng = np.random.default_rng(3)
    maps, masks = random_category(rng, [(24, 32)] * 6, levels=10 ** 6)
    maps = [m + 0.4 * k for m, k in zip(maps, masks)]
    exact, step = category_metrics(maps, masks), category_metrics(maps, masks, aupro="step200")
    assert exact.tags["pixel_aupro"] == "aupro.exact@0.3" == IMPLEMENTATION_TAGS["pixel_aupro"]
    assert step.tags["pixel_aupro"] == "aupro.step200@0.3"
    assert CategoryMetrics(fpr_limit=0.05).tags["pixel_aupro"] == "aupro.exact@0.05"
    assert set(exact.tags) == set(exact.compute())
    assert abs(exact.compute()["pixel_aupro"] - step.compute()["pixel_aupro"]) > 1e-3
    with pytest.raises(ValueError, match="step100"):
        CategoryMetrics(aupro="step100")


def test_exact_metrics_are_invariant_under_monotone_transforms_step200_is_not():
    rng = np.random.default_rng(11)
    maps, masks = random_category(rng, [(24, 32)] * 6, levels=10 ** 6)
    maps = [m + 0.3 * k for m, k in zip(maps, masks)]
    # A strictly increasing, injective transform (through dense ranks, so no two distinct scores merge).
    values, inverse = np.unique(np.concatenate([m.ravel() for m in maps]), return_inverse=True)
    squashed = np.exp(20 * np.arange(len(values)) / len(values))  # convex: spreads the top scores apart
    offsets = np.cumsum([0] + [m.size for m in maps])
    moved = [squashed[inverse[a:b]].reshape(m.shape) for m, a, b in zip(maps, offsets[:-1], offsets[1:])]
    before, after = category_metrics(maps, masks).compute(), category_metrics(moved, masks).compute()
    for name in METRIC_NAMES:
        assert before[name] == pytest.approx(after[name], abs=1e-12), name
    step_before = category_metrics(maps, masks, aupro="step200").compute()["pixel_aupro"]
    step_after = category_metrics(moved, masks, aupro="step200").compute()["pixel_aupro"]
    assert abs(step_before - step_after) > 0.01


# --------------------------------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------------------------------

def test_one_label_only_gives_nan_and_a_warning():
    with pytest.warns(MetricWarning, match="AUROC undefined"):
        assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([False, False])))
    with pytest.warns(MetricWarning, match="AP undefined"):
        assert math.isnan(average_precision(np.array([0.1, 0.2]), np.array([False, False])))
    with pytest.warns(MetricWarning, match="F1-max undefined"):
        assert math.isnan(f1_max(np.array([0.1, 0.2]), np.array([False, False])))
    with pytest.warns(MetricWarning, match="AUROC undefined: only positive"):
        assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([True, True])))
    # With positives only, sklearn gives AP = 1.0 whatever the scores: undefined here, as AUROC is.
    with pytest.warns(MetricWarning, match="AP undefined: no negative samples"):
        assert math.isnan(average_precision(np.array([0.1, 0.2]), np.array([True, True])))
    with pytest.warns(MetricWarning, match="F1-max undefined: no negative samples"):
        assert math.isnan(f1_max(np.array([0.1, 0.2]), np.array([True, True])))


def test_all_scores_equal():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.1
    scores = np.full(500, 0.25, np.float32)
    assert auroc(scores, labels) == 0.5
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-15)
    assert f1_max(scores, labels) == pytest.approx(sk_f1_max(labels, scores), abs=1e-15)
    maps, masks = random_category(rng, SIZES[:4])
    flat = [np.full_like(m, 0.5) for m in maps]
    assert aupro(flat, masks) == pytest.approx(0.15, abs=1e-12)  # the diagonal: 0.3^2 / 2 / 0.3
    assert aupro(flat, masks) == pytest.approx(literal_aupro(flat, masks), abs=1e-12)
    with pytest.warns(MetricWarning, match="step200.*undefined"):
        assert math.isnan(aupro(flat, masks, variant="step200"))


def test_no_components_gives_nan_aupro_and_nan_pixel_mad():
    maps = [np.random.default_rng(0).random((8, 8)).astype(np.float32) for _ in range(3)]
    masks = [np.zeros((8, 8), bool)] * 3
    with pytest.warns(MetricWarning, match="AUPRO undefined: no defect regions"):
        assert math.isnan(aupro(maps, masks))
    metrics = CategoryMetrics(category="screw")
    metrics.update(np.array([0.1, 0.9, 0.5]), np.array([0, 1, 0]), maps, masks)
    with pytest.warns(MetricWarning) as caught:
        out = metrics.compute()
    assert sorted(str(w.message) for w in caught) == [
        "category 'screw': pixel AP undefined: no positive samples",
        "category 'screw': pixel AUPRO undefined: no defect regions",
        "category 'screw': pixel AUROC undefined: only negative samples",
        "category 'screw': pixel F1-max undefined: no positive samples"]
    assert out["image_auroc"] == 1.0
    assert math.isnan(out["pixel_auroc"]) and math.isnan(out["pixel_aupro"])
    assert math.isnan(out["mad_pixel"]) and math.isnan(out["mad_all7"]) and out["mad_image"] == 1.0


def test_no_negative_pixels_gives_nan_aupro():
    with pytest.warns(MetricWarning, match="no negative pixels"):
        assert math.isnan(aupro([np.ones((3, 3), np.float32)], [np.ones((3, 3), bool)]))


def test_image_level_only_category():
    metrics = CategoryMetrics(pixel=False)
    metrics.update(np.array([0.2, 0.8]), np.array([0, 1]))
    metrics.update(np.array([0.3]), np.array([1]))
    out = metrics.compute()
    assert out["image_auroc"] == 1.0 and out["mad_image"] == 1.0
    assert all(math.isnan(out[m]) for m in ("pixel_auroc", "pixel_aupro", "mad_pixel", "mad_all7"))


def test_mad_is_nan_when_a_member_is_missing():
    metrics = dict.fromkeys(METRIC_NAMES, 0.5)
    assert mad(metrics, "all7") == 0.5
    metrics["pixel_aupro"] = math.nan
    assert math.isnan(mad(metrics, "pixel")) and mad(metrics, "image") == 0.5
    assert math.isnan(mad({"image_auroc": 1.0}, "image"))


# --------------------------------------------------------------------------------------------------------------------
# Numeric traps and streaming
# --------------------------------------------------------------------------------------------------------------------

def test_counts_beyond_float32_precision():
    """25.2 M pixels, 2^24 + 12345 negatives above the defect: a float32 running count would stop at 2^24."""
    side, n_images, area = 2048, 6, 100
    above = 2 ** 24 + 12345
    metrics = CategoryMetrics()
    remaining = above
    for i in range(n_images):
        amap = np.zeros(side * side, np.float32)
        take = min(remaining, amap.size)
        amap[:take] = 2.0
        remaining -= take
        mask = np.zeros(side * side, bool)
        if i == n_images - 1:
            mask[-area:] = True
            amap[-area:] = 1.0
        metrics.update(np.array([float(i)]), np.array([int(i == n_images - 1)]),
                       [amap.reshape(side, side)], [mask.reshape(side, side)])
    n_neg = n_images * side * side - area
    assert above > 2 ** 24 and n_neg > 2 ** 24
    got = metrics._pixels.compute(fpr_limit=1.0)
    assert got["pixel_auroc"] == float(Fraction(n_neg - above, n_neg))
    assert got["pixel_ap"] == pytest.approx(float(Fraction(area, area + above)), abs=1e-15)
    assert got["pixel_f1max"] == pytest.approx(float(Fraction(2 * area, 2 * area + above)), abs=1e-15)
    assert got["pixel_aupro"] == pytest.approx(float(1 - Fraction(above, n_neg)), abs=1e-12)


def test_streaming_is_independent_of_batching_and_compute_is_repeatable():
    rng = np.random.default_rng(5)
    maps, masks = random_category(rng, SIZES)
    one = category_metrics(maps, masks, batch=len(maps))
    many = category_metrics(maps, masks, batch=1)
    first = many.compute()
    assert first == one.compute() == many.compute()
    # An update after compute is folded in: same as having seen everything before.
    extra_maps, extra_masks = random_category(rng, SIZES[:3])
    many.update(np.array([m.max() for m in extra_maps], np.float64), np.array([m.any() for m in extra_masks]),
                extra_maps, extra_masks)
    together = category_metrics(maps + extra_maps, masks + extra_masks)
    assert many.compute() == together.compute()


def test_store_split_over_many_blocks_gives_the_same_result(monkeypatch):
    from zsadbench.metrics import _Blocks

    rng = np.random.default_rng(9)
    maps, masks = random_category(rng, SIZES)
    reference = category_metrics(maps, masks).compute()
    monkeypatch.setattr(_Blocks, "FIRST_BLOCK", 700)
    monkeypatch.setattr(_Blocks, "BLOCK", 333)  # images straddle blocks
    split = category_metrics(maps, masks)
    assert len(split._pixels._scores._blocks) > 5
    assert split.compute() == reference


def test_float64_maps_are_not_narrowed():
    # Two scores distinct in float64 but equal in float32: a cast would tie them and move the AUROC to 0.5.
    base = np.float64(0.1)
    amap = np.array([[base, base + 1e-12]])
    mask = np.array([[False, True]])
    metrics = CategoryMetrics()
    metrics.update(np.array([0.0, 1.0]), np.array([0, 1]), [np.zeros((1, 2), np.float32), amap],
                   [np.zeros((1, 2), bool), mask])
    assert metrics.compute()["pixel_auroc"] == 1.0


MEMORY_PROBE = """
import importlib.util, json, resource, sys
import numpy as np
spec = importlib.util.spec_from_file_location("engine", sys.argv[1])  # the module alone: no torch in the RSS
engine = sys.modules["engine"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(engine)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

rng = np.random.default_rng(0)
side, images, map_bytes = 1024, 32, 0
metrics = engine.CategoryMetrics()
baseline = None
for i in range(images):
    amap = rng.random((side, side), dtype=np.float32)
    mask = np.zeros((side, side), bool)
    if i % 2:
        mask[100:180, 300:420] = True
        mask[700:720, 10:30] = True
    map_bytes += amap.nbytes
    metrics.update(np.array([amap.max()], np.float64), np.array([i % 2]), [amap], [mask])
    baseline = baseline or rss()  # after the first image: every per-image buffer has existed once
    del amap, mask
stored = rss()
metrics.compute()
with open("/proc/self/status") as f:  # VmHWM: this process's peak (ru_maxrss would include the forking parent)
    peak = 1024 * int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
print(json.dumps({"map_bytes": map_bytes, "baseline": baseline, "stored": stored, "peak": peak,
                  "nbytes": metrics.nbytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident set sizes from /proc")
def test_memory_stays_near_one_copy_of_the_scores():
    """Streams 32 maps of 1024x1024 through a fresh process and reads its resident set size."""
    import zsadbench.metrics

    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, zsadbench.metrics.__file__], capture_output=True,
                         text=True, check=True).stdout
    probe = json.loads(out)
    map_bytes = probe["map_bytes"]
    # Maps and masks are not kept: about 4 bytes per pixel (+ 4 per positive pixel for its region id).
    assert probe["nbytes"] < 1.05 * map_bytes
    assert probe["stored"] - probe["baseline"] < 1.1 * map_bytes
    # compute() sorts in place: no second copy of the scores, no index arrays over all pixels.
    assert probe["peak"] - probe["baseline"] < 1.45 * map_bytes


def test_bad_inputs_name_what_is_wrong():
    metrics = CategoryMetrics(category="bottle")
    with pytest.raises(ValueError, match="category 'bottle'.*shape"):
        metrics.update(np.array([0.5]), np.array([1]), [np.zeros((4, 4))], [np.zeros((4, 5), bool)])
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(np.array([0.5]), np.array([1]), [np.full((4, 4), np.nan)], [np.zeros((4, 4), bool)])
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(np.array([np.nan]), np.array([1]), [np.zeros((4, 4))], [np.zeros((4, 4), bool)])
    with pytest.raises(ValueError, match="2 image scores, 1 anomaly maps"):
        metrics.update(np.array([0.5, 0.2]), np.array([1, 0]), [np.zeros((4, 4))], [np.zeros((4, 4), bool)])
    with pytest.raises(ValueError, match="need anomaly maps and masks"):
        metrics.update(np.array([0.5]), np.array([1]))
    with pytest.raises(ValueError, match="mask.*boolean"):
        metrics.update(np.array([0.5]), np.array([1]), [np.zeros((4, 4))], [np.full((4, 4), 0.5)])
    with pytest.raises(ValueError, match="fpr_limit"):
        CategoryMetrics(fpr_limit=0.0)


def test_warnings_do_not_fire_for_a_well_defined_category():
    rng = np.random.default_rng(1)
    maps, masks = random_category(rng, SIZES[:6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        category_metrics(maps, masks).compute()
