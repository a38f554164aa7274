"""Losses of the CLIP-based ZSAD methods.

Segmentation losses of AnomalyCLIP, AdaptCLIP and HeadCLIP, on probabilities: both follow zqhang/AnomalyCLIP
``loss.py`` (AdaptCLIP's ``loss.py`` is the same); the inputs are already softmax probabilities, so neither loss applies
a nonlinearity of its own. PromptAD's explicit anomaly margin: :func:`triplet_margin_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def focal_loss(probabilities: Tensor, target: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """Returns the mean focal loss of class probabilities (B, C, ...) against integer labels (B, ...) or (B, 1, ...).

    Per pixel: the one-hot target is clamped to [smooth / (C - 1), 1 - smooth], p_t = Σ_c target_c · p_c + smooth,
    loss = -(1 - p_t)^gamma · log p_t (class weights alpha = 1); the mean runs over every pixel of the batch.
    """
    num_classes = probabilities.shape[1]
    if target.dim() == probabilities.dim():
        target = target.squeeze(1)
    if target.shape != probabilities.shape[:1] + probabilities.shape[2:]:
        raise ValueError(f"focal_loss: target of shape {tuple(target.shape)} does not fit probabilities "
                         f"{tuple(probabilities.shape)}")
    probs = probabilities.flatten(2).transpose(1, 2).reshape(-1, num_classes)
    one_hot = torch.nn.functional.one_hot(target.reshape(-1).long(), num_classes).to(probs.dtype)
    one_hot = one_hot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    p_t = (one_hot * probs).sum(1) + smooth
    return (-((1 - p_t) ** gamma) * p_t.log()).mean()


def binary_dice_loss(prediction: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Returns 1 - the batch mean of per-sample Dice coefficients (2Σxy + s) / (Σx + Σy + s) of (B, ...) tensors."""
    batch = target.shape[0]
    x = prediction.reshape(batch, -1)
    y = target.reshape(batch, -1).to(x.dtype)
    dice = (2 * (x * y).sum(1) + smooth) / (x.sum(1) + y.sum(1) + smooth)
    return 1 - dice.sum() / batch


def triplet_margin_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 0.0) -> Tensor:
    """Returns mean(relu(Σ_dim1 (a - p)² - Σ_dim1 (a - n)² + margin)), PromptAD's ``TripletLoss`` (squared distances).

    The sums run over dimension 1 as in the reference: the feature axis for (B, E) anchors, but the *patch* axis for
    (B, P, E) anchors (PromptAD's segmentation prompts), where the hinge then applies per feature channel. Kept as the
    reference computes it. ``positive`` and ``negative`` broadcast against ``anchor``.
    """
    positive_distance = (anchor - positive).pow(2).sum(dim=1)
    negative_distance = (anchor - negative).pow(2).sum(dim=1)
    return torch.relu(positive_distance - negative_distance + margin).mean()
