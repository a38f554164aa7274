"""AnomalyDINO: few-shot anomaly detection by nearest-neighbour matching of DINOv2 patch features.

Paper: S. Damm, M. Laszkiewicz, J. Lederer, A. Fischer, "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection
with DINOv2", WACV 2025, https://arxiv.org/abs/2405.14529.
Reference implementation: dammsi/AnomalyDINO @ b3435f0 (Apache-2.0): ``src/backbones.py``, ``src/detection.py``,
``src/utils.py``, ``src/post_eval.py``, ``run_anomalydino.py``, ``run_anomalydino_batched.py``.

Training-free. Per category, the K normal reference images ("shots") fill a memory bank of patch features:

1. Features: the patch tokens of the last block of a DINOv2 ViT (``get_intermediate_layers(x)[0]``: final norm, no
   CLS token), ViT-S/14 at 448 px by default (sizes S/B/L/G, resolutions 224 / 448 / 672 in the paper).
2. Augmentation (preset ``agnostic``, the default): every reference image is also rotated by 45, 90, ..., 315
   degrees (OpenCV, about the image centre, bilinear, reflected border) before preprocessing: 8 images per shot.
3. Zero-shot masking (per category, as the reference's presets decide: MVTec AD capsule, hazelnut, pill, screw,
   toothbrush and every VisA category): the first principal component of an image's own patch features, > 10 is
   foreground (sign flipped when less than 35 % of the central crop would be kept), then a dilation and a closing.
   Masked-out test patches get distance 0. Reference images are not masked (``--mask_ref_images`` False).
4. Scoring: a test patch's distance is its cosine distance (1 - cosine similarity) to the nearest bank patch; the
   image score is the mean of the largest 1 % of the patch distances (the maximum below 100 patches).
5. Map: the patch distances upsampled bilinearly, then a Gaussian filter with sigma 4.

``anomalydino-batched`` is the reference's "batched zero-shot" mode (transductive): the test images of a category are
each other's references; a patch's distance is the mean of its distances to all other images' patches that are
smaller than the 0.1 % quantile (``run_anomalydino_batched.py``: ViT-S/14, 672 px, preset ``masking_only``).

Deliberate deviations from the reference (numerically equivalent unless stated):

- Images are squashed to ``image_size`` x ``image_size`` (the harness needs one input size per run); the reference
  resizes the shorter edge and keeps the aspect ratio, then crops to a multiple of 14. Identical for square images
  (MVTec AD); VisA's non-square images see a different aspect ratio. ``image_size`` must be a multiple of 14.
- Maps come back at the input size, smoothed there (sigma 4 at 448 px); the reference upsamples to each image's own
  size and smooths there (sigma 4 at e.g. 1024 px). ``--eval-resolution native`` then resizes our maps.
- Rotations: the exact path (:meth:`AnomalyDINO.set_reference_images`) rotates the raw images as the reference does.
  The harness's evaluator currently hands over preprocessed tensors (:meth:`AnomalyDINO.set_reference`); those are
  rotated after the resize, which moves the reference features slightly (see docs/methods/anomalydino.md).
- The PCA of the masking is an exact SVD in float64; the reference uses scikit-learn's randomized solver in float32
  (same component; patches within ~1e-5 of the threshold could fall differently). The sign convention is
  scikit-learn >= 1.5's (largest loading positive); the reference's dilation and closing run along the flattened
  (row-major) patch index, as its (P, 1) mask array makes OpenCV do, and so do ours.
- Nearest neighbours: blocked matrix products (:func:`zsadbench.patch_knn.largest_products`) instead of faiss's
  IndexFlatL2 on normalised features (faiss's ||a||^2 + ||b||^2 - 2ab rounds differently; ~1e-7).
- Batched mode with very small sets: the reference's k = int(0.001 M) is 0 (error) or 1 (NaN) below 2000 other
  patches; here k is at least 2 (the nearest distance). When ties leave no distance below the k-th one, the k-th
  distance is used (the reference divides 0 by 0). The image score takes the maximum below 100 patches as in the
  few-shot mode (the batched script's mean of an empty list is NaN).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from zsadbench.detector import Detector, FewShot, ImageSet, TransductiveDetector
from zsadbench.dino import DINO_ALIASES, TINY_DINO, load_dino
from zsadbench.filters import gaussian_filter
from zsadbench.patch_knn import largest_products
from zsadbench.registry import register_method
from zsadbench.transforms import ClipTransform
from zsadbench.types import Prediction

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # src/backbones.py DINOv2Wrapper
IMAGENET_STD = (0.229, 0.224, 0.225)
ROTATION_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)  # src/utils.py augment_image

# src/utils.py get_dataset_info: the categories each preset masks / rotates
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MVTEC_MASKED = frozenset({"capsule", "hazelnut", "pill", "screw", "toothbrush"})  # the paper's "masking test"
MVTEC_ROTATED_INFORMED = frozenset({"hazelnut", "screw"})  # objects whose training images vary in orientation
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                   "pcb3", "pcb4", "pipe_fryum")
PREPROCESS_PRESETS = ("agnostic", "informed", "masking_only", "informed_no_mask", "agnostic_no_mask",
                      "force_no_mask_no_rotation", "force_mask_no_rotation", "force_no_mask_rotation",
                      "force_mask_rotation")


def preprocessing_plan(preset: str, category: str) -> tuple[bool, bool]:
    """Returns (zero-shot masking, rotation of the references) of ``category`` under the reference's ``preset``.

    MVTec AD and VisA categories follow the reference's tables; any other category (the reference has no entry) gets
    no masking, and rotation when the preset rotates everything (``agnostic*``).
    """
    if preset not in PREPROCESS_PRESETS:
        raise ValueError(f"AnomalyDINO preprocess {preset!r}: choose one of {PREPROCESS_PRESETS}")
    if preset.startswith("force_"):
        return preset.startswith("force_mask"), not preset.endswith("no_rotation")
    mvtec, visa = category in MVTEC_CATEGORIES, category in VISA_CATEGORIES
    masking = not preset.endswith("_no_mask") and ((category in MVTEC_MASKED) if mvtec else visa)
    if preset.startswith("agnostic"):
        rotation = True
    elif preset.startswith("informed"):
        rotation = mvtec and category in MVTEC_ROTATED_INFORMED
    else:  # masking_only
        rotation = False
    return masking, rotation


def is_dinov2(name: str) -> bool:
    """Returns True for DINOv2 backbones (reference alias, tiny test configuration or timm ``vit_*_dinov2`` name)."""
    return "dinov2" in name and (name in DINO_ALIASES or name in TINY_DINO or name.startswith("vit_"))


# --------------------------------------------------------------------------------------------- the steps


def rotate_image(image: np.ndarray, angle: float) -> np.ndarray:
    """Returns ``image`` (H, W, C) rotated by ``angle`` degrees about its centre (W/2, H/2), as the reference.

    OpenCV ``warpAffine``: bilinear, reflected border (BORDER_REFLECT_101), same size. uint8 images round as OpenCV
    does; float32 images (preprocessed tensors) are interpolated in float.
    """
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    rotated = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_DEFAULT)
    return rotated.reshape(image.shape)


def rotate_tensors(images: Tensor, angles: Sequence[float] = ROTATION_ANGLES) -> Tensor:
    """Returns (B * len(angles), C, H, W): every image rotated by every angle (image-major, as the reference)."""
    out = []
    for image in images.float().cpu():
        hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        out += [torch.from_numpy(rotate_image(hwc, angle)).permute(2, 0, 1) for angle in angles]
    return torch.stack(out).to(images.device)


def background_mask(tokens: Tensor, grid: tuple[int, int], threshold: float = 10.0, kernel_size: int = 3,
                    border: float = 0.2) -> Tensor:
    """Returns (B, P) bool foreground masks of (B, P, D) patch tokens: AnomalyDINO's zero-shot masking.

    Per image: the projection of the centred tokens on their first principal direction (sign: largest loading
    positive, scikit-learn's convention), > ``threshold``; if at most 35 % of the central crop (``border`` cut from
    each side) is kept, the negated projection is thresholded instead. Then a dilation and a closing with a window of
    ``kernel_size`` along the flattened patch index (the reference's mask is a (P, 1) array when OpenCV filters it).
    """
    x = tokens.double()
    centred = x - x.mean(dim=1, keepdim=True)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[:, 0]  # (B, D)
    largest = direction.abs().argmax(dim=1, keepdim=True)
    direction = direction * direction.gather(1, largest).sign()
    projection = (centred @ direction.unsqueeze(-1)).squeeze(-1)  # (B, P)
    mask = projection > threshold
    rows, cols = grid
    r0, r1 = int(rows * border), int(rows * (1 - border))
    c0, c1 = int(cols * border), int(cols * (1 - border))
    centre = mask.view(-1, rows, cols)[:, r0:r1, c0:c1]
    flip = centre.flatten(1).sum(dim=1) <= centre[0].numel() * 0.35
    mask = torch.where(flip[:, None], -projection > threshold, mask)
    return _close_1d(_dilate_1d(mask, kernel_size), kernel_size)


def _dilate_1d(mask: Tensor, size: int) -> Tensor:
    """Returns the (B, P) mask dilated along P with a window of ``size`` (the border adds nothing)."""
    return F.max_pool1d(mask.float().unsqueeze(1), size, stride=1, padding=size // 2).squeeze(1) > 0


def _close_1d(mask: Tensor, size: int) -> Tensor:
    """Returns the (B, P) mask closed (dilation, then erosion) along P; erosion ignores the border as OpenCV's."""
    dilated = _dilate_1d(mask, size).float().unsqueeze(1)
    eroded = -F.max_pool1d(-dilated, size, stride=1, padding=size // 2)
    return eroded.squeeze(1) > 0


def mean_top_percent(distances: Tensor, percent: float = 1.0) -> Tensor:
    """Returns (B,) float64: the mean of the largest ``percent`` % of each row, the row maximum when that is < 1.

    ``src/post_eval.py`` ``mean_top1p``: ``int(P * 0.01)`` values over all P patches (masked ones count as 0).
    """
    count = int(distances.shape[1] * percent / 100)
    values = distances.double()
    if count == 0:
        return values.amax(dim=1)
    return values.topk(count, dim=1).values.mean(dim=1)


def distance_maps(distances: Tensor, grid: tuple[int, int], size: tuple[int, int], sigma: float) -> Tensor:
    """Returns (B, H, W) float64 maps: the (B, P) patch distances upsampled bilinearly, then Gaussian-smoothed.

    ``src/utils.py`` ``dists2map``: ``cv2.resize`` INTER_LINEAR (half-pixel centres, as ``align_corners=False``)
    and ``scipy.ndimage.gaussian_filter(sigma=4)`` (:func:`zsadbench.filters.gaussian_filter`).
    """
    grids = distances.double().view(-1, 1, *grid)
    upsampled = F.interpolate(grids, size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_filter(upsampled, sigma=sigma) if sigma > 0 else upsampled


class DinoPatchFeatures:
    """A timm DINOv2 ViT giving the last block's normed patch tokens, with the reference's preprocessing."""

    def __init__(self, model: str, pretrained: str, image_size: int, seed: int) -> None:
        if not is_dinov2(model):
            raise ValueError(f"AnomalyDINO model {model!r} is not a DINOv2 backbone; use one of "
                             f"{sorted(k for k in DINO_ALIASES if 'dinov2' in k)} or a timm vit_*_dinov2 name")
        self.backbone = load_dino(model, pretrained, image_size, seed)
        self.grid = self.backbone.grid_size
        self.transform = ClipTransform(image_size, IMAGENET_MEAN, IMAGENET_STD, interpolation="bicubic")

    def __call__(self, images: Tensor, batch_size: int, what: str = "") -> Tensor:
        """Returns (B, P, D) float32 patch tokens of the last block (normed), computed in batches."""
        last = self.backbone.depth - 1
        out = []
        bar = tqdm(total=len(images), desc=f"AnomalyDINO features {what}".rstrip(), unit="img", leave=False,
                   disable=len(images) <= batch_size)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].float()
            out.append(self.backbone.forward(batch, [last])[0][0].float())
            bar.update(len(batch))
        bar.close()
        return torch.cat(out)

    def to(self, device: torch.device) -> None:
        """Moves the model to ``device``."""
        self.backbone.model.to(device)

    def describe(self) -> dict[str, Any]:
        """Returns what tracking records about the backbone."""
        return dict(self.backbone.describe())


# ------------------------------------------------------------------------------------------------ few-shot


@dataclass
class AnomalyDINOConfig:
    """AnomalyDINO few-shot settings; defaults are the reference's (``run_anomalydino.py``, ``src/detection.py``)."""

    model: str = "dinov2_vits14"  # dinov2_vit{s,b,l,g}14 or a timm vit_*_dinov2 name
    pretrained: str = "timm"  # a local DINOv2 checkpoint (official or timm layout), "timm" (download) or "random"
    image_size: int = 448  # --resolution; the paper also runs 224 and 672 (multiples of 14)
    shots: int = 1  # K normal reference images per category (the paper: 1, 2, 4, 8, 16)
    reference_protocol: str = "sorted-block"  # the K files at [seed K, (seed + 1) K) of the sorted training images
    reference_seed: int = 0  # the reference's --num_seeds runs seeds 0, 1, 2
    preprocess: str = "agnostic"  # preset deciding masking and rotation per category (PREPROCESS_PRESETS)
    mask_reference_images: bool = False  # --mask_ref_images: also drop the background patches of the references
    mask_threshold: float = 10.0  # first principal component > 10 is foreground
    knn_metric: Literal["L2_normalized", "L2"] = "L2_normalized"  # L2_normalized = cosine distance
    k_neighbors: int = 1  # --k_neighbors: distances averaged over the k nearest bank patches
    top_percent: float = 1.0  # image score: mean of the largest 1 % of the patch distances
    smoothing_sigma: float = 4.0  # Gaussian filter of the upsampled map (input-size pixels)
    batch_size: int = 8  # backbone pass only
    knn_memory_mb: float = 1024.0  # working-set budget of the nearest-neighbour products


@register_method("anomalydino")
class AnomalyDINO(Detector, FewShot):
    """AnomalyDINO: a memory bank of the K (rotated) normal shots' DINOv2 patches, cosine 1-NN, mean of the top 1 %."""

    Config = AnomalyDINOConfig
    label = "AnomalyDINO"
    paper = "arXiv:2405.14529"
    reference = "dammsi/AnomalyDINO@b3435f0"
    code_license = "Apache-2.0"
    weights_license = "Apache-2.0 (DINOv2)"
    regression_variants = {  # zsadbench check: a tiny seeded DINOv2 ViT-S/14 (real depth, width 32)
        "1-shot": {"model": "tiny-dinov2_vits14", "pretrained": "random", "image_size": 56, "shots": 1,
                   "preprocess": "force_mask_rotation", "mask_threshold": 0.0},
    }

    def __init__(self, config: AnomalyDINOConfig | None = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(config, seed=seed, **overrides)
        cfg = self.config
        preprocessing_plan(cfg.preprocess, "")  # validates the preset
        if cfg.knn_metric not in ("L2_normalized", "L2"):
            raise ValueError(f"AnomalyDINO knn_metric must be 'L2_normalized' or 'L2', got {cfg.knn_metric!r}")
        if cfg.k_neighbors < 1 or cfg.batch_size < 1 or cfg.shots < 0 or not 0 < cfg.top_percent <= 100:
            raise ValueError(f"AnomalyDINO: k_neighbors and batch_size must be >= 1, shots >= 0 and top_percent in "
                             f"(0, 100] (got {cfg.k_neighbors}, {cfg.batch_size}, {cfg.shots}, {cfg.top_percent})")
        self.features = DinoPatchFeatures(cfg.model, cfg.pretrained, cfg.image_size, seed)
        self.bank: Tensor | None = None  # (M, D) memory bank of the current category
        self.bank_category: str | None = None

    def transform(self, image: Image.Image) -> Tensor:
        """Returns the (3, S, S) tensor: PIL bicubic resize, [0, 1], ImageNet mean / std (the reference's)."""
        return self.features.transform(image)

    def to(self, device: str | torch.device) -> AnomalyDINO:
        """Moves the backbone (and the memory bank) to ``device`` and returns the detector."""
        super().to(device)
        self.features.to(self.device)
        if self.bank is not None:
            self.bank = self.bank.to(self.device)
        return self

    def describe(self) -> dict[str, Any]:
        """Returns the backbone facts (architecture, weights, positional-embedding mode)."""
        return self.features.describe()

    def plan(self, category: str) -> tuple[bool, bool]:
        """Returns (zero-shot masking, reference rotation) for ``category`` under the configured preset."""
        return preprocessing_plan(self.config.preprocess, category)

    def set_reference_images(self, images: Sequence[Image.Image], category: str) -> None:
        """Builds the bank from raw RGB images: rotated before the resize, exactly as the reference."""
        _, rotation = self.plan(category)
        if not rotation:
            super().set_reference_images(images, category)
            return
        rotated = [Image.fromarray(rotate_image(np.asarray(image.convert("RGB")), angle))
                   for image in images for angle in ROTATION_ANGLES]
        batch = torch.stack([self.transform(image) for image in rotated]).to(self.device)
        self._build_bank(batch, category, len(images))

    def set_reference(self, images: Tensor, category: str) -> None:
        """Builds the bank from preprocessed (K, 3, S, S) images (rotations applied to the preprocessed tensors)."""
        _, rotation = self.plan(category)
        batch = rotate_tensors(images) if rotation else images
        self._build_bank(batch.to(self.device), category, len(images))

    def _build_bank(self, images: Tensor, category: str, shots: int) -> None:
        """Stores the (masked, normalised) patch features of the (augmented) reference images of ``category``."""
        cfg = self.config
        masking, rotation = self.plan(category)
        log.info("AnomalyDINO %s: %d shot(s), %d bank images, masking=%s, rotation=%s", category, shots,
                 len(images), masking, rotation)
        with torch.no_grad():
            tokens = self.features(images, cfg.batch_size, f"{category} references")
            if masking and cfg.mask_reference_images:
                keep = background_mask(tokens, self.features.grid, cfg.mask_threshold)
                bank = tokens[keep]
            else:
                bank = tokens.reshape(-1, tokens.shape[-1])
        if len(bank) < cfg.k_neighbors:
            raise ValueError(f"category {category!r}: the memory bank holds {len(bank)} patches, fewer than "
                             f"k_neighbors={cfg.k_neighbors}")
        self.bank = F.normalize(bank, dim=1) if cfg.knn_metric == "L2_normalized" else bank
        self.bank_category = category

    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and float64 maps (B, S, S) against the memory bank of ``category``."""
        cfg = self.config
        distances = self.patch_distances(images, category)
        scores = mean_top_percent(distances, cfg.top_percent)
        maps = distance_maps(distances, self.features.grid, self.input_size, cfg.smoothing_sigma)
        return Prediction(scores.cpu(), maps.cpu())

    def patch_distances(self, images: Tensor, category: str) -> Tensor:
        """Returns (B, P) float64 patch distances to the bank of ``category`` (0 on masked-out background)."""
        cfg = self.config
        if self.bank is None or self.bank_category != category:
            raise RuntimeError(f"AnomalyDINO needs the reference images of category {category!r} first (--shots K "
                               f">= 1, then set_reference); zero-shot without shots is 'anomalydino-batched'")
        masking, _ = self.plan(category)
        with torch.no_grad():
            tokens = self.features(images.to(self.device), cfg.batch_size)
            batch, patches, dim = tokens.shape
            keep = (background_mask(tokens, self.features.grid, cfg.mask_threshold) if masking
                    else torch.ones(batch, patches, dtype=torch.bool, device=tokens.device))
            queries = tokens[keep]
            distances = torch.zeros(batch, patches, dtype=torch.float64, device=tokens.device)
            if len(queries):
                distances[keep] = self._nearest_distances(queries).double()
        return distances

    def _nearest_distances(self, queries: Tensor) -> Tensor:
        """Returns (Q,) float32 distances of query patches to the bank, as ``src/detection.py`` computes them."""
        cfg = self.config
        assert self.bank is not None
        if cfg.knn_metric == "L2_normalized":
            best = largest_products(F.normalize(queries, dim=1), self.bank, cfg.k_neighbors,
                                    memory_mb=cfg.knn_memory_mb)
            # faiss: squared L2 of unit vectors (2 - 2 cos, clipped at 0), mean over k, halved = 1 - cos
            return (1 - best).clamp_(min=0).mean(dim=1)
        bias = self.bank.square().sum(dim=1).mul_(-0.5)
        best = largest_products(queries, self.bank, cfg.k_neighbors, bank_bias=bias, memory_mb=cfg.knn_memory_mb)
        squared = (queries.square().sum(dim=1, keepdim=True) - 2 * best).clamp_(min=0)
        return squared.mean(dim=1).sqrt()


# ------------------------------------------------------------------------------------------ batched zero-shot


@dataclass
class AnomalyDINOBatchedConfig:
    """Batched zero-shot settings; defaults are ``run_anomalydino_batched.py``'s."""

    model: str = "dinov2_vits14"  # --model_size s
    pretrained: str = "timm"  # a local DINOv2 checkpoint, "timm" (download) or "random"
    image_size: int = 672  # --resolution
    preprocess: str = "masking_only"  # --preprocess: masking per category, no rotation
    mask_threshold: float = 10.0
    quantile: float = 0.001  # a patch's distance: mean of its distances below this quantile of all other patches
    top_percent: float = 1.0  # image score: mean of the largest 1 % of the patch distances
    smoothing_sigma: float = 4.0
    batch_size: int = 8  # backbone pass only
    knn_memory_mb: float = 1024.0  # working-set budget of the nearest-neighbour products


def batched_distances(tokens: Tensor, quantile: float = 0.001, memory_mb: float = 1024.0,
                      progress: bool = False) -> Tensor:
    """Returns (N, P) float32 batched zero-shot distances of the (N, P, D) tokens of one set of images.

    ``calculate_cosine_distances``: a patch's cosine distances to every patch of the other N - 1 images, the k-th
    smallest with k = int(quantile (N - 1) P) (at least 2 here), and the mean of the distances strictly below it.
    """
    n, patches, dim = tokens.shape
    if n < 2:
        raise ValueError(f"AnomalyDINO batched mode needs at least 2 images in a set, got {n}")
    k = max(2, int(quantile * (n - 1) * patches))
    unit = F.normalize(tokens.float(), dim=-1).reshape(n * patches, dim)
    groups = torch.arange(n, device=tokens.device).repeat_interleave(patches)
    best = largest_products(unit, unit, k, query_groups=groups, bank_groups=groups, memory_mb=memory_mb,
                            progress=progress)
    nearest = 1 - best  # (N P, k) ascending cosine distances
    kth = nearest[:, -1:]
    below = nearest < kth
    count = below.sum(dim=1)
    means = (nearest * below).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, means, kth[:, 0]).view(n, patches)


@register_method("anomalydino-batched")
class AnomalyDINOBatched(TransductiveDetector):
    """AnomalyDINO's batched zero-shot mode: the test images of a category are each other's references."""

    Config = AnomalyDINOBatchedConfig
    label = "AnomalyDINO (batched zero-shot)"
    paper = "arXiv:2405.14529"
    reference = "dammsi/AnomalyDINO@b3435f0"
    code_license = "Apache-2.0"
    weights_license = "Apache-2.0 (DINOv2)"
    regression_variants = {
        "zero-shot": {"model": "tiny-dinov2_vits14", "pretrained": "random", "image_size": 56,
                      "preprocess": "force_mask_no_rotation", "mask_threshold": 0.0},
    }

    def __init__(self, config: AnomalyDINOBatchedConfig | None = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(config, seed=seed, **overrides)
        cfg = self.config
        preprocessing_plan(cfg.preprocess, "")  # validates the preset
        if not 0 < cfg.quantile < 1 or cfg.batch_size < 1 or not 0 < cfg.top_percent <= 100:
            raise ValueError(f"AnomalyDINO batched: quantile must lie in (0, 1), batch_size >= 1, top_percent in "
                             f"(0, 100] (got {cfg.quantile}, {cfg.batch_size}, {cfg.top_percent})")
        self.features = DinoPatchFeatures(cfg.model, cfg.pretrained, cfg.image_size, seed)

    def transform(self, image: Image.Image) -> Tensor:
        """Returns the (3, S, S) tensor: PIL bicubic resize, [0, 1], ImageNet mean / std (the reference's)."""
        return self.features.transform(image)

    def to(self, device: str | torch.device) -> AnomalyDINOBatched:
        """Moves the backbone to ``device`` (the distances are computed there too) and returns the detector."""
        super().to(device)
        self.features.to(self.device)
        return self

    def describe(self) -> dict[str, Any]:
        """Returns the backbone facts (architecture, weights, positional-embedding mode)."""
        return self.features.describe()

    def predict_set(self, images: ImageSet, category: str) -> Prediction:
        """Returns image scores (N,) and float64 maps (N, S, S) of every image of the set, in set order."""
        cfg = self.config
        distances = self.patch_distances(images, category)
        scores = mean_top_percent(distances, cfg.top_percent)
        maps = distance_maps(distances, self.features.grid, self.input_size, cfg.smoothing_sigma)
        return Prediction(scores.cpu(), maps.cpu())

    def patch_distances(self, images: ImageSet, category: str) -> Tensor:
        """Returns (N, P) float64 batched zero-shot patch distances of the set (0 on masked-out background)."""
        cfg = self.config
        masking, _ = preprocessing_plan(cfg.preprocess, category)
        with torch.no_grad():
            parts = [self.features(batch.to(self.device), cfg.batch_size) for batch in
                     tqdm(images.batches(), total=math.ceil(len(images) / images.batch_size),
                          desc=f"AnomalyDINO features {category}", unit="batch", leave=False)]
            tokens = torch.cat(parts)
            distances = batched_distances(tokens, cfg.quantile, cfg.knn_memory_mb, progress=True).double()
            if masking:
                distances[~background_mask(tokens, self.features.grid, cfg.mask_threshold)] = 0.0
        return distances
