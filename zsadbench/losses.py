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


def balanced_focal_loss(probabilities: Tensor, target: Tensor, gamma: float = 2.0, eps: float = 1e-8) -> Tensor:
    """Returns Bayes-PFL's focal loss: the mean over foreground pixels plus the mean over background pixels.

    ``probabilities`` (B, 2, H, W) [normal, abnormal], ``target`` (B, H, W) in {0, 1}. Per pixel
    -(1 - p_t)^gamma log(p_t + eps) with p_t the probability of the true class (no label smoothing); the foreground
    and background sums are each divided by their pixel count (+ eps), so an all-normal batch adds 0 for the
    foreground (xiaozhen228/Bayes-PFL ``loss.py`` FocalLoss).
    """
    one_hot = torch.nn.functional.one_hot(target.long(), num_classes=2).permute(0, 3, 1, 2).to(probabilities.dtype)
    p_t = (probabilities * one_hot).sum(dim=1)
    loss = -((1 - p_t) ** gamma) * torch.log(p_t + eps)
    foreground = (target > 0).to(loss.dtype)
    background = 1 - foreground
    return (loss * foreground).sum() / (foreground.sum() + eps) + (loss * background).sum() / (background.sum() + eps)


def foreground_dice_loss(probabilities: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Returns 1 - (2 Σ p_abn·gt + s) / (Σ p_abn + Σ gt + s) over the whole batch (Bayes-PFL's DiceLoss, abnormal only).

    ``probabilities`` (B, 2, H, W), ``target`` (B, H, W); one Dice over all pixels of the batch, not per image.
    """
    abnormal, target = probabilities[:, 1], target.to(probabilities.dtype)
    intersection = torch.sum(abnormal * target)
    return 1 - (2 * intersection + smooth) / (torch.sum(abnormal) + torch.sum(target) + smooth)
