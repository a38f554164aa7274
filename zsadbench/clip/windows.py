"""Window embeddings (WinCLIP): every k×k window of patch tokens re-run through the whole ViT on its own.

A window's sequence is [CLS (+ its positional embedding), the window's k² patch tokens (+ their own positional
embeddings)] taken from the full image's embedded tokens before ``ln_pre``; it attends only within itself. All windows
of all scales and the full image go through the tower in one packed pass (:func:`zsadbench.clip.vision.forward_packed`),
and the last block computes only the CLS rows that are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from zsadbench.clip.backbone import VisionTower
from zsadbench.clip.vision import embed_patches, forward_packed, project_each, project_tokens


def window_indices(grid: tuple[int, int], kernel: int, stride: int = 1) -> Tensor:
    """Returns (n_windows, kernel²) row-major patch indices of every kernel×kernel window (windows row-major)."""
    height, width = grid
    if kernel > min(height, width) or kernel < 1:
        raise ValueError(f"window size {kernel} does not fit the {height}x{width} patch grid")
    index = torch.arange(height * width).reshape(height, width)
    windows = index.unfold(0, kernel, stride).unfold(1, kernel, stride)  # (rows, cols, k, k)
    return windows.reshape(-1, kernel * kernel).contiguous()


def window_incidence(windows: Tensor, num_patches: int) -> Tensor:
    """Returns the (num_patches, n_windows) 0/1 matrix whose entry (p, w) says that window w covers patch p."""
    incidence = torch.zeros(num_patches, windows.shape[0])
    incidence.scatter_(0, windows.T.long(), 1.0)
    return incidence


def harmonic_aggregation(window_scores: Tensor, incidence: Tensor) -> Tensor:
    """Returns (B, P) per-patch harmonic means of the (B, n_windows) scores of the windows covering each patch.

    M = n ⊘ (I · (1/a)) with the incidence matrix I and n = I·1. A window scoring exactly 0 makes the patches it
    covers 0 (the harmonic mean's limit, and anomalib's ``nan_to_num(posinf=0)`` result) instead of the 0·inf = NaN a
    plain product would give.
    """
    incidence = incidence.to(window_scores.dtype)
    counts = incidence.sum(dim=1)
    zero = window_scores == 0
    inverse = torch.where(zero, torch.zeros_like(window_scores), 1.0 / window_scores)
    result = counts / (inverse @ incidence.T)
    if zero.any():
        result = torch.where((zero.to(incidence.dtype) @ incidence.T) > 0, torch.zeros_like(result), result)
    return result


@dataclass
class WindowEmbeddings:
    """What :func:`encode_windows` returns for a batch of B images."""

    image: Tensor  # (B, E): full-image embedding, ln_post(CLS) @ proj (open_clip's encode_image)
    windows: list[Tensor]  # per window set: (B, n_windows, E)
    patch_tokens: Tensor | None  # (B, P, D): ln_post'd final patch tokens, no projection (WinCLIP+ memory)


def encode_windows(visual: VisionTower, images: Tensor, windows: Sequence[Tensor],
                   patch_tokens: bool = False) -> WindowEmbeddings:
    """Returns the full-image embedding and the embedding of every window in ``windows`` for each image.

    ``windows`` = window index sets as from :func:`window_indices` (patch indices, row-major). With ``patch_tokens``
    the full image's final patch tokens after ``ln_post`` are returned too.
    """
    tokens = visual.ln_pre(embed_patches(visual, images))  # token-wise: once per image, windows reuse the rows
    batch, length, dim = tokens.shape
    pool = tokens.reshape(-1, dim)
    starts = torch.arange(batch, device=tokens.device)[:, None, None] * length  # first pool row of each image
    groups: list[tuple[Tensor, bool]] = [(torch.arange(batch * length, device=tokens.device).reshape(batch, length),
                                          patch_tokens)]
    for window in windows:
        window = window.to(tokens.device).long()
        index = torch.cat([torch.zeros_like(window[:, :1]), window + 1], dim=1)  # (n_w, 1 + k²): CLS first
        groups.append(((starts + index).reshape(-1, index.shape[1]), False))
    outputs = forward_packed(visual, pool, groups)
    full = outputs[0]
    # projected one image at a time: the same bits whatever batch an image came in (zsadbench.feature_cache)
    image = project_each(visual, full[:, 0])
    per_window = [torch.stack([project_tokens(visual, cls) for cls in out[:, 0].reshape(batch, -1, dim)])
                  for out in outputs[1:]]
    patches = visual.ln_post(full[:, 1:]) if patch_tokens else None
    return WindowEmbeddings(image, per_window, patches)
