"""APRIL-GAN: A Zero-/Few-Shot Anomaly Classification and Segmentation Method for CVPR 2023 VAND Workshop Challenge
Tracks 1&2: 1st Place on Zero-shot AD and 4th Place on Few-shot AD (Chen, Han and Zhang, CVPR 2023 VAND workshop).

Paper: https://arxiv.org/abs/2305.17382. Reference implementation: ByChelsea/VAND-APRIL-GAN @f13b8a6 (MIT; read,
not copied); released adapters: ``exps/pretrained/{mvtec,visa}_pretrained.pth`` in that repository.

Method, as implemented (the reference's test.py / train.py with its shell scripts' settings):

1. Backbone (frozen, fp32): CLIP ViT-L/14@336px with the OpenAI weights at 518 px. The reference rebuilds the model
   from open_clip's ``ViT-L-14-336`` config whenever the size differs from 336, so it runs the OpenAI weights with
   **exact GELU** (not QuickGELU) and open_clip's antialiased bicubic resize of the positional embedding (24² → 37²).
   Patch tokens: the raw residual stream after blocks 6, 12, 18 and 24 (no ``ln_post``, no projection), CLS dropped;
   the image feature is CLIP's own embedding ``ln_post(CLS) @ proj``.
2. Text: per category, a prompt ensemble of 7 normal / 5 anomalous states × 35 templates with the category's folder
   name as the class word (underscores kept); each sentence embedding L2-normalised, averaged per state group,
   normalised again: T (2, E).
3. Zero-shot (the challenge's track 1): one linear layer per tapped block maps patch tokens (1024 → 768, with bias)
   into the joint space: logits ``100 · cos(W_l x + b_l, T)``, upsampled bilinearly (align_corners True) to the input
   size, softmax over {normal, anomalous} per pixel; the map is the **sum** over the four layers of the anomalous
   probability (values in [0, 4]; no smoothing). The image score is CLIP's zero-shot probability
   ``softmax(100 · cos(g, T))[anomalous]`` of the image feature g (the adapters do not touch it).
4. Few-shot (``shots`` = k, track 2): a memory of the raw patch tokens of k normal images per category (the same four
   blocks, no adapter); each query patch's distance ``min_j (1 - cos(q, m_j))`` to the memory, upsampled bilinearly
   (align_corners True), summed over the layers and **added** to the zero-shot map. The image score is
   ``½ (p + minmax(max M))`` with the map maxima min-max normalised over the category's test images, so the few-shot
   mode is transductive (it scores a whole category at once).
5. Training (the linear layers only) on another dataset's test split: per layer focal loss (γ 2) on the two-class
   probabilities plus binary Dice on the anomalous one, summed over the layers; Adam lr 1e-3, betas (0.5, 0.999),
   batch 8, seed 111. The reference trains 15 epochs on VisA (``visa_pretrained.pth``, evaluated on MVTec AD) and 3 on
   MVTec AD (``mvtec_pretrained.pth``, evaluated on everything else; ``--epochs 3``).

Checkpoints: zsadbench's own and the authors' ``{"trainable_linearlayer": {"fc.<l>.weight", "fc.<l>.bias"}}`` files.

Deliberate deviations from the reference:

- fp32 throughout; the reference computes under ``torch.cuda.amp.autocast`` (fp16 on a GPU, fp32 on a CPU).
- The reference's MVTec AD training stitches, with probability ``aug_rate`` 0.2, four random test images of the
  category into a 2×2 mosaic; not implemented (the VisA recipe, which has no augmentation, is exact).
- Random draws differ: the linear layers are initialised by PyTorch's defaults under a private generator seeded with
  ``train.seed`` (the reference's are drawn after the backbone's initialisation); the few-shot images are drawn with
  the project's :meth:`~zsadbench.detector.FewShot.reference_indices` (``torch.manual_seed(reference_seed)``, k draws
  with replacement, per category) where the reference draws every category in turn from one seeded stream (so a
  category's draw depends on the categories and the meta.json file order before it); the default seed is the
  reference scripts' 42.
- Training Dice is per image for every batch; the reference's ``mask.squeeze()`` turns a last batch of one image into
  per-row Dice terms.
- The few-shot image score of a category whose test maps all have the same maximum is ``½ p`` (the reference divides
  by zero).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.checkpoints import CheckpointError, check_keys
from zsadbench.clip.backbone import ClipBackbone, load_clip
from zsadbench.clip.learned_parts import LearnedPartsDetector
from zsadbench.clip.scoring import upsampled_logit_probabilities
from zsadbench.clip.text import (
    APRILGAN_ANOMALOUS_STATES,
    APRILGAN_NORMAL_STATES,
    APRILGAN_TEMPLATES,
    TextFeatureCache,
    compositional_prompts,
    prompt_ensemble_features,
)
from zsadbench.clip.vision import forward_vision
from zsadbench.detector import FewShot, ImageSet
from zsadbench.feature_cache import clip_backbone_description, frozen_stage, transform_description
from zsadbench.losses import binary_dice_loss, focal_loss
from zsadbench.registry import register_method
from zsadbench.training import TrainConfig
from zsadbench.types import Prediction, Sample


@dataclass
class AprilGANConfig:
    """APRIL-GAN settings; defaults are the reference's (train.sh, test_zero_shot.sh, test_few_shot.sh)."""

    model: str = "ViT-L-14-336"  # exact GELU: the reference rebuilds CLIP from this config at 518 px
    pretrained: str = "openai"  # open_clip tag, a local weights file, or "random"
    image_size: int = 518
    pos_embed_mode: str = "bicubic-antialias"  # open_clip's resize_pos_embed, which the reference's factory calls
    activation: str = "auto"  # auto: the reference's rule, exact GELU whenever image_size differs from the native size
    feature_layers: tuple[int, ...] = (6, 12, 18, 24)  # "features_list": blocks whose patch tokens the adapters map
    memory_layers: tuple[int, ...] = (6, 12, 18, 24)  # "few_shot_features": blocks of the few-shot memory
    class_name: str | None = None  # prompt class word; None = the category folder name, underscores kept
    logit_scale: float = 100.0  # the reference's fixed 100 · cos (not the model's learned logit_scale)
    shots: int = 0  # k normal reference images per category (0 = zero-shot)
    reference_seed: int = 42  # seed of the per-category few-shot draw (test_few_shot.sh: --seed 42)
    checkpoint: str | None = None  # a zsadbench checkpoint or the authors' {mvtec,visa}_pretrained.pth
    train: TrainConfig = field(default_factory=lambda: TrainConfig(seed=111))


