"""Image filters the methods apply to anomaly maps, computed in torch with the numerics of their scipy originals.

AnomalyCLIP, AdaptCLIP and HeadCLIP smooth each 518x518 map with ``scipy.ndimage.gaussian_filter(map, sigma=4)``:
mode ``reflect`` (half-sample symmetric: ``d c b a | a b c d | d c b a``, the edge sample repeated), ``truncate=4``
(radius 16, 33 taps), separable. torch's ``F.pad(mode="reflect")`` does not repeat the edge sample, so the padding is
built here from explicit indices; the result matches scipy to float32 rounding, batched and on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    """Returns scipy's normalised 1-D Gaussian taps, radius ``int(truncate * sigma + 0.5)`` (computed in float64)."""
    if sigma <= 0:
        raise ValueError(f"gaussian sigma must be positive, got {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / (float(sigma) ** 2) * x * x)
    return (phi / phi.sum()).to(dtype=dtype, device=device)


def symmetric_indices(size: int, radius: int, device: torch.device | str | None = None) -> Tensor:
    """Returns the source indices of a length-``size`` axis padded by ``radius`` with scipy's ``reflect`` rule."""
    index = torch.arange(-radius, size + radius, device=device)
    period = 2 * size
    index = torch.remainder(index, period)  # the half-sample-symmetric extension repeats with period 2 * size
    return torch.where(index >= size, period - 1 - index, index)


def gaussian_filter(maps: Tensor, sigma: float = 4.0, truncate: float = 4.0) -> Tensor:
    """Returns ``maps`` (..., H, W) smoothed like ``scipy.ndimage.gaussian_filter(m, sigma)`` on each 2-D map."""
    if maps.dim() < 2:
        raise ValueError(f"gaussian_filter needs (..., H, W) maps, got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        maps = maps.float()
    lead, (height, width) = maps.shape[:-2], maps.shape[-2:]
    kernel = gaussian_kernel1d(sigma, truncate, maps.dtype, maps.device)
    radius = (kernel.numel() - 1) // 2
    x = maps.reshape(-1, 1, height, width)
    # scipy filters axis 0 (rows) first, then axis 1
    x = x.index_select(2, symmetric_indices(height, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = x.index_select(3, symmetric_indices(width, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.reshape(*lead, height, width)

