"""Bootstrap intervals of the image metrics: the vectorised replicates against a loop over zsadbench.metrics.

An MVTec-AD-sized run (15 categories x 115 test images, about a third anomalous, scores with ties) with 1000
replicates. The reference resamples every category explicitly and calls auroc / average_precision / f1_max per
replicate, which is what a straightforward implementation does; both give the same numbers (checked here).
Target: the vectorised path at least 10x faster. Prints medians over repeats.

    python benchmarks/bench_bootstrap.py [--replicates 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from zsadbench.metrics import auroc, average_precision, f1_max
from zsadbench.uncertainty import _stratified_counts, bootstrap_intervals


def make_scores(categories: int = 15, images: int = 115, seed: int = 0) -> pd.DataFrame:
    """Returns a scores.csv-like table of an MVTec-sized run."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(categories):
        labels = (rng.random(images) < 0.35).astype(int)
        scores = np.round(rng.normal(size=images) + 1.5 * labels, 2)
        rows += [(f"cat{c:02d}", f"/d/cat{c:02d}/test/x/{i:03d}.png", int(y), float(s))
                 for i, (y, s) in enumerate(zip(labels, scores))]
    return pd.DataFrame(rows, columns=["category", "image", "label", "score"])


def loop_reference(table: pd.DataFrame, replicates: int, seed: int) -> dict[str, tuple[float, float]]:
    """Returns the same intervals, computed one replicate at a time with zsadbench.metrics."""
    rng = np.random.default_rng(seed)
    totals = {m: np.zeros(replicates) for m in ("image_auroc", "image_ap", "image_f1max")}
    groups = list(table.groupby("category", sort=True))
    for _, group in groups:
        scores, labels = group.score.to_numpy(), group.label.to_numpy()
        counts = _stratified_counts(rng, labels, replicates)
        for r in range(replicates):
            s, y = np.repeat(scores, counts[r]), np.repeat(labels, counts[r])
            totals["image_auroc"][r] += auroc(s, y)
            totals["image_ap"][r] += average_precision(s, y)
            totals["image_f1max"][r] += f1_max(s, y)
    return {m: tuple(np.percentile(v / len(groups), [2.5, 97.5])) for m, v in totals.items()}


def main() -> None:
    """Prints the median times and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    table = make_scores()
    fast = bootstrap_intervals(table, replicates=args.replicates, seed=0)
    slow = loop_reference(table, args.replicates, 0)
    for metric, (low, high) in slow.items():
        assert abs(fast[metric].low - low) < 1e-12 and abs(fast[metric].high - high) < 1e-12, metric
    vectorised, loop = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        bootstrap_intervals(table, replicates=args.replicates, seed=0)
        vectorised.append(time.perf_counter() - start)
        start = time.perf_counter()
        loop_reference(table, args.replicates, 0)
        loop.append(time.perf_counter() - start)
    v, r = statistics.median(vectorised), statistics.median(loop)
    print(f"bootstrap of 3 image metrics, {len(table)} images in 15 categories, {args.replicates} replicates "
          f"(median of {args.repeats}):")
    print(f"  vectorised {v * 1000:8.1f} ms   loop over zsadbench.metrics {r * 1000:8.1f} ms   "
          f"speed-up {r / v:5.1f}x (target >= 10x) {'OK' if r / v >= 10 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
