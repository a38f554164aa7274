"""Image preprocessing shared by the CLIP-based methods: PIL bicubic squash to S×S, then OpenAI mean/std.

All five references resize the PIL image to (S, S) with bicubic interpolation (aspect ratio not kept; the center crop
that follows is a no-op), convert to a float tensor in [0, 1] and normalise with the OpenAI CLIP statistics.
anomalib's WinCLIP resizes tensors instead (antialiased bicubic, ~1e-2 different); zsadbench uses the PIL resize of
the benchmark references (zqhang's WinCLIP, AnomalyCLIP, MuSc, AdaptCLIP).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}


class ClipTransform:
    """Callable: RGB PIL image -> (3, S, S) float tensor (squash resize, [0, 1], mean/std normalisation)."""

    def __init__(self, size: int | tuple[int, int], mean: tuple[float, ...] = OPENAI_MEAN,
                 std: tuple[float, ...] = OPENAI_STD, interpolation: str = "bicubic") -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        self.interpolation = interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        """Returns the normalised (3, H, W) tensor of ``image`` resized to the transform's size."""
        height, width = self.size
        if image.size != (width, height):
            image = image.resize((width, height), _RESAMPLE[self.interpolation])
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        return (pixels.float().div(255.0) - self.mean) / self.std

    def __repr__(self) -> str:
        return f"ClipTransform(size={self.size}, interpolation={self.interpolation!r})"
