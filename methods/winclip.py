"""WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation (Jeong et al., CVPR 2023).

Paper: https://arxiv.org/abs/2303.14814. No official code was released. zsadbench follows the anomalib implementation
(openvinotoolkit/anomalib @161bb36, src/anomalib/models/image/winclip/), cross-checked with the zqhang/WinCLIP-pytorch
reproduction (@6b070ff), whose per-class results are the benchmark-level target (docs/methods/winclip.md).

Method, as implemented:

1. Compositional prompt ensemble: 7 normal and 4 anomalous states of the class name × 21 templates (one listed
   twice) = 147 / 84 prompts; each class embedding is the mean of the raw (unnormalised) prompt embeddings, computed
   once per category.
2. Window embeddings: the full image and every 2×2 (196) and 3×3 (169) window of the 15×15 patch grid, each
   window re-run through the whole ViT with its own positional embeddings and the CLS token; embedding = ln_post(CLS)
   @ proj. All windows of a batch go through the tower in one packed pass.
3. Zero-shot scores: a(e) = softmax([cos(e, t_n), cos(e, t_a)] / 0.07)[anomalous]. Image score = a(full image).
   Per window scale, each patch gets the harmonic mean of the scores of the windows covering it; the image score, the
   2×2 map and the 3×3 map are fused by a harmonic mean on the grid, then bilinearly upsampled to the input size.
4. Few-shot WinCLIP+: k normal reference images give a memory of patch tokens (ln_post'd, unprojected) and of
   window embeddings per scale. Association = min over the memory of (1 − cos) / 2, harmonic-aggregated per window
   scale; few-shot map = mean of the patch map and the window-scale maps. Final map = (zero-shot + few-shot) / 2,
   image score = (zero-shot image score + max of the few-shot map) / 2 (anomalib).

Deliberate deviations from anomalib:

- Preprocessing is the PIL bicubic squash of the benchmark reference (zqhang) instead of anomalib's antialiased tensor
  resize (~1e-2 apart on pixels); the parity test feeds both the same preprocessed tensor.
- anomalib's window forward attends across windows with open_clip >= 2.26 (anomalib#2571); zsadbench
  implements the intended within-window attention, which equals anomalib under open_clip 2.24 / with the fix.
- Few-shot association scores are clamped at 0 (round-off made them -1e-7 for a duplicate of a reference image,
  which the harmonic mean turns into arbitrary values); identical otherwise.
- The last ViT block computes only the CLS rows it returns, and prompts are encoded up to their end-of-text token
  (causal mask): the same features, fewer operations (differences at float round-off, ~1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from zsadbench.clip.backbone import load_clip, reference_activation
from zsadbench.clip.scoring import class_probabilities, harmonic_mean
from zsadbench.clip.text import TextFeatureCache, compositional_prompts, prompt_ensemble_features
from zsadbench.clip.windows import (
    WindowEmbeddings,
    encode_windows,
    harmonic_aggregation,
    window_incidence,
    window_indices,
)
from zsadbench.detector import Detector, FewShot
from zsadbench.feature_cache import clip_backbone_description, frozen_stage, transform_description
from zsadbench.registry import register_method
from zsadbench.transforms import ClipTransform
from zsadbench.types import Prediction


@dataclass
class WinClipConfig:
    """WinCLIP / WinCLIP+ settings; defaults are anomalib's (= zqhang's) values."""

    model: str = "ViT-B-16-plus-240"  # open_clip architecture (standard GELU)
    pretrained: str = "laion400m_e31"  # open_clip tag, a local weights file, or "random"
    image_size: int = 240  # native size: 15×15 patch grid
    scales: tuple[int, ...] = (2, 3)  # window sizes in patches
    temperature: float = 0.07  # reference temperature on cosine similarities, not CLIP's learned 1/100
    class_name: str | None = None  # prompt class word; None = the category folder name, underscores kept (zqhang)
    shots: int = 0  # k normal reference images per category for WinCLIP+; 0 = zero-shot
    reference_seed: int = 10  # seed of the reference-image draw (zsadbench's few-shot protocol)
    pos_embed_mode: str = "bicubic"  # positional-embedding resize, only used when image_size != 240
    activation: str = "auto"  # "auto" = anomalib's: the architecture config's (open_clip.create_model), GELU here


@dataclass
class ReferenceMemory:
    """WinCLIP+'s visual memory of one category's k normal reference images."""

    patch_tokens: Tensor  # (k * P, D): ln_post'd final patch tokens, no projection
    windows: list[Tensor]  # per scale: (k * n_windows, E) window embeddings
    shots: int


def class_probability(embeddings: Tensor, text_features: Tensor, temperature: float) -> Tensor:
    """Returns softmax([cos(e, t_normal), cos(e, t_anomalous)] / temperature)[anomalous] for (..., E) embeddings."""
    return class_probabilities(embeddings, text_features, temperature)[..., 1]


def association_score(embeddings: Tensor, memory: Tensor) -> Tensor:
    """Returns (B, N) visual association scores: min over the (M, D) memory of (1 − cos) / 2 for (B, N, D) inputs.

    Clamped at 0: round-off can give cos slightly above 1 for a (near-)duplicate of a reference, and the harmonic
    aggregation would turn a -1e-7 score into an arbitrary value.
    """
    cosine = F.normalize(embeddings, dim=-1) @ F.normalize(memory, dim=-1).T
    return ((1.0 - cosine).amin(dim=-1) / 2.0).clamp_min(0.0)


@register_method("winclip")
class WinClip(Detector, FewShot):
    """WinCLIP (zero-shot) and WinCLIP+ (k normal reference images per category, ``shots`` > 0)."""

    label = "WinCLIP"
    paper = "arXiv:2303.14814"
    reference = "openvinotoolkit/anomalib@161bb36"
    code_license = "Apache-2.0"
    weights_license = "MIT (LAION open_clip weights)"
    Config = WinClipConfig
    # tiny seeded backbone (12-layer vision tower, 80 px: 5×5 grid)
    presets = {"smoke": {"model": "tiny-ViT-B-16-plus-240", "pretrained": "random", "image_size": 80}}
    regression_variants = {"zero-shot": presets["smoke"], "1-shot": {**presets["smoke"], "shots": 1}}

    def __init__(self, config: WinClipConfig | None = None, *, seed: int = 0, **overrides: object) -> None:
        super().__init__(config, seed=seed, **overrides)
        cfg: WinClipConfig = self.config
        if not cfg.scales or any(k < 1 for k in cfg.scales):
            raise ValueError(f"winclip: scales must be positive window sizes, got {cfg.scales}")
        activation = cfg.activation if cfg.activation != "auto" else reference_activation(
            "open_clip", cfg.model, cfg.pretrained, cfg.image_size)
        self.backbone = load_clip(cfg.model, cfg.pretrained, image_size=cfg.image_size,
                                  pos_embed_mode=cfg.pos_embed_mode, activation=activation,  # type: ignore[arg-type]
                                  seed=seed)
        self.clip = self.backbone.model
        grid = self.backbone.grid_size
        self.windows = [window_indices(grid, k) for k in cfg.scales]
        self.incidence = [window_incidence(w, grid[0] * grid[1]) for w in self.windows]
        self.text_cache = TextFeatureCache()
        self.references: dict[str, ReferenceMemory] = {}
        self._transform = ClipTransform(cfg.image_size)

    # ---- preprocessing -----------------------------------------------------------------------------------------------
    def transform(self, image: Image.Image) -> Tensor:
        """Returns the (3, S, S) tensor: PIL bicubic squash to S×S, OpenAI mean/std."""
        return self._transform(image)

    def to(self, device: str | torch.device) -> WinClip:
        """Moves the backbone, window incidences, text features and reference memories to ``device``."""
        super().to(device)
        self.clip.to(self.device)
        self.incidence = [i.to(self.device) for i in self.incidence]
        self.text_cache.to(self.device)
        self.references = {c: ReferenceMemory(m.patch_tokens.to(self.device), [w.to(self.device) for w in m.windows],
                                              m.shots) for c, m in self.references.items()}
        return self

    def describe(self) -> dict[str, object]:
        """Returns the backbone facts (weights id, activation) and the prompt counts."""
        normal, anomalous = compositional_prompts("{}")
        return {**self.backbone.describe(), "prompts_normal": len(normal), "prompts_anomalous": len(anomalous)}

    # ---- 1. text: compositional prompt ensemble ----------------------------------------------------------------------
    def class_word(self, category: str) -> str:
        """Returns the class word used in the prompts of ``category``."""
        return self.config.class_name or category

    def text_features(self, category: str) -> Tensor:
        """Returns (2, E) raw mean text embeddings [normal, anomalous] of ``category`` (computed once, cached)."""
        word = self.class_word(category)

        def compute() -> Tensor:
            return prompt_ensemble_features(self.clip, self.config.model, compositional_prompts(word))

        return self.text_cache.get(word, compute)

    # ---- 2. visual: image and window embeddings ----------------------------------------------------------------------
    @frozen_stage("windows", lambda self: {
        "backbone": clip_backbone_description(self.backbone, self.clip.visual),
        "preprocessing": transform_description(self._transform), "scales": list(self.config.scales),
        "outputs": "ln_post(CLS) @ proj of the image and of each window; ln_post'd final patch tokens"})
    @torch.no_grad()
    def frozen_windows(self, images: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Returns the image embeddings, the window embeddings per scale and the patch tokens: the frozen stage."""
        out = encode_windows(self.clip.visual, images.to(self.device, torch.float32), self.windows, patch_tokens=True)
        assert out.patch_tokens is not None
        return out.image, out.windows, out.patch_tokens

    def encode(self, images: Tensor, patch_tokens: bool = False) -> WindowEmbeddings:
        """Returns the full-image embeddings, the window embeddings per scale and (optionally) the patch tokens."""
        image, windows, patches = self.frozen_windows(images)  # the patch tokens cost one LayerNorm: always kept
        return WindowEmbeddings(image, list(windows), patches if patch_tokens else None)

    # ---- 4. few-shot memory ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_reference(self, images: Tensor, category: str) -> None:
        """Stores the visual memory of ``category``'s k normal reference images (WinCLIP+)."""
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"winclip: reference images of {category!r} must be a non-empty (k, 3, H, W) batch, "
                             f"got shape {tuple(images.shape)}")
        emb = self.encode(images, patch_tokens=True)
        assert emb.patch_tokens is not None
        self.references[category] = ReferenceMemory(
            emb.patch_tokens.reshape(-1, emb.patch_tokens.shape[-1]),
            [w.reshape(-1, w.shape[-1]) for w in emb.windows],
            images.shape[0],
        )

    # ---- 3. + 4. scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and anomaly maps (B, S, S) for a preprocessed batch of ``category``."""
        memory = self.references.get(category)
        if self.shots > 0 and memory is None:
            raise RuntimeError(f"winclip: shots={self.shots} but no reference images were set for category "
                               f"{category!r}; call set_reference(images, {category!r}) first")
        text = self.text_features(category)
        emb = self.encode(images, patch_tokens=memory is not None)
        batch = images.shape[0]
        height, width = self.backbone.grid_size
        temperature = self.config.temperature

        image_scores = class_probability(emb.image, text, temperature)
        scale_maps = [image_scores[:, None].expand(batch, height * width)]
        for window_embeddings, incidence in zip(emb.windows, self.incidence):
            scale_maps.append(harmonic_aggregation(class_probability(window_embeddings, text, temperature), incidence))
        grid_map = harmonic_mean(*scale_maps)

        if memory is not None:
            assert emb.patch_tokens is not None
            few_shot_maps = [association_score(emb.patch_tokens, memory.patch_tokens)]
            for window_embeddings, reference, incidence in zip(emb.windows, memory.windows, self.incidence):
                few_shot_maps.append(harmonic_aggregation(association_score(window_embeddings, reference), incidence))
            few_shot = torch.stack(few_shot_maps).mean(dim=0)
            grid_map = (grid_map + few_shot) / 2
            image_scores = (image_scores + few_shot.amax(dim=-1)) / 2

        maps = F.interpolate(grid_map.reshape(batch, 1, height, width), size=tuple(images.shape[-2:]),
                             mode="bilinear", align_corners=False)
        return Prediction(image_scores, maps[:, 0])
