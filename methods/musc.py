"""MuSc: zero-shot anomaly classification and segmentation by mutual scoring of the unlabeled test images.

Paper: X. Li, Z. Huang, F. Xue, Y. Zhou, "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with
Mutual Scoring of the Unlabeled Images", ICLR 2024, https://arxiv.org/abs/2401.16753.
Reference implementation: xrli-U/MuSc @ b76b93d (algorithm code last changed in b184781, 2024-03-22).

MuSc is training-free, prompt-free and transductive: it scores all unlabeled test images of a category (or of one
"division" of it) jointly. Normal patches find near-identical patches in most other images; anomalous patches do not.

1. Patch tokens: the raw residual stream of a ViT after a few blocks (CLIP ViT-L/14-336 at 518 px: blocks 6/12/18/24,
   no ``ln_post``, no projection; DINO / DINOv2 through timm: the normed block outputs).
2. LNAMD (local neighbourhood aggregation with multiple degrees): per image and layer, one LayerNorm over the whole
   (D, H, W) token grid, then an r x r mean over each patch's neighbourhood (zero padding counted), r in {1, 3, 5},
   then an L2 normalisation of every token.
3. MSM (mutual scoring): a patch's distance to another image is its Euclidean distance to that image's nearest patch;
   its score is the mean of the smallest 30 % of these per-image distances (the "interval average"); scores are
   averaged over layers, then over degrees (float64).
4. Maps: patch scores upsampled bilinearly (align_corners=True) to the input size; raw image score = map maximum.
5. RsCIN (re-scoring with constrained image-level neighbourhood): min-max normalised image scores are smoothed over
   each image's k most similar images (image embeddings), averaged over the windows K ({1, 2, 3}; {1, 8, 9} on VisA).

The mutual scoring is the cost centre, O(N^2 P^2 D) per category. :func:`mutual_scoring` computes it with blocked
matrix products that use each image pair once for both directions, min reductions over the products, and
cdist's own formula folded into the product, within a configurable memory budget (see its docstring).

Deliberate deviations from the reference (numerically equivalent unless stated):

- LNAMD's r x r aggregation is ``avg_pool2d(count_include_pad=True)`` instead of Unfold + adaptive 1-D pooling (the
  same means; differences <= 5e-7); the per-image LayerNorm is computed once per layer instead of once per degree.
  (Whether border zeros count does not matter in the end: the per-token L2 normalisation removes the divisor.)
- DINO v1 layers: the reference takes the normed outputs of the last max(layers) + 1 blocks and indexes them as if
  they started at block 0, which shifts the layers when the largest one is not the last block; here
  ``feature_layers`` are always 0-based block indices (identical for the reference's (2, 5, 8, 11) on ViT-B).
- Fewer than 5 images in a scored set: the reference's interval average keeps ``int(0.3 (N - 1)) = 0`` values and
  silently returns NaN scores (xrli-U/MuSc#41). Here it is an error naming the set size, unless
  ``topmin_rounding="ceil"`` is chosen (the maintainer's suggestion: at least one other image is kept).
- RsCIN on sets smaller than its window: the reference fails (``topk(N - k)`` with k > N); here the window is capped
  at N. A set whose raw scores are all equal gives all-zero RsCIN scores (the reference divides 0 by 0).
- Maps are returned in the order of the image set, also when divisions are used (the reference concatenates them in
  division order).
- On CUDA, RsCIN's image similarities are computed in float32 from the float16 embeddings and rounded to float16
  (the reference multiplies float16 arrays in numpy). On the CPU both sides are float32 throughout.
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from zsadbench.clip import forward_vision, load_clip
from zsadbench.clip.backbone import reference_activation
from zsadbench.detector import ImageSet, TransductiveDetector
from zsadbench.dino import is_dino, load_dino
from zsadbench.feature_cache import frozen_stage, transform_description, weights_sha256
from zsadbench.mutual_scoring import SetTooSmallError, interval_bounds, mutual_scoring
from zsadbench.registry import register_method
from zsadbench.transforms import ClipTransform
from zsadbench.types import Prediction

log = logging.getLogger(__name__)

RSCIN_WINDOWS = {"mvtec": (1, 2, 3), "btad": (1, 2, 3), "visa": (1, 8, 9)}  # reference: models/musc.py
RSCIN_DEFAULT_WINDOWS = (1, 2, 3)  # every other dataset
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO / DINOv2 preprocessing (reference datasets/*.py)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MuScConfig:
    """MuSc settings; defaults are the reference's (configs/musc.yaml, models/musc.py, examples/musc_main.py).

    Memory: the tapped tokens of a scored set stay on the CPU, as in the reference (4 layers x 1369 x 1024 floats =
    22 MB per image at 518 px); ``msm_memory_mb`` bounds the mutual-scoring working set on top of that.
    """

    model: str = "ViT-L-14-336"  # open_clip architecture, or DINO / DINOv2 (dinov2_vitl14, timm vit_*_dino* names)
    pretrained: str = "openai"  # open_clip tag, local weights file, or "random" (DINO: a file, "timm" or "random")
    image_size: int = 518
    feature_layers: tuple[int, ...] = (5, 11, 17, 23)  # 0-based blocks as in the yaml: taps after blocks 6/12/18/24
    r_list: tuple[int, ...] = (1, 3, 5)  # LNAMD aggregation degrees
    topmin_min: float = 0.0  # interval average: sorted ranks [min, max) of the per-image distances
    topmin_max: float = 0.3  # (fractions of N - 1 below 1, absolute counts from 1 on)
    topmin_rounding: Literal["floor", "ceil"] = "floor"  # floor = reference (needs >= 5 images); ceil: >= 2
    divide_num: int = 1  # split each category into this many stratified subsets, scored separately
    divide_seed: int = 42  # examples/musc_main.py
    rscin: bool = True  # image-level re-scoring (RsCIN); off: image score = map maximum
    rscin_k: tuple[int, ...] | None = None  # RsCIN windows; None: dataset default ({1, 8, 9} VisA, else {1, 2, 3})
    batch_size: int = 4  # backbone pass only (configs/musc.yaml)
    precision: Literal["auto", "fp32", "fp16"] = "auto"  # auto: fp16 autocast on CUDA as the reference, fp32 on CPU
    activation: Literal["auto", "gelu", "quick_gelu"] = "auto"  # auto: reference rule, see MuSc.__init__
    msm_memory_mb: float = 2048.0  # working-set budget of mutual scoring (see mutual_scoring)
    msm_precision: Literal["fp32", "bf16"] = "fp32"  # bf16: faster, scores move by ~1e-3 (not the reference)


# --------------------------------------------------------------------------------------------------------- LNAMD


def layer_norm_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Returns (B, D, H, W): patch tokens (B, H*W, D) normalised with ONE mean and variance per image over (D, H, W).

    The reference applies a fresh ``nn.LayerNorm([D, H, W])`` (identity affine, eps 1e-5) to the token grid, so the
    statistics are per image and layer, not per token. Computed in float32 whatever the tokens' dtype.
    """
    batch, patches, dim = tokens.shape
    if patches != grid[0] * grid[1]:
        raise ValueError(f"{patches} patch tokens do not form the {grid[0]}x{grid[1]} grid")
    x = tokens.float().transpose(1, 2).reshape(batch, dim, grid[0], grid[1])
    return F.layer_norm(x, (dim, grid[0], grid[1]), eps=1e-5)


