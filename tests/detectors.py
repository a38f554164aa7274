"""Small detectors used only by the tests (not shipped as methods)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from zsadbench.detector import Detector, FewShot, ImageSet, TransductiveDetector
from zsadbench.types import Prediction


@dataclass
class ColourConfig:
    image_size: int = 64
    smoothing: int = 3  # box filter size applied to the distance map
    shots: int = 0
    reference_seed: int = 10


class ColourDistance(Detector, FewShot):
    """Anomaly map = distance of each pixel's colour to the image's (or the references') median colour."""

    Config = ColourConfig
    label = "Colour distance (test)"
    regression_variants = {"zero-shot": {"image_size": 32}, "1-shot": {"image_size": 32, "shots": 1}}
    calls: list[str] = []
    fail_once: set[str] = set()  # categories whose next prediction raises (simulates an interruption)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    def transform(self, image: Image.Image) -> Tensor:
        size = self.config.image_size
        array = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)

    def set_reference(self, images: Tensor, category: str) -> None:
        self.reference = images.flatten(2).median(dim=2).values.median(dim=0).values

    def predict(self, images: Tensor, category: str) -> Prediction:
        if category in self.fail_once:
            self.fail_once.discard(category)
            raise RuntimeError(f"simulated failure in {category}")
        type(self).calls.append(category)
        centre = images.flatten(2).median(dim=2).values
        if self.shots > 0:
            centre = self.reference.expand_as(centre)
        distance = (images - centre[:, :, None, None]).norm(dim=1, keepdim=True)
        k = self.config.smoothing
        smooth = F.avg_pool2d(distance, k, stride=1, padding=k // 2, count_include_pad=False)[:, 0]
        return Prediction(smooth.flatten(1).max(dim=1).values, smooth)


class MutualColour(TransductiveDetector):
    """Transductive test detector: a pixel's score is its colour distance to the set's median image."""

    Config = ColourConfig
    seen_sets: list[int] = []
    regression_variants = {"zero-shot": {"image_size": 32}}

    input_size = ColourDistance.input_size
    transform = ColourDistance.transform

    def predict_set(self, images: ImageSet, category: str) -> Prediction:
        batch = torch.cat(list(images.batches()))
        type(self).seen_sets.append(len(batch))
        distance = (batch - batch.median(dim=0).values).norm(dim=1)
        return Prediction(distance.flatten(1).max(dim=1).values, distance)
