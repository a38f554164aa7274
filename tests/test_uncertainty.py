"""Bootstrap intervals and paired tests: exact against zsadbench.metrics, calibrated, paired, and strict on inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from zsadbench.metrics import auroc, average_precision, f1_max
from zsadbench.uncertainty import (
    _SortedCategory,
    _stratified_counts,
    align_scores,
    bootstrap_intervals,
    paired_test,
)


def scores_table(separation: float, n_normal: int = 30, n_anomalous: int = 30, categories: str = "abc",
                 seed: int = 0, root: str = "/data/set") -> pd.DataFrame:
    """Returns a scores.csv-like table: anomalous scores shifted by ``separation`` standard deviations."""
    rng = np.random.default_rng(seed)
    rows = []
    for category in categories:
        for i in range(n_normal):
            rows.append((category, f"{root}/{category}/test/good/{i:03d}.png", 0, rng.normal()))
        for i in range(n_anomalous):
            rows.append((category, f"{root}/{category}/test/defect/{i:03d}.png", 1, rng.normal() + separation))
    return pd.DataFrame(rows, columns=["category", "image", "label", "score"])


def test_replicate_metrics_equal_zsadbench_metrics_on_the_resampled_arrays() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # many ties, also across the two classes
    counts = _stratified_counts(rng, labels, 300)
    got = _SortedCategory(scores, labels).metrics(counts, ("image_auroc", "image_ap", "image_f1max"))
    for r in range(300):
        s, y = np.repeat(scores, counts[r]), np.repeat(labels, counts[r])
        assert got["image_auroc"][r] == pytest.approx(auroc(s, y), abs=1e-12)
        assert got["image_ap"][r] == pytest.approx(average_precision(s, y), abs=1e-12)
        assert got["image_f1max"][r] == pytest.approx(f1_max(s, y), abs=1e-12)


def test_resampling_is_stratified_by_label() -> None:
    labels = np.array([0] * 7 + [1] * 3)
    counts = _stratified_counts(np.random.default_rng(0), labels, 500)
    assert (counts[:, labels == 0].sum(axis=1) == 7).all() and (counts[:, labels == 1].sum(axis=1) == 3).all()
    assert counts.max() > 1 and (counts == 0).any()  # with replacement: some drawn twice, some left out


def test_interval_brackets_the_class_mean_and_is_seeded() -> None:
    table = scores_table(1.0)
    intervals = bootstrap_intervals(table, replicates=400, seed=1)
    for metric, function in (("image_auroc", auroc), ("image_ap", average_precision), ("image_f1max", f1_max)):
        expected = np.mean([function(g.score.to_numpy(), g.label.to_numpy()) for _, g in table.groupby("category")])
        interval = intervals[metric]
        assert interval.estimate == pytest.approx(expected)
        assert interval.low < interval.estimate < interval.high
        assert interval.high - interval.low > 0.02
    assert bootstrap_intervals(table, replicates=400, seed=1) == intervals
    assert bootstrap_intervals(table, replicates=400, seed=2)["image_auroc"] != intervals["image_auroc"]


def test_interval_narrows_with_more_images_and_collapses_on_perfect_separation() -> None:
    small = bootstrap_intervals(scores_table(1.0, 15, 15), replicates=300)["image_auroc"]
    large = bootstrap_intervals(scores_table(1.0, 240, 240), replicates=300)["image_auroc"]
    assert (large.high - large.low) < 0.5 * (small.high - small.low)
    perfect = bootstrap_intervals(scores_table(50.0), replicates=100)["image_auroc"]
    assert (perfect.low, perfect.estimate, perfect.high) == (1.0, 1.0, 1.0)


def test_interval_coverage_is_close_to_nominal() -> None:
    # Normal scores with unit variance shifted by d have a true AUROC of Phi(d / sqrt(2)).
    truth = norm.cdf(1.0 / math.sqrt(2))
    covered = 0
    trials = 150
    for trial in range(trials):
        table = scores_table(1.0, 40, 40, categories="a", seed=100 + trial)
        interval = bootstrap_intervals(table, ("image_auroc",), replicates=300, seed=trial)["image_auroc"]
        covered += interval.low <= truth <= interval.high
    assert 0.88 <= covered / trials <= 0.99


def test_paired_test_of_a_run_with_itself() -> None:
    table = scores_table(1.0)
    result = paired_test(table, table, replicates=200)
    assert result.difference == 0 and (result.low, result.high) == (0, 0)
    assert result.p_value == 1.0 and not result.significant()
    assert result.images == len(table) and result.categories == 3


def test_paired_test_separates_a_better_method_and_is_antisymmetric() -> None:
    good, weak = scores_table(2.0, seed=0), scores_table(0.3, seed=1)
    weak["image"] = good["image"]  # same images, labels in the same order
    result = paired_test(good, weak, replicates=500)
    assert result.difference > 0.2 and result.low > 0 and result.p_value < 0.01 and result.significant()
    reverse = paired_test(weak, good, replicates=500)
    assert reverse.difference == pytest.approx(-result.difference)
    assert reverse.high < 0 and reverse.p_value == pytest.approx(result.p_value)


def test_paired_test_keeps_the_pairing() -> None:
    # Two runs whose scores differ by a tiny per-image perturbation are far more alike than two independent runs of
    # the same quality; the paired interval must reflect that (an unpaired bootstrap would be ~10x wider).
    base = scores_table(1.0)
    near = base.assign(score=base.score + np.random.default_rng(5).normal(0, 0.05, len(base)))
    result = paired_test(base, near, replicates=300)
    assert result.high - result.low < 0.03


def test_images_are_matched_by_path_tail_across_machines() -> None:
    a = scores_table(1.0, root="/home/alice/mvtec")
    b = scores_table(0.5, seed=3, root="/mnt/data/mvtec").sample(frac=1.0, random_state=0)  # shuffled
    joined = align_scores(a, b)
    assert len(joined) == len(a)
    assert paired_test(a, b, replicates=50).images == len(a)


def test_paired_test_refuses_different_image_sets() -> None:
    a = scores_table(1.0)
    b = a.drop(index=[0, 1])
    with pytest.raises(ValueError, match="did not score the same images.*2 only in the first run"):
        paired_test(a, b, replicates=10)
    c = a.copy()
    c.loc[0, "label"] = 1
    with pytest.raises(ValueError, match="has label 0 in the first run and 1 in the second"):
        paired_test(a, c, replicates=10)


def test_bad_score_tables_are_named() -> None:
    table = scores_table(1.0)
    with pytest.raises(ValueError, match="missing \\['score'\\]"):
        bootstrap_intervals(table.drop(columns="score"))
    with pytest.raises(ValueError, match="image scores are missing"):
        bootstrap_intervals(table.assign(score=np.nan))
    with pytest.raises(ValueError, match="confidence level"):
        bootstrap_intervals(table, level=95)
    with pytest.raises(ValueError, match="not 'pixel_auroc'"):
        paired_test(table, table, metric="pixel_auroc")
