"""AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection (Zhou et al., ICLR 2024).

Paper: https://arxiv.org/abs/2310.18961. Reference implementation: zqhang/AnomalyCLIP @45ed4dd (train.py, test.py,
prompt_ensemble.py, loss.py, AnomalyCLIP_lib/); documentation: docs/methods/anomalyclip.md.

Method, as implemented:

1. Backbone: OpenAI CLIP ViT-L/14@336px with QuickGELU, fp32, frozen; 518×518 input (PIL bicubic squash, OpenAI
   mean/std), positional embedding resized 24×24 → 37×37 **bilinearly** (not open_clip's antialiased bicubic).
2. Diagonally prominent attention map (DPAM): from block 6 on, a V-V attention path (q = k = v) runs beside the
   original one (zsadbench.clip.dual_path). Patch features = ln_post(v_24) @ proj (**layer 24 only**: the released
   checkpoints were trained with the multi-layer-copy bug that made all four "layers" equal to layer 24,
   zqhang/AnomalyCLIP#18/#82); global feature = o_24[CLS] @ proj **without ln_post** (#14).
3. Object-agnostic text prompts: "[V1..V12] object." and "[W1..W12] damaged object." with 12 learned context vectors
   each, plus deep prompts (4 tokens, shared by both) that overwrite token positions 1..4 of text blocks 2..9,
   rounded to fp16 as the reference does (zsadbench.clip.prompts).
4. Scoring: probabilities softmax(cos / 0.07) over {normal, abnormal}. Image score = P(abnormal) of the global
   feature. Map = (S_abn + 1 − S_norm) / 2 (= S_abn) of the patch probabilities, bilinearly upsampled to the input
   size (probabilities, not logits), summed over the map layers, then a scipy-style Gaussian with σ = 4.
5. Training on auxiliary data (another dataset's test split): only the prompts learn. Loss = CE(global logits) +
   λ·Σ_layers [focal(S, gt) + Dice(S_abn, gt) + Dice(S_norm, 1 − gt)] with λ = 4 (current train.py; equal to the
   released checkpoints' objective with four identical layers); Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15
   epochs, seed 111.

Checkpoints: zsadbench's own (``zsadbench train``: the learnable prompts only, 43,008 numbers for ViT-L) and the
authors' released ``{"prompt_learner": ...}`` files (checkpoints/9_12_4_multiscale{,_visa}/epoch_15.pth).

Deliberate deviations from the reference:

- Random draws differ: the prompts are initialised from their own generator (seed ``train.seed``) and batches are
  shuffled by a dedicated generator, whereas the reference draws both from the global RNG after building the model;
  the same seed therefore gives different (equally distributed) initial prompts and batch orders.
- Batches of any size are scored at once (the reference test loop assumes batch size 1); a last training batch of one
  image works (the reference's ``squeeze()`` breaks it).
- Attention runs through ``scaled_dot_product_attention`` and prompts are encoded only up to their end-of-text token
  (causal mask): the same features up to float round-off (~1e-6 relative).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.clip.learned_parts import LearnedPartsDetector
from zsadbench.clip.prompts import ANOMALYCLIP_TEXTS, LearnablePrompts
from zsadbench.clip.scoring import class_logits, class_probabilities, patch_probability_maps
from zsadbench.filters import gaussian_filter
from zsadbench.losses import binary_dice_loss, focal_loss
from zsadbench.registry import register_method
from zsadbench.training import TrainConfig
from zsadbench.types import Prediction, Sample


@dataclass
class AnomalyCLIPConfig:
    """AnomalyCLIP settings; defaults are the reference's (train.sh / test.sh, design ``9_12_4_multiscale``)."""

    model: str = "ViT-L-14-336-quickgelu"  # open_clip architecture; QuickGELU as the OpenAI weights were trained
    pretrained: str = "openai"  # open_clip tag, a local weights file, or "random"
    image_size: int = 518
    pos_embed_mode: str = "bilinear"  # the reference's F.interpolate(mode="bilinear") of the 24×24 grid
    activation: str = "auto"  # "auto" = the reference's: QuickGELU always (its OpenAI CLIP code hard-codes it)
    vv_start_layer: int = 6  # first V-V (DPAM) block: DPAM_layer=20 replaces blocks -1..-19 of 24
    feature_layers: tuple[int, ...] = (24,)  # V-V layers whose maps are summed; 24 only (see the module docstring)
    n_ctx: int = 12  # learnable context vectors per prompt ("Prompt_length")
    deep_prompt_depth: int = 9  # deep prompts in text blocks 2..depth ("learnabel_text_embedding_depth")
    deep_prompt_length: int = 4  # tokens per deep prompt ("learnabel_text_embedding_length")
    fp16_deep_prompts: bool = True  # the reference rounds the deep prompts to fp16
    temperature: float = 0.07  # fixed, not CLIP's learned logit scale
    sigma: float = 4.0  # Gaussian smoothing of the 518×518 map (scipy defaults otherwise)
    local_loss_weight: float = 4.0  # λ on the focal + Dice terms (train.py ``lam``)
    checkpoint: str | None = None  # trained prompts: a zsadbench checkpoint or the authors' epoch_15.pth
    train: TrainConfig = field(default_factory=TrainConfig)  # epochs 15, batch 8, Adam 1e-3 (0.5, 0.999), seed 111


