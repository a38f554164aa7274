"""Focal and Dice losses on probabilities, and the scipy-style Gaussian filter (half-sample-symmetric boundary)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from zsadbench.filters import gaussian_filter, gaussian_kernel1d, symmetric_indices
from zsadbench.losses import binary_dice_loss, focal_loss


def test_focal_loss_is_the_reference_formula_on_probabilities() -> None:
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(2, 2, 5, 7, generator=generator).softmax(dim=1)
    target = (torch.rand(2, 5, 7, generator=generator) > 0.7).long()
    # per pixel, by hand: clamp the one-hot target to [1e-5, 1 - 1e-5], p_t = Σ t·p + 1e-5, -(1 - p_t)² log p_t
    p = probabilities.permute(0, 2, 3, 1).reshape(-1, 2).double().numpy()
    t = np.clip(np.eye(2)[target.reshape(-1).numpy()], 1e-5, 1 - 1e-5)
    p_t = (t * p).sum(1) + 1e-5
    expected = float(np.mean(-((1 - p_t) ** 2) * np.log(p_t)))
    assert focal_loss(probabilities, target).item() == pytest.approx(expected, rel=1e-6)
    # a (B, 1, H, W) target and a float {0, 1} mask mean the same
    assert focal_loss(probabilities, target[:, None].float()).item() == pytest.approx(expected, rel=1e-6)
    # no softmax inside: feeding logits gives a different value
    assert focal_loss(probabilities.log(), target).item() != pytest.approx(expected, rel=1e-3)


def test_focal_loss_rejects_a_target_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        focal_loss(torch.rand(2, 2, 4, 4), torch.zeros(2, 5, 5))


def test_binary_dice_loss_values() -> None:
    mask = torch.zeros(2, 4, 4)
    mask[0, :2] = 1
    assert binary_dice_loss(mask, mask).item() == pytest.approx(0.0, abs=1e-7)
    prediction = torch.full((2, 4, 4), 0.25)
    # per sample (2Σxy + 1) / (Σx + Σy + 1), then 1 - batch mean
    d0 = (2 * 0.25 * 8 + 1) / (0.25 * 16 + 8 + 1)
    d1 = (0 + 1) / (0.25 * 16 + 0 + 1)
    assert binary_dice_loss(prediction, mask).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)


@pytest.mark.parametrize("shape", [(3, 64, 48), (2, 7, 5), (1, 1, 1), (40, 33)])
def test_gaussian_filter_matches_scipy(shape: tuple[int, ...]) -> None:
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    ours = gaussian_filter(maps, sigma=4.0)
    flat = maps.reshape(-1, *shape[-2:]).numpy()
    expected = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in flat]).reshape(shape)
    assert ours.shape == maps.shape
    assert np.abs(ours.numpy() - expected).max() < 1e-6


def test_gaussian_boundary_repeats_the_edge_sample() -> None:
    assert symmetric_indices(4, 3).tolist() == [2, 1, 0, 0, 1, 2, 3, 3, 2, 1]
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 33 and kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    # torch's reflect padding (edge not repeated) differs from scipy at the border: the guard the filter exists for
    maps = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    padded = F.pad(maps, (16, 16, 16, 16), mode="reflect")
    naive = F.conv2d(F.conv2d(padded, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))[0, 0]
    expected = torch.from_numpy(ndimage.gaussian_filter(maps[0, 0].numpy(), sigma=4))
    assert (naive - expected).abs().max() > 1e-4
    assert (gaussian_filter(maps[0, 0]) - expected).abs().max() < 1e-6