def aggregate_neighbourhood(normed: Tensor, r: int) -> Tensor:
    """Returns (B, H*W, D) unit-norm features: each patch's r x r neighbourhood mean (zero padding counted), L2-normed.

    ``normed`` is the (B, D, H, W) output of :func:`layer_norm_grid`; r must be odd (the reference pads (r - 1) / 2).
    """
    if r < 1 or r % 2 == 0:
        raise ValueError(f"LNAMD aggregation degree r must be a positive odd number, got {r}")
    x = normed if r == 1 else F.avg_pool2d(normed, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    x = x.flatten(2).transpose(1, 2)
    return (x / x.norm(dim=-1, keepdim=True)).contiguous()


# --------------------------------------------------------------------------------------------------------- RsCIN


def rscin(scores: Tensor, embeddings: Tensor, windows: Sequence[int] = RSCIN_DEFAULT_WINDOWS) -> Tensor:
    """Returns (N,) float64 re-scored image scores: min-max scores averaged over each image's k nearest images.

    For each window k: keep the k largest similarities of each row of W = E E^T (the others set to 0), normalise the
    rows to sum 1 and propagate the min-max normalised scores; the result is the mean over the windows. Arithmetic in
    float32 as the reference; W is rounded to float16 when the embeddings are float16 (the reference's GPU path).
    A window 0, or no windows, returns ``scores`` unchanged (the reference's switch). Windows larger than N are capped
    at N (all images); equal raw scores give zeros.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if not windows or 0 in windows:
        return scores.clone()
    n = scores.shape[0]
    if embeddings.shape[0] != n:
        raise ValueError(f"RsCIN got {n} scores but {embeddings.shape[0]} image embeddings")
    if any(k < 0 for k in windows):
        raise ValueError(f"RsCIN windows must be positive, got {list(windows)}")
    spread = scores.max() - scores.min()
    normalised = (scores - scores.min()) / spread if spread > 0 else torch.zeros_like(scores)
    e = embeddings.detach().cpu()
    similarity = e.float() @ e.float().T
    if e.dtype == torch.float16:
        similarity = similarity.half().float()
    values = normalised.float()[:, None]
    out = []
    for k in windows:
        k = min(int(k), n)
        weights = similarity.clone()
        if k < n:
            dropped = torch.topk(similarity, n - k, dim=1, largest=False, sorted=True).indices
            weights.scatter_(1, dropped, 0.0)
        weights = (1 / weights.sum(dim=1, keepdim=True)) * weights
        out.append(weights @ values)
    return torch.cat(out, dim=1).mean(dim=1).double()


def rscin_windows(dataset: str) -> tuple[int, ...]:
    """Returns RsCIN's windows K for a dataset registry name ({1, 8, 9} for VisA, {1, 2, 3} otherwise)."""
    return RSCIN_WINDOWS.get(dataset.lower(), RSCIN_DEFAULT_WINDOWS)


# ----------------------------------------------------------------------------------------------------- divisions


def divide(groups: Sequence[str], divide_num: int, seed: int = 42) -> list[list[int]]:
    """Returns ``divide_num`` disjoint index lists that stratify the images by ``groups`` (their defect types).

    The reference's rule (datasets/mvtec.py ``sub_datasets``): seed Python's RNG once, shuffle each group's indices
    (groups in order of first appearance), cut every group into consecutive chunks of ``divide_num``; subset t takes
    element t of every chunk. Subsets equal the reference's when the images come in its order (MVTec AD: defect
    folders sorted by name, files sorted; VisA: meta.json order).
    """
    if divide_num < 1:
        raise ValueError(f"divide_num must be >= 1, got {divide_num}")
    if divide_num == 1:
        return [list(range(len(groups)))]
    rng = random.Random(seed)
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    subsets: list[list[int]] = [[] for _ in range(divide_num)]
    for members in by_group.values():
        rng.shuffle(members)
        for begin in range(0, len(members), divide_num):
            for t, index in enumerate(members[begin:begin + divide_num]):
                subsets[t].append(index)
    return subsets


# ------------------------------------------------------------------------------------------------------ backbones


class _ClipTaps:
    """An open_clip CLIP vision tower giving raw residual-stream patch tokens and the L2-normalised image embedding."""

    def __init__(self, config: MuScConfig, seed: int) -> None:
        arch = open_clip.get_model_config(config.model)
        if arch is None:
            raise ValueError(f"unknown backbone {config.model!r}: neither an open_clip architecture nor a DINO model")
        activation = config.activation
        if activation == "auto":  # the reference's rule for this size and weights source (see reference_activation)
            activation = reference_activation("musc", config.model, config.pretrained, config.image_size)
        with warnings.catch_warnings():
            if config.activation == "auto":  # e.g. exact GELU with OpenAI weights at 518 px: what the reference runs
                warnings.filterwarnings("ignore", message="ACTIVATION MISMATCH")
            self.backbone = load_clip(config.model, config.pretrained, image_size=config.image_size,
                                      pos_embed_mode="bicubic", activation=activation, seed=seed)
        self.depth = len(self.backbone.visual.transformer.resblocks)
        self.grid = self.backbone.grid_size
        self.transform = ClipTransform(config.image_size, interpolation="bicubic")

    def __call__(self, images: Tensor, blocks: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """Returns ([patch tokens (B, P, D) after each 0-based block], L2-normalised image embeddings (B, E))."""
        out = forward_vision(self.backbone.visual, images, taps=[b + 1 for b in blocks])
        embedding = out.pooled
        return [out.taps[b + 1][:, 1:] for b in blocks], embedding / embedding.norm(dim=-1, keepdim=True)

    def to(self, device: torch.device) -> None:
        """Moves the model to ``device``."""
        self.backbone.model.to(device)

    def describe(self) -> dict[str, Any]:
        """Returns what tracking records about the backbone."""
        return dict(self.backbone.describe())


class _DinoTaps:
    """A timm DINO / DINOv2 ViT giving normed patch tokens and the normed CLS token (not L2-normalised)."""

    def __init__(self, config: MuScConfig, seed: int) -> None:
        self.backbone = load_dino(config.model, config.pretrained, config.image_size, seed)
        self.depth = self.backbone.depth
        self.grid = self.backbone.grid_size
        self.transform = ClipTransform(config.image_size, IMAGENET_MEAN, IMAGENET_STD, interpolation="bilinear")

    def __call__(self, images: Tensor, blocks: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """Returns ([normed patch tokens (B, P, D) after each 0-based block], normed CLS tokens (B, D))."""
        return self.backbone.forward(images, list(blocks))

    def to(self, device: torch.device) -> None:
        """Moves the model to ``device``."""
        self.backbone.model.to(device)

    def describe(self) -> dict[str, Any]:
        """Returns what tracking records about the backbone."""
        return dict(self.backbone.describe())


# ------------------------------------------------------------------------------------------------------- detector


@register_method("musc")
class MuSc(TransductiveDetector):
    """MuSc: LNAMD features of every image of a set, mutual scoring within the set, RsCIN image re-scoring."""

    Config = MuScConfig
    label = "MuSc"
    paper = "arXiv:2401.16753"
    reference = "xrli-U/MuSc@b76b93d"
    code_license = "MIT"
    weights_license = "MIT (OpenAI CLIP); Apache-2.0 (DINO, DINOv2)"
    presets = {  # tiny seeded backbones at the real depth (a few seconds per category)
        "smoke": {"model": "tiny-ViT-L-14-336", "pretrained": "random", "image_size": 56},
        "smoke-dinov2": {"model": "tiny-dinov2_vitl14", "pretrained": "random", "image_size": 56},
    }
    regression_variants = {"zero-shot": presets["smoke"], "dinov2": presets["smoke-dinov2"]}

    def __init__(self, config: MuScConfig | None = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(config, seed=seed, **overrides)
        cfg = self.config
        if cfg.divide_num < 1 or cfg.batch_size < 1 or not cfg.r_list or not cfg.feature_layers:
            raise ValueError(f"MuSc: divide_num and batch_size must be >= 1 and r_list / feature_layers non-empty "
                             f"(got divide_num={cfg.divide_num}, batch_size={cfg.batch_size}, r_list={cfg.r_list}, "
                             f"feature_layers={cfg.feature_layers})")
        for r in cfg.r_list:
            if r < 1 or r % 2 == 0:
                raise ValueError(f"MuSc: r_list holds odd aggregation degrees >= 1, got {list(cfg.r_list)}")
        if cfg.precision not in ("auto", "fp32", "fp16") or cfg.msm_precision not in ("fp32", "bf16"):
            raise ValueError(f"MuSc: precision must be auto/fp32/fp16 and msm_precision fp32/bf16, got "
                             f"{cfg.precision!r} / {cfg.msm_precision!r}")
        if cfg.topmin_rounding not in ("floor", "ceil"):
            raise ValueError(f"MuSc: topmin_rounding must be 'floor' or 'ceil', got {cfg.topmin_rounding!r}")
        self.features = _DinoTaps(cfg, seed) if is_dino(cfg.model) else _ClipTaps(cfg, seed)
        bad = [b for b in cfg.feature_layers if not 0 <= b < self.features.depth]
        if bad:
            hint = "(5, 11, 17, 23)" if self.features.depth == 24 else "(2, 5, 8, 11)"
            raise ValueError(f"MuSc: feature_layers {list(bad)} are outside the {self.features.depth} blocks of "
                             f"{cfg.model} (0-based block indices; the reference uses {hint} for this depth)")

    def transform(self, image: Image.Image) -> Tensor:
        """Returns the preprocessed (3, S, S) tensor (CLIP: bicubic + OpenAI statistics; DINO: bilinear + ImageNet)."""
        return self.features.transform(image)

    def to(self, device: str | torch.device) -> MuSc:
        """Moves the backbone to ``device`` (mutual scoring runs there too) and returns the detector."""
        super().to(device)
        self.features.to(self.device)
        return self

    def describe(self) -> dict[str, Any]:
        """Returns the backbone facts (architecture, weights id, activation, positional-embedding mode)."""
        return self.features.describe()

    def predict_set(self, images: ImageSet, category: str) -> Prediction:
        """Returns image scores (N,) and float64 maps (N, S, S) of every image of the set, in set order."""
        cfg = self.config
        n = len(images)
        subsets = divide([s.defect_type for s in images.samples], cfg.divide_num, cfg.divide_seed)
        for t, subset in enumerate(subsets):
            try:
                interval_bounds(len(subset) - 1, cfg.topmin_min, cfg.topmin_max, cfg.topmin_rounding)
            except SetTooSmallError as exc:
                where = f"division {t + 1}/{len(subsets)} of " if len(subsets) > 1 else ""
                raise SetTooSmallError(f"category {category!r}: {where}the set holds {len(subset)} image(s). {exc}"
                                       ) from None
        size = self.input_size
        maps = torch.empty(n, *size, dtype=torch.float64)
        embeddings: Tensor | None = None
        for t, subset in enumerate(subsets):
            tokens, embedding = self._extract(images, subset, f"{category} {t + 1}/{len(subsets)}")
            if embeddings is None:
                embeddings = embedding.new_empty(n, embedding.shape[1])
            embeddings[subset] = embedding
            patch_scores = self._score(tokens, category)
            grid = self.features.grid
            upsampled = F.interpolate(patch_scores.view(-1, 1, *grid), size=size, mode="bilinear", align_corners=True)
            maps[subset] = upsampled[:, 0].cpu()
            del tokens
        raw = maps.flatten(1).amax(dim=1)
        if not cfg.rscin:
            return Prediction(raw, maps)
        windows = cfg.rscin_k if cfg.rscin_k is not None else rscin_windows(images.samples[0].dataset)
        assert embeddings is not None
        return Prediction(rscin(raw, embeddings, windows), maps)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Returns the reference's mixed precision: fp16 autocast on CUDA unless precision is fp32."""
        if self.config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("MuSc precision='fp16' needs a CUDA device (the reference's autocast is CUDA-only)")
        if self.device.type == "cuda" and self.config.precision in ("auto", "fp16"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def frozen_description(self) -> dict[str, Any]:
        """Returns what determines :meth:`frozen_tokens` besides the image (the feature cache's key)."""
        cfg, backbone = self.config, self.features.backbone
        mixed = self.device.type == "cuda" and cfg.precision in ("auto", "fp16")
        return {"backbone": {**{k: str(v) for k, v in self.features.describe().items()}, "model": cfg.model,
                             "weights": weights_sha256(getattr(backbone, "weights_file", None), backbone.model),
                             "image_size": cfg.image_size},
                "preprocessing": transform_description(self.features.transform), "blocks": list(cfg.feature_layers),
                "autocast": "cuda fp16" if mixed else "off"}

    @frozen_stage("patch_tokens", frozen_description)
    def frozen_tokens(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Returns the patch tokens of every feature layer and the image embeddings: the frozen stage (cached)."""
        return self.features(images, list(self.config.feature_layers))

    def _extract(self, images: ImageSet, subset: list[int], what: str) -> tuple[Tensor, Tensor]:
        """Returns (tokens (L, n, P, D) on the CPU in the backbone's dtype, image embeddings (n, E)) of a subset."""
        blocks = list(self.config.feature_layers)
        tokens: Tensor | None = None
        embeddings: list[Tensor] = []
        done = 0
        bar = tqdm(total=len(subset), desc=f"MuSc features {what}", unit="img", leave=False, disable=None)
        with torch.no_grad(), self._autocast():
            for batch in _rebatch(images.batches(subset), self.config.batch_size):
                taps, embedding = self.frozen_tokens(batch.to(self.device, torch.float32))
                if tokens is None:
                    tokens = torch.empty(len(blocks), len(subset), *taps[0].shape[1:], dtype=taps[0].dtype)
                for layer, tap in enumerate(taps):
                    tokens[layer, done:done + len(batch)] = tap.cpu()
                embeddings.append(embedding.cpu())
                done += len(batch)
                bar.update(len(batch))
        bar.close()
        if tokens is None or done != len(subset):
            raise RuntimeError(f"MuSc: the image set yielded {done} images for a subset of {len(subset)}")
        return tokens, torch.cat(embeddings)

    def _score(self, tokens: Tensor, category: str) -> Tensor:
        """Returns (n, P) float64 patch scores: MSM of every layer and degree, mean over layers, then over degrees."""
        cfg = self.config
        layers, n = tokens.shape[:2]
        scores = torch.empty(len(cfg.r_list), layers, n, tokens.shape[2], dtype=torch.float64, device=self.device)
        bar = tqdm(total=layers * len(cfg.r_list), desc=f"MuSc mutual scoring {category}", unit="call", leave=False,
                   disable=None)
        with torch.no_grad():
            for layer in range(layers):
                normed = layer_norm_grid(tokens[layer].to(self.device), self.features.grid)
                for d, r in enumerate(cfg.r_list):
                    z = aggregate_neighbourhood(normed, r)
                    scores[d, layer] = mutual_scoring(
                        z, topmin_min=cfg.topmin_min, topmin_max=cfg.topmin_max, rounding=cfg.topmin_rounding,
                        memory_mb=cfg.msm_memory_mb, precision=cfg.msm_precision)
                    del z
                    bar.update(1)
                del normed
        bar.close()
        return scores.mean(dim=1).mean(dim=0)


def _rebatch(batches: Iterator[Tensor], size: int) -> Iterator[Tensor]:
    """Yields the images of ``batches`` regrouped into batches of ``size`` (the last one smaller)."""
    pending: list[Tensor] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += len(batch)
        while count >= size:
            merged = torch.cat(pending)
            yield merged[:size]
            pending, count = [merged[size:]], count - size
    if count:
        yield torch.cat(pending)