@register_method("anomalyclip")
class AnomalyCLIP(LearnedPartsDetector):
    """AnomalyCLIP: object-agnostic learnable prompts scored against DPAM (V-V) patch features."""

    label = "AnomalyCLIP"
    paper = "arXiv:2310.18961"
    reference = "zqhang/AnomalyCLIP@45ed4dd"
    code_license = "MIT"
    weights_license = "MIT (OpenAI CLIP; released prompts)"
    Config = AnomalyCLIPConfig
    reference_checkpoint_entries = ("prompt_learner",)  # train.py saves nothing else
    # untrained prompts on a tiny seeded backbone: guards the whole inference path (DPAM, prompts, scoring, smoothing)
    presets = {"smoke": {"model": "tiny-ViT-L-14-336-quickgelu", "pretrained": "random", "image_size": 56}}
    regression_variants = {"zero-shot": presets["smoke"]}

    # ---- learned parts: the prompts of 3. ----------------------------------------------------------------------------
    def build_learnable_parts(self) -> None:
        """Creates the learnable prompts (subclasses add their parts here, before a checkpoint is loaded)."""
        cfg: AnomalyCLIPConfig = self.config
        self.prompt_learner = LearnablePrompts(
            self.clip, cfg.model, n_ctx=cfg.n_ctx, texts=ANOMALYCLIP_TEXTS, deep_depth=cfg.deep_prompt_depth,
            deep_length=cfg.deep_prompt_length, fp16_deep_prompts=cfg.fp16_deep_prompts, seed=cfg.train.seed)
        self._text_features: Tensor | None = None  # cached (2, E) for inference

    def learnable_modules(self) -> dict[str, nn.Module]:
        """Returns the learnable parts by checkpoint key prefix: the prompts (subclasses add theirs)."""
        return {"prompt_learner": self.prompt_learner}

    def clear_caches(self) -> None:
        """Drops the cached text features (the prompts changed, moved or switched to training)."""
        self._text_features = None

    # ---- 2. visual features (DPAM): LearnedPartsDetector.encode_images (global and per-layer patch features) ---------

    # ---- 3. text features (object-agnostic prompts) ------------------------------------------------------------------
    def text_features(self) -> Tensor:
        """Returns the (2, E) [normal, abnormal] text features for inference (computed once per prompt state)."""
        if self._text_features is None:
            with torch.no_grad():
                self._text_features = self.prompt_learner(self.clip).detach()
        return self._text_features

    # ---- 4. scoring --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and anomaly maps (B, S, S) for a preprocessed batch (the category is not used)."""
        del category  # object-agnostic: the same prompts for every category
        self.warn_if_untrained()
        text = self.text_features()
        global_features, patch_features = self.encode_images(images)
        scores = class_probabilities(global_features, text, self.config.temperature)[:, 1]
        maps = torch.zeros((images.shape[0], *self.input_size), device=self.device)
        for features in patch_features:
            probabilities = patch_probability_maps(features, text, self.config.temperature, self.input_size)
            maps = maps + (probabilities[:, 1] + 1 - probabilities[:, 0]) / 2
        return Prediction(scores, gaussian_filter(maps, self.config.sigma))

    # ---- 5. training -------------------------------------------------------------------------------------------------
    def training_step(self, images: Tensor, masks: Tensor, labels: Tensor,
                      samples: Sequence[Sample] = ()) -> dict[str, Tensor]:
        """Returns the reference losses of one batch: CE on the global logits + λ·(focal + 2 Dice) per map layer."""
        del samples  # object-agnostic: the pixels and labels are all it learns from
        cfg = self.config
        global_features, patch_features = self.encode_images(images)
        text = self.prompt_learner(self.clip)
        logits = class_logits(global_features, text, cfg.temperature)
        image_loss = F.cross_entropy(logits, labels.long())
        focal = dice_abnormal = dice_normal = logits.new_zeros(())
        for features in patch_features:
            probabilities = patch_probability_maps(features, text, cfg.temperature, self.input_size)
            focal = focal + focal_loss(probabilities, masks)
            dice_abnormal = dice_abnormal + binary_dice_loss(probabilities[:, 1], masks)
            dice_normal = dice_normal + binary_dice_loss(probabilities[:, 0], 1 - masks)
        loss = cfg.local_loss_weight * (focal + dice_abnormal + dice_normal) + image_loss
        self.clear_caches()
        self._fitted = True
        return {"loss": loss, "image_loss": image_loss.detach(), "focal": focal.detach(),
                "dice_abnormal": dice_abnormal.detach(), "dice_normal": dice_normal.detach()}

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def state_description(self) -> str:
        """Returns what the learnable state holds, for error messages."""
        return (f"{self.display_name()} state (n_ctx {self.config.n_ctx}, deep prompts "
                f"{self.config.deep_prompt_depth - 1} x {self.config.deep_prompt_length})")

    def is_reference_checkpoint(self, checkpoint: dict[str, Any]) -> bool:
        """Returns whether ``checkpoint`` is the authors' ``{"prompt_learner": ...}`` layout (released epoch_15.pth)."""
        return isinstance(checkpoint.get("prompt_learner"), dict)

    def load_reference_checkpoint(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Loads the prompts of a file in the authors' layout (epoch_15.pth)."""
        self.prompt_learner.load_reference_state(checkpoint["prompt_learner"], str(path))
