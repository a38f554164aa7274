"""Scoring CLIP features against a [normal, abnormal] text pair: AnomalyCLIP's, AdaptCLIP's and HeadCLIP's recipe.

Probabilities are softmax(cos / temperature) over the two classes (a fixed temperature, 0.07 in the references, not
CLIP's learned logit scale); patch maps drop the CLS token and upsample the **probabilities** (not the logits)
bilinearly, align_corners False.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def class_probabilities(features: Tensor, text_features: Tensor, temperature: float) -> Tensor:
    """Returns softmax over [normal, abnormal] of cos(features, text) / temperature, for (..., E) features."""
    cosine = F.normalize(features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return (cosine / temperature).softmax(dim=-1)


def patch_probability_maps(patch_features: Tensor, text_features: Tensor, temperature: float,
                           size: tuple[int, int]) -> Tensor:
    """Returns (B, 2, H, W) [normal, abnormal] probabilities of the patch tokens, bilinearly upsampled to ``size``.

    ``patch_features`` (B, 1 + P, E) include the CLS token, which is dropped; P must be a square grid.
    """
    probabilities = class_probabilities(patch_features[:, 1:], text_features, temperature)
    batch, patches, _ = probabilities.shape
    side = int(patches ** 0.5)
    if side * side != patches:
        raise ValueError(f"{patches} patch tokens do not form a square grid")
    grid = probabilities.reshape(batch, side, side, 2).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
