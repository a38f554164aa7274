"""Scoring CLIP features against text features, written once for every CLIP method: logits at a fixed temperature,
[normal, abnormal] probabilities, patch probability maps, and the harmonic mean the fusions use.

AnomalyCLIP's, AdaptCLIP's and HeadCLIP's recipe (:func:`patch_probability_maps`): probabilities are
softmax(cos / temperature) over the two classes (a fixed temperature, 0.07 in the references, not CLIP's learned logit
scale); patch maps drop the CLS token and upsample the **probabilities** (not the logits) bilinearly, align_corners
False.

APRIL-GAN's recipe (:func:`upsampled_logit_probabilities`): the logits ``scale · cos`` (scale 100) are upsampled
bilinearly with align_corners True and the softmax over the two classes is taken per pixel **after** upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_logits(features: Tensor, text_features: Tensor, temperature: float) -> Tensor:
    """Returns cos(features, text) / temperature for (..., E) features and (C, E) text features: (..., C)."""
    cosine = F.normalize(features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return cosine / temperature


def class_probabilities(features: Tensor, text_features: Tensor, temperature: float) -> Tensor:
    """Returns softmax over [normal, abnormal] of cos(features, text) / temperature, for (..., E) features."""
    return class_logits(features, text_features, temperature).softmax(dim=-1)


def harmonic_mean(*tensors: Tensor) -> Tensor:
    """Returns the element-wise harmonic mean n / Σ 1/x (0 where an input is 0; NaN or inf: callers clean up)."""
    return len(tensors) / torch.stack([1.0 / t for t in tensors]).sum(dim=0)


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


def upsampled_logit_probabilities(patch_features: Tensor, text_features: Tensor, logit_scale: float,
                                  size: tuple[int, int], align_corners: bool = True) -> Tensor:
    """Returns (B, 2, H, W) softmax over [normal, abnormal] of the bilinearly upsampled logits ``scale · cos``.

    ``patch_features`` (B, P, E) hold patch tokens only (no CLS; P a square grid); ``text_features`` are (2, E) shared
    by the batch or (B, 2, E) per image. Both are L2-normalised here.
    """
    patches = F.normalize(patch_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = logit_scale * (patches @ text.transpose(-1, -2))
    batch, count, classes = logits.shape
    side = int(count ** 0.5)
    if side * side != count:
        raise ValueError(f"{count} patch tokens do not form a square grid")
    grid = logits.permute(0, 2, 1).reshape(batch, classes, side, side)
    upsampled = F.interpolate(grid, size=size, mode="bilinear", align_corners=align_corners)
    return upsampled.softmax(dim=1)
