"""Seeded random CLIP weights and synthetic images for tests, parity checks and benchmarks (no network).

open_clip's own initialisation hides several bugs: LayerNorms are identity, attention biases are zero, and
exp(logit_scale) equals 1/0.07, the fixed temperature the methods use. :func:`clip_like_state_dict` perturbs those so a
dropped LayerNorm affine, a missing q/k/v or output bias, or the wrong temperature changes the numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zsadbench.clip.backbone import load_clip


def clip_like_state_dict(model: str, seed: int = 0, qk_gain: float = 2.0) -> dict[str, Tensor]:
    """Returns a seeded random state dict of ``model`` with non-trivial LayerNorms, biases and logit scale."""
    state = {k: v.detach().clone() for k, v in load_clip(model, "random", seed=seed).model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    vision_width = state["visual.conv1.weight"].shape[0]
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in ("ln_1", "ln_2", "ln_pre", "ln_post", "ln_final"):
            if parts[-1] == "weight":
                state[key] = 1.0 + 0.1 * torch.randn(value.shape, generator=generator)
            else:
                state[key] = 0.05 * torch.randn(value.shape, generator=generator)
        elif key.endswith("attn.in_proj_bias"):
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
        elif key.endswith("attn.out_proj.bias"):
            state[key] = 0.02 * torch.randn(value.shape, generator=generator)
        elif key.startswith("visual.") and key.endswith("attn.in_proj_weight"):
            value = value.clone()
            value[: 2 * vision_width] *= qk_gain  # sharper attention: not near-uniform over the tokens
            state[key] = value
    state["logit_scale"] = torch.tensor(math.log(100.0))
    return state


def save_state_dict(state: dict[str, Tensor], path: str | Path) -> Path:
    """Writes ``state`` as a plain torch state dict file and returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def synthetic_images(count: int, height: int = 256, width: int = 288, seed: int = 0,
                     anomalous: tuple[int, ...] = ()) -> list[Image.Image]:
    """Returns ``count`` deterministic RGB images: textured background, an ellipse, a red blob on ``anomalous``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = 0.55 + 0.25 * np.sin(2 * np.pi * xx / 53.0) * np.cos(2 * np.pi * yy / 71.0)
    images = []
    for i in range(count):
        image = np.stack([background * c for c in (0.9, 0.85, 0.8)], axis=-1)
        cy, cx = height / 2 + rng.normal() * 4, width / 2 + rng.normal() * 4
        inside = ((yy - cy) / (0.32 * height)) ** 2 + ((xx - cx) / (0.30 * width)) ** 2 <= 1.0
        image[inside] = (0.35, 0.45, 0.7)
        if i in anomalous:
            dy, dx = cy + rng.integers(-height // 6, height // 6), cx + rng.integers(-width // 6, width // 6)
            blob = ((yy - dy) / rng.integers(8, 20)) ** 2 + ((xx - dx) / rng.integers(8, 20)) ** 2 <= 1.0
            image[blob] = (0.85, 0.2, 0.1)
        image = image + 0.02 * rng.normal(size=image.shape).astype(np.float32)
        images.append(Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)))
    return images
