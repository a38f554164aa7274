"""Seeded random CLIP weights and synthetic images for tests, parity checks and benchmarks (no network).

open_clip's own initialisation hides several bugs: LayerNorms are identity, attention biases are zero, and
exp(logit_scale) equals 1/0.07, the fixed temperature the methods use. :func:`clip_like_state_dict` perturbs those so a
dropped LayerNorm affine, a missing q/k/v or output bias, or the wrong temperature changes the numbers.

Random towers are useless for *learning* tests: their patch features are dominated by the random positional embedding
and deep random mixing, and share no common component, so a trained text prompt cannot separate defects from
background (the prompt scorer ``softmax(cos / 0.07)`` has no intercept of its own). :func:`appearance_state_dict`
makes a seeded random tower CLIP-like in exactly those two respects, so that tests of trainable methods measure a real
learning signal.
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


def appearance_state_dict(model: str, seed: int = 0, residual_scale: float = 0.1,
                          common_component: float = 1.0) -> dict[str, Tensor]:
    """Returns a seeded random state dict whose patch features encode local appearance (for learning tests).

    The patch embedding averages each patch's colour through a random 3 -> width map (texture and position do not
    drown the colour of a defect), the positional embedding is zero, the vision blocks' residual branches are damped by
    ``residual_scale`` (features stay close to the patch embedding, as in early CLIP layers), and ``ln_post`` gets a
    random bias of scale ``common_component``: the shared direction that pretrained CLIP features have and that the
    prompt scorer uses as its intercept. The text tower is open_clip's random one.
    """
    state = {k: v.detach().clone() for k, v in load_clip(model, "random", seed=seed).model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 2_000_003)
    conv = state["visual.conv1.weight"]
    colour_map = torch.randn(conv.shape[0], conv.shape[1], 1, 1, generator=generator)
    state["visual.conv1.weight"] = (colour_map / (conv.shape[2] * conv.shape[3])).expand_as(conv).clone()
    state["visual.positional_embedding"] = torch.zeros_like(state["visual.positional_embedding"])
    for key in state:
        if key.startswith("visual.") and key.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
            state[key] = state[key] * residual_scale
    bias = state["visual.ln_post.bias"]
    state["visual.ln_post.bias"] = common_component * torch.randn(bias.shape, generator=generator)
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