# ---- 3. the linear adapters ------------------------------------------------------------------------------------------

class PatchAdapters(nn.Module):
    """One linear layer per tapped block, mapping its patch tokens into the joint image-text space.

    The module's keys (``fc.<l>.weight``, ``fc.<l>.bias``) are the reference's ``LinearLayer`` ones.
    """

    def __init__(self, width: int, embed_dim: int, layers: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(width, embed_dim) for _ in range(layers))

    def forward(self, patch_tokens: Sequence[Tensor]) -> list[Tensor]:
        """Returns the (B, P, E) mapped tokens of each layer's (B, P, D) patch tokens (CLS already dropped)."""
        if len(patch_tokens) != len(self.fc):
            raise ValueError(f"{len(patch_tokens)} token layers for {len(self.fc)} adapters")
        return [fc(tokens) for fc, tokens in zip(self.fc, patch_tokens)]


# ---- the detector ----------------------------------------------------------------------------------------------------

@register_method("aprilgan")
class AprilGAN(LearnedPartsDetector, FewShot):
    """APRIL-GAN (VAND 2023): linear patch adapters scored against a prompt ensemble; a k-shot patch memory."""

    label = "APRIL-GAN"
    paper = "arXiv:2305.17382"
    reference = "ByChelsea/VAND-APRIL-GAN@f13b8a6"
    code_license = "MIT"
    weights_license = "MIT (OpenAI CLIP); released adapters: per the reference's README"
    Config = AprilGANConfig
    learned_parts = "adapters"
    # untrained adapters on a tiny seeded exact-GELU backbone: guards the zero-shot maps and the memory branch
    regression_variants = {
        "zero-shot": {"model": "tiny-ViT-L-14-336", "pretrained": "random", "image_size": 56},
        "1-shot": {"model": "tiny-ViT-L-14-336", "pretrained": "random", "image_size": 56, "shots": 1},
    }

    def __init__(self, config: AprilGANConfig | None = None, *, seed: int = 0, **overrides: object) -> None:
        super().__init__(config, seed=seed, **overrides)
        if self.config.shots < 0:
            raise ValueError(f"aprilgan: shots must be >= 0, got {self.config.shots}")
        # k-shot scores are min-max normalised over a category's test images: the evaluator hands over the whole set
        self.transductive = self.shots > 0  # type: ignore[misc]
        self.memories: dict[str, list[Tensor]] = {}  # category -> per memory layer (k·P, D) normal patch tokens
        self._text = TextFeatureCache()

    def load_backbone(self, seed: int) -> ClipBackbone:
        """Returns the frozen CLIP; ``activation="auto"`` follows the reference's rule (see the config)."""
        cfg: AprilGANConfig = self.config
        activation = cfg.activation
        architecture = open_clip.get_model_config(cfg.model)
        if activation == "auto" and architecture is not None:
            native = int(architecture["vision_cfg"]["image_size"])
            if cfg.image_size != native:  # CLIP(**config): the config's own activation, whatever the weights
                activation = "quick_gelu" if architecture.get("quick_gelu", False) else "gelu"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="ACTIVATION MISMATCH")  # GELU with OpenAI weights is intended
            return load_clip(cfg.model, cfg.pretrained, image_size=cfg.image_size,
                             pos_embed_mode=cfg.pos_embed_mode,  # type: ignore[arg-type]
                             activation=activation, seed=seed)  # type: ignore[arg-type]

    # ---- learned parts -----------------------------------------------------------------------------------------------
    def build_learnable_parts(self) -> None:
        """Creates the linear adapters with PyTorch's default initialisation, seeded by ``train.seed``."""
        cfg: AprilGANConfig = self.config
        width = int(self.clip.visual.conv1.out_channels)
        embed_dim = int(self.clip.text_projection.shape[1])
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the global RNG
            torch.manual_seed(cfg.train.seed)
            self.adapters = PatchAdapters(width, embed_dim, len(cfg.feature_layers))

    def learnable_modules(self) -> dict[str, nn.Module]:
        """Returns the linear adapters by checkpoint key prefix."""
        return {"adapters": self.adapters}

    def to(self, device: str | torch.device) -> AprilGAN:
        """Moves the backbone, the adapters, the text features and the few-shot memories to ``device``."""
        super().to(device)
        self._text.to(self.device)
        self.memories = {c: [m.to(self.device) for m in layers] for c, layers in self.memories.items()}
        return self

    # ---- 1. visual features ------------------------------------------------------------------------------------------
    def encode_tokens(self, images: Tensor, layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """Returns CLIP's image embedding g (B, E) and the raw (B, P, D) patch tokens after each block of ``layers``."""
        pooled, tokens = self.frozen_tokens(images)
        by_layer = dict(zip(self.tapped_layers(), tokens))
        return pooled, [by_layer[layer] for layer in layers]

    def tapped_layers(self) -> list[int]:
        """Returns the blocks whose tokens any step reads: the feature and the memory layers."""
        return sorted(set(self.config.feature_layers) | set(self.config.memory_layers))

    @frozen_stage("tokens", lambda self: {
        "backbone": clip_backbone_description(self.backbone, self.clip.visual),
        "preprocessing": transform_description(self._transform), "layers": self.tapped_layers(),
        "outputs": "pooled ln_post(CLS) @ proj; raw patch tokens after each layer"})
    @torch.no_grad()
    def frozen_tokens(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Returns the pooled embedding and the patch tokens of :meth:`tapped_layers`: the frozen stage (cached)."""
        layers = self.tapped_layers()
        out = forward_vision(self.clip.visual, images.to(self.device, torch.float32), taps=tuple(layers))
        return out.pooled, [out.taps[layer][:, 1:] for layer in layers]

    # ---- 2. text features --------------------------------------------------------------------------------------------
    def class_word(self, category: str) -> str:
        """Returns the class word of ``category``'s prompts."""
        return self.config.class_name or category

    def text_features(self, category: str) -> Tensor:
        """Returns T (2, E): the normalised means of the normalised [normal, anomalous] sentence embeddings."""
        word = self.class_word(category)

        def compute() -> Tensor:
            prompts = compositional_prompts(word, APRILGAN_NORMAL_STATES, APRILGAN_ANOMALOUS_STATES,
                                            APRILGAN_TEMPLATES)
            features = prompt_ensemble_features(self.clip, self.config.model, prompts, normalize_each=True)
            return F.normalize(features, dim=-1)

        return self._text.get(word, compute)

    # ---- 3. zero-shot ------------------------------------------------------------------------------------------------
    def layer_probabilities(self, patch_tokens: Sequence[Tensor], text: Tensor) -> list[Tensor]:
        """Returns per adapted layer (B, 2, H, W) [normal, anomalous] probabilities against (2, E) or (B, 2, E) T."""
        return [upsampled_logit_probabilities(tokens, text, self.config.logit_scale, self.input_size)
                for tokens in self.adapters(patch_tokens)]

    def image_probability(self, image_features: Tensor, text: Tensor) -> Tensor:
        """Returns (B,) the zero-shot probability that each image is anomalous: softmax(100 · cos(g, T))[1]."""
        cosine = F.normalize(image_features, dim=-1) @ text.T
        return (self.config.logit_scale * cosine).softmax(dim=-1)[:, 1]

    def zero_shot(self, image_features: Tensor, patch_tokens: Sequence[Tensor],
                  category: str) -> tuple[Tensor, Tensor]:
        """Returns (image probabilities (B,), zero-shot maps (B, H, W): the sum over layers of P(anomalous)).

        ``patch_tokens``: the raw patch tokens of the ``feature_layers``, in that order.
        """
        text = self.text_features(category)
        probabilities = self.layer_probabilities(patch_tokens, text)
        maps = torch.stack([p[:, 1] for p in probabilities]).sum(dim=0)
        return self.image_probability(image_features, text), maps

    # ---- 4. few-shot memory ------------------------------------------------------------------------------------------
    def set_reference(self, images: Tensor, category: str) -> None:
        """Stores the patch tokens of ``category``'s k normal images (every memory layer), pooled over the images."""
        if self.shots == 0:
            raise RuntimeError("aprilgan: set_reference needs shots > 0")
        if images.dim() != 4 or len(images) == 0:
            raise ValueError(f"aprilgan: reference images of {category!r} must be a non-empty (k, 3, H, W) batch, "
                             f"got shape {tuple(images.shape)}")
        _, tokens = self.encode_tokens(images, self.config.memory_layers)
        self.memories[category] = [t.reshape(-1, t.shape[-1]) for t in tokens]

    def memory_distance(self, patch_tokens: Sequence[Tensor], category: str) -> Tensor:
        """Returns (B, H, W): per layer each patch's cosine distance to its nearest memory patch, upsampled, summed.

        ``patch_tokens``: the raw patch tokens of the ``memory_layers``, in that order.
        """
        memory = self.memories.get(category)
        if memory is None:
            raise RuntimeError(f"aprilgan: shots={self.shots} but no reference images were set for category "
                               f"{category!r}; call set_reference(images, {category!r}) first")
        total = torch.zeros(())
        for tokens, normal in zip(patch_tokens, memory, strict=True):
            distance = (1.0 - F.normalize(tokens, dim=-1) @ F.normalize(normal, dim=-1).T).amin(dim=-1)
            side = int(distance.shape[1] ** 0.5)
            grid = distance.reshape(-1, 1, side, side)
            total = total + F.interpolate(grid, size=self.input_size, mode="bilinear", align_corners=True)[:, 0]
        return total

    # ---- inference ---------------------------------------------------------------------------------------------------
    def score_batch(self, images: Tensor, category: str) -> tuple[Tensor, Tensor]:
        """Returns (zero-shot image probabilities (B,), maps (B, H, W)) of a batch; one forward serves both branches."""
        cfg: AprilGANConfig = self.config
        memory_layers = tuple(cfg.memory_layers) if self.shots > 0 else ()
        layers = sorted(set(cfg.feature_layers) | set(memory_layers))
        image_features, tokens = self.encode_tokens(images, layers)
        by_layer = dict(zip(layers, tokens))
        probabilities, maps = self.zero_shot(image_features, [by_layer[k] for k in cfg.feature_layers], category)
        if memory_layers:
            maps = maps + self.memory_distance([by_layer[k] for k in memory_layers], category)
        return probabilities, maps

    @torch.no_grad()
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and anomaly maps (B, S, S); with shots > 0 the batch is the whole category."""
        if self.shots > 0:
            return self.predict_set(ImageSet.from_tensor(images, batch_size=max(1, len(images))), category)
        self.warn_if_untrained()
        return Prediction(*self.score_batch(images, category))

    @torch.no_grad()
    def predict_set(self, images: ImageSet, category: str) -> Prediction:
        """Returns the scores and maps of a whole category (k-shot: image scores min-max normalised over it)."""
        self.warn_if_untrained()
        batches = [self.score_batch(batch, category) for batch in images.batches()]
        probabilities, maps = torch.cat([p for p, _ in batches]), torch.cat([m for _, m in batches])
        if self.shots == 0:
            return Prediction(probabilities, maps)
        maxima = maps.flatten(1).amax(dim=1)
        spread = maxima.max() - maxima.min()
        normalised = (maxima - maxima.min()) / spread if spread > 0 else torch.zeros_like(maxima)
        return Prediction(0.5 * (probabilities + normalised), maps)

    # ---- 5. training -------------------------------------------------------------------------------------------------
    def training_step(self, images: Tensor, masks: Tensor, labels: Tensor,
                      samples: Sequence[Sample] = ()) -> dict[str, Tensor]:
        """Returns the summed per-layer focal and Dice losses of one batch (each image scored with its class text)."""
        if len(samples) != len(images):
            raise ValueError("aprilgan training needs each image's sample (its category selects the text features)")
        _, patch_tokens = self.encode_tokens(images, self.config.feature_layers)
        text = torch.stack([self.text_features(sample.category) for sample in samples])
        target = (masks > 0.5).to(torch.float32)
        focal, dice = [], []
        for probabilities in self.layer_probabilities(patch_tokens, text):
            focal.append(focal_loss(probabilities, target))
            dice.append(binary_dice_loss(probabilities[:, 1], target))
        self._fitted = True
        losses = {"focal": torch.stack(focal).sum(), "dice": torch.stack(dice).sum()}
        return {"loss": losses["focal"] + losses["dice"], **{k: v.detach() for k, v in losses.items()}}

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def state_description(self) -> str:
        """Returns what the learned state holds, for error messages."""
        fc = self.adapters.fc[0]
        return (f"APRIL-GAN adapters ({len(self.config.feature_layers)} linear layers "
                f"{fc.in_features} -> {fc.out_features})")

    def reference_state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Returns the adapters in the authors' layout: ``{"trainable_linearlayer": {"fc.<l>.weight", ...}}``."""
        return {"trainable_linearlayer": {k: v.detach().cpu().clone() for k, v in self.adapters.state_dict().items()}}

    def is_reference_checkpoint(self, checkpoint: dict[str, Any]) -> bool:
        """Returns whether ``checkpoint`` is the authors' ``{"trainable_linearlayer": ...}`` layout."""
        return isinstance(checkpoint.get("trainable_linearlayer"), dict)

    def load_reference_checkpoint(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Loads the authors' ``{"trainable_linearlayer": ...}`` file (mvtec_pretrained.pth, visa_pretrained.pth)."""
        state = checkpoint["trainable_linearlayer"]
        expected = {k: tuple(v.shape) for k, v in self.adapters.state_dict().items()}
        check_keys(state, expected, f"checkpoint {path}: trainable_linearlayer of {self.state_description()}")
        try:
            self.adapters.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # e.g. a non-tensor value under a right key
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
