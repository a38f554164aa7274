"""Patchstats: patch colour statistics, a simple but real zero-shot baseline (replace it with your method).

Each image is cut into patches; a patch's anomaly score is the distance of its mean colour to the image's median patch
colour (the image is its own reference, so no training and no normal images are needed), smoothed and upsampled to
the input size. The image score is the map's maximum.

Open this file with the paper (title, arXiv link), the reference implementation (owner/repo @ commit), a summary, and
the deliberate deviations from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from zsadbench import Detector, Prediction


@dataclass
class PatchstatsConfig:
    """Patchstats's settings (defaults = the reference's)."""

    image_size: int = 224  # input size; the anomaly maps come back at this size
    patch_size: int = 8  # side of the square patches whose mean colours are compared
    smoothing: int = 3  # box filter (odd side, in patches) over the patch-distance grid


class Patchstats(Detector):
    """Patch colour statistics: each patch's colour distance to the image's median patch."""

    Config = PatchstatsConfig
    label = "Patchstats"
    # `zsadbench check`: the tiny configurations guarded by the goldens in goldens/ (next to this module)
    regression_variants = {"zero-shot": {"image_size": 32, "patch_size": 4}}

    def __init__(self, config: PatchstatsConfig | None = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(config, seed=seed, **overrides)
        cfg = self.config
        if cfg.patch_size < 1 or cfg.image_size % cfg.patch_size:
            raise ValueError(f"patchstats: image_size {cfg.image_size} must be a multiple of patch_size "
                             f"{cfg.patch_size} (>= 1)")
        if cfg.smoothing < 1 or cfg.smoothing % 2 == 0:
            raise ValueError(f"patchstats: smoothing must be an odd number of patches >= 1, got {cfg.smoothing}")

    def transform(self, image: Image.Image) -> Tensor:
        """Returns the (3, S, S) float tensor in [0, 1] of an image resized to the input size."""
        size = self.config.image_size
        array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and anomaly maps (B, S, S) of a preprocessed batch."""
        expected = (3, *self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"patchstats: expected a batch of shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(images.shape)}")
        bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
        if bad.any():
            raise ValueError(f"patchstats: images {bad.nonzero().flatten().tolist()} of the batch hold NaN or inf")
        cfg = self.config
        patches = F.avg_pool2d(images.float(), cfg.patch_size)  # (B, 3, h, w) mean colour of each patch
        centre = patches.flatten(2).median(dim=2).values  # (B, 3) the image's median patch colour
        distance = (patches - centre[:, :, None, None]).norm(dim=1, keepdim=True)
        distance = F.avg_pool2d(distance, cfg.smoothing, stride=1, padding=cfg.smoothing // 2,
                                count_include_pad=False)
        maps = F.interpolate(distance, size=self.input_size, mode="bilinear", align_corners=False)[:, 0]
        return Prediction(maps.flatten(1).amax(dim=1), maps)
