"""DINO and DINOv2 vision transformers through timm: weights from a local file, a timm tag or a seeded random init.

DINO: M. Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021,
https://arxiv.org/abs/2104.14294 (facebookresearch/dino). DINOv2: M. Oquab et al., "DINOv2: Learning Robust Visual
Features without Supervision", TMLR 2024, https://arxiv.org/abs/2304.07193 (facebookresearch/dinov2).

timm's ``vit_*_dino`` / ``vit_*_dinov2`` models are the official architectures, and timm's checkpoint filter reads the
official release files (``dino_vitbase16_pretrain.pth``, ``dinov2_vitl14_pretrain.pth``) as well as timm's own. The
official code runs other input sizes by resizing the positional-embedding grid on the fly with bicubic interpolation
at scale factor (g + 0.1) / g0 and no antialias; timm resizes by output size with antialias. :func:`load_dino`
therefore resizes the grid once, with the official rule (:func:`resize_pos_embed_dino`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor

# the reference names (MuSc, facebookresearch hub entries) of the timm models
DINO_ALIASES = {
    "dino_vitbase16": "vit_base_patch16_224.dino",
    "dino_vitbase8": "vit_base_patch8_224.dino",
    "dino_deitsmall16": "vit_small_patch16_224.dino",
    "dino_deitsmall8": "vit_small_patch8_224.dino",
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
}
# tiny test configurations: the real depth and patch size, width 32. DINOv2's LayerScale starts at 1.0 as in the
# official hub constructors (timm's 1e-5 is a training init): at 1e-5 a random model's blocks add almost nothing, every
# image gets the same CLS token up to float noise, and MuSc's RsCIN top-k over those ties differs between machines
TINY_DINO: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-dino_vitbase16": ("vit_base_patch16_224.dino", {"embed_dim": 32, "num_heads": 2}),
    "tiny-dinov2_vitl14": ("vit_large_patch14_dinov2.lvd142m", {"embed_dim": 32, "num_heads": 2, "init_values": 1.0}),
    "tiny-dinov2_vits14": ("vit_small_patch14_dinov2.lvd142m", {"embed_dim": 32, "num_heads": 2, "init_values": 1.0}),
}
DINO_OFFSET = 0.1  # facebookresearch/dino issue #8: keeps the interpolated grid size from rounding down


def is_dino(name: str) -> bool:
    """Returns True when ``name`` is a DINO / DINOv2 backbone (reference alias, tiny test config or timm name)."""
    return name in DINO_ALIASES or name in TINY_DINO or (name.startswith("vit_") and ".dino" in name)


@dataclass
class DinoBackbone:
    """A loaded timm DINO / DINOv2 ViT (eval mode, fp32, classifier removed) and what was loaded into it."""

    model: Any  # timm VisionTransformer (typed loosely: its submodules are reached by attribute)
    name: str  # as requested
    timm_name: str
    pretrained: str
    image_size: int
    seed: int

    @property
    def grid_size(self) -> tuple[int, int]:
        """Returns the patch grid (rows, columns) at the loaded image size."""
        return tuple(self.model.patch_embed.grid_size)

    @property
    def depth(self) -> int:
        """Returns the number of transformer blocks."""
        return len(self.model.blocks)

    def describe(self) -> dict[str, str | int]:
        """Returns the backbone facts tracking records."""
        return {"backbone": self.name, "timm_model": self.timm_name, "pretrained": self.pretrained,
                "image_size": self.image_size, "pos_embed_mode": "bicubic-dino-offset"}

    def forward(self, images: Tensor, blocks: list[int]) -> tuple[list[Tensor], Tensor]:
        """Returns ([normed patch tokens (B, P, D) after each 0-based block], pooled image embedding (B, D)).

        Tokens are the block outputs passed through the final norm without the prefix (CLS) token, as the official
        ``get_intermediate_layers(..., norm=True)``; the embedding is the normed CLS token (the model's output).
        """
        final, tokens = self.model.forward_intermediates(images, indices=blocks, norm=True, output_fmt="NLC")
        return list(tokens), self.model.forward_head(final)


def resize_pos_embed_dino(pos_embed: Tensor, grid: tuple[int, int], prefix_tokens: int = 1) -> Tensor:
    """Returns the (1, prefix + h*w, D) positional embedding resized to ``grid`` with the official DINO rule.

    Bicubic, align_corners=False, no antialias, at scale factor (g + 0.1) / g0 per axis (which also sets the sampling
    positions, so it is not the same as resizing to g); the prefix rows are kept.
    """
    prefix, table = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    side = math.isqrt(table.shape[1])
    if side * side != table.shape[1]:
        raise ValueError(f"positional embedding of {table.shape[1]} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed.clone()
    image = table.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    scale = ((grid[0] + DINO_OFFSET) / side, (grid[1] + DINO_OFFSET) / side)
    image = F.interpolate(image, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(image.shape[-2:]) != tuple(grid):
        raise ValueError(f"DINO positional-embedding resize gave {tuple(image.shape[-2:])}, expected {grid}")
    table = image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, table], dim=1)


def load_dino(name: str, pretrained: str, image_size: int | None = None, seed: int = 0) -> DinoBackbone:
    """Returns the DINO / DINOv2 ``name`` with weights ``pretrained`` (local file, ``random`` or a timm tag).

    ``name``: a reference alias (``dinov2_vitl14``), a timm name (``vit_large_patch14_dinov2.lvd142m``) or a tiny test
    configuration (``tiny-dinov2_vitl14``). ``pretrained="timm"`` downloads timm's weights (network or the Hugging Face
    cache); a file path loads an official or timm checkpoint with no network. At another ``image_size`` than the
    native one the positional-embedding grid is resized with :func:`resize_pos_embed_dino`.
    """
    kwargs: dict[str, Any]
    if name in TINY_DINO:
        timm_name, kwargs = TINY_DINO[name]
    else:
        timm_name, kwargs = DINO_ALIASES.get(name, name), {}
    if not timm.is_model(timm_name.split(".")[0]):
        raise ValueError(f"unknown DINO backbone {name!r}; use one of {sorted(DINO_ALIASES)} or a timm "
                         "vit_*_dino / vit_*_dinov2 model name")
    kwargs = {**kwargs, "num_classes": 0}
    model: Any
    if pretrained in ("random", "none", ""):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
    elif pretrained == "timm":
        try:
            model = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as exc:  # hub / network errors come in many types
            raise FileNotFoundError(
                f"could not fetch timm weights for {timm_name} ({type(exc).__name__}: {exc}); offline, download the "
                f"official checkpoint and pass its path as pretrained=/path/to/file.pth") from exc
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"DINO weights file not found: {path} (pretrained={pretrained!r} for {name}); "
                                    "pass a local checkpoint, 'timm' (download) or 'random'")
        try:
            model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                      **kwargs)
        except RuntimeError as exc:
            raise ValueError(f"weights {path} do not fit {timm_name}: {exc}") from None
    native = int(model.patch_embed.img_size[0])
    size = int(image_size or native)
    if size != native:
        patch = int(model.patch_embed.patch_size[0])
        if size % patch:
            raise ValueError(f"image size {size} is not a multiple of {timm_name}'s patch size {patch}")
        native_table = model.pos_embed.detach().clone()
        model.set_input_size(img_size=(size, size))
        grid = (size // patch, size // patch)
        with torch.no_grad():
            model.pos_embed.copy_(resize_pos_embed_dino(native_table, grid, model.num_prefix_tokens))
    model = model.eval()
    model.requires_grad_(False)
    return DinoBackbone(model, name, timm_name, pretrained, size, seed)
