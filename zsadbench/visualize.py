"""Anomaly-map overlays: the image, its map as a heat map over it, and the ground-truth outline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zsadbench.data import read_image


def save_overlay(image_path: str | Path, anomaly_map: np.ndarray, mask: np.ndarray | None, out: Path,
                 title: str = "") -> Path:
    """Writes a three-panel PNG (image | map over image | mask outline) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = anomaly_map.shape
    image = np.asarray(read_image(image_path).resize((width, height)))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), constrained_layout=True)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image)
    heat = axes[1].imshow(anomaly_map, cmap="jet", alpha=0.5)
    axes[1].set_title("anomaly map", fontsize=9)
    fig.colorbar(heat, ax=axes[1], fraction=0.046)
    axes[2].imshow(anomaly_map, cmap="jet")
    if mask is not None and mask.any():
        axes[2].contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1)
    axes[2].set_title("map + ground truth", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
