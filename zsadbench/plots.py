"""Leaderboard figures (PNG, matplotlib): per-metric bar charts across methods and per-category heat maps."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def row_colours(count: int) -> list[tuple[float, float, float, float]]:
    """Returns one distinct colour per leaderboard row (the same order in every figure of a dataset)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def metric_bars(labels: Sequence[str], titles: Sequence[str], values: np.ndarray, path: Path, *, title: str = "",
                intervals: np.ndarray | None = None, reported: np.ndarray | None = None,
                reported_comparable: np.ndarray | None = None) -> Path:
    """Writes one bar chart per metric (bars = leaderboard rows, values in percent) and returns the PNG path.

    ``values`` is (rows, metrics) in [0, 1] (NaN = not available); ``intervals`` (rows, metrics, 2) draws error bars;
    ``reported`` (rows, metrics) marks a paper-reported value, filled when ``reported_comparable`` is true.
    """
    plt = _pyplot()
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows, metrics = values.shape
    ncols = min(metrics, 5)
    nrows = math.ceil(metrics / ncols)
    colours = row_colours(rows)
    width = max(2.6, 0.55 * rows + 1.0)
    legend_rows = math.ceil((rows + 3) / 2)  # rows plus up to three marker entries, two columns
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 2.7 * nrows + 0.2 * legend_rows),
                             squeeze=False)
    x = np.arange(rows)
    for m in range(nrows * ncols):
        ax = axes[m // ncols][m % ncols]
        if m >= metrics:
            ax.axis("off")
            continue
        heights = values[:, m] * 100
        ax.bar(x, np.nan_to_num(heights), color=colours, width=0.75, edgecolor="white", linewidth=0.5)
        if intervals is not None and not np.isnan(intervals[:, m]).all():
            low, high = intervals[:, m, 0] * 100, intervals[:, m, 1] * 100
            ok = ~np.isnan(low)
            ax.errorbar(x[ok], heights[ok], yerr=[heights[ok] - low[ok], high[ok] - heights[ok]], fmt="none",
                        ecolor="black", elinewidth=1, capsize=3)
        for i, h in enumerate(heights):
            ax.text(i, 1.5, "n/a" if np.isnan(h) else f"{h:.1f}", ha="center", va="bottom", fontsize=7.5,
                    rotation=90 if rows > 4 else 0, color="white" if not np.isnan(h) and h > 12 else "black",
                    fontweight="bold")
        if reported is not None:
            for i in range(rows):
                if not np.isnan(reported[i, m]):
                    filled = reported_comparable is None or bool(reported_comparable[i, m])
                    ax.plot(i, reported[i, m] * 100, marker="D", markersize=6, markeredgecolor="black",
                            markerfacecolor="black" if filled else "white", linestyle="none", zorder=5)
        ax.set_title(titles[m], fontsize=10, fontweight="bold")
        ax.set_ylim(0, 105)
        ax.set_xticks([])
        ax.set_yticks([0, 25, 50, 75, 100])
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    handles: list[Artist] = [Patch(facecolor=c, label=label) for c, label in zip(colours, labels)]
    if intervals is not None and not np.isnan(intervals).all():
        handles.append(Line2D([], [], color="black", marker="_", markersize=8, linestyle="none",
                              label="95 % bootstrap interval"))
    if reported is not None and not np.isnan(reported).all():
        handles.append(Line2D([], [], marker="D", markerfacecolor="black", markeredgecolor="black", linestyle="none",
                              label="paper-reported (same metric variant)"))
        if reported_comparable is not None and not reported_comparable[~np.isnan(reported)].all():
            handles.append(Line2D([], [], marker="D", markerfacecolor="white", markeredgecolor="black",
                                  linestyle="none", label="paper-reported (other / unconfirmed variant)"))
    top = 1 - (0.1 + 0.19 * math.ceil(len(handles) / 2)) / fig.get_figheight()
    fig.legend(handles=handles, loc="upper center", ncol=2, fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.1 / fig.get_figheight()))
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold", x=0.01, ha="left", y=1 - 0.05 / fig.get_figheight())
    fig.tight_layout(rect=(0, 0, 1, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def category_heatmap(labels: Sequence[str], categories: Sequence[str], values: np.ndarray, path: Path, *,
                     title: str = "") -> Path:
    """Writes a heat map of one metric (rows = leaderboard rows, columns = categories, values in [0, 1]) as PNG."""
    plt = _pyplot()
    rows, cols = values.shape
    shown = values * 100
    finite = shown[~np.isnan(shown)]
    low = float(np.floor(min(finite.min(), 95) / 5) * 5) if finite.size else 0.0
    wrapped = ["\n".join(textwrap.wrap(label, 42)) or label for label in labels]
    label_width = 0.075 * max(len(line) for label in wrapped for line in label.splitlines())
    fig, ax = plt.subplots(figsize=(label_width + 1.6 + 0.72 * cols, 1.3 + 0.42 * rows * max(
        1, max(w.count("\n") + 1 for w in wrapped) * 0.8)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=low, vmax=100, aspect="auto")
    for r in range(rows):
        for c in range(cols):
            value = shown[r, c]
            if np.isnan(value):
                ax.text(c, r, "–", ha="center", va="center", fontsize=8, color="#555555")
                continue
            level = (value - low) / max(100 - low, 1e-9)
            ax.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if level < 0.2 or level > 0.85 else "black")
    ax.set_xticks(range(cols), categories, rotation=35 if cols > 6 else 0, ha="right" if cols > 6 else "center",
                  fontsize=8.5)
    ax.set_yticks(range(rows), wrapped, fontsize=8.5)
    ax.set_xticks(np.arange(-0.5, cols), minor=True)
    ax.set_yticks(np.arange(-0.5, rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    if "mean" in categories:  # set the class mean apart from the categories
        ax.axvline(list(categories).index("mean") - 0.5, color="black", linewidth=1.5)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02).ax.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=11, fontweight="bold", loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
