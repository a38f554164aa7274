"""VCP-CLIP: A Visual Context Prompting Model for Zero-Shot Anomaly Segmentation (Qu et al., ECCV 2024).

Paper: https://arxiv.org/abs/2407.12276. Reference implementation: xiaozhen228/VCP-CLIP @4dd96ec (train.py, test.py,
models/; its README says MIT, it ships no LICENSE file; read, not copied); released weights: ``train_visa.pth`` /
``train_mvtec.pth`` (Google Drive links in its README), the layout :meth:`VCPCLIP.load_reference_checkpoint` reads.
Documentation: docs/methods/vcpclip.md.

Method, as implemented (the reference's defaults: train.sh / test.sh):

1. Backbone (frozen, fp32): OpenAI ViT-L/14@336px at 518 px as the authors' CLIP copy builds it
   (zsadbench.clip.qu_clip): **exact GELU** in both towers, positional embedding resized 24×24 → 37×37 by bicubic
   interpolation **with antialias**. Taps: the raw residual stream after vision blocks 6, 12, 18, 24 (no ln_post);
   global embedding ``ln_post(CLS) @ proj``.
2. Pre-VCP (zsadbench.clip.visual_context.ContextPrompting): r = 2 per-image class vectors = learned queries +
   Conv1d(1 → r, k 3) of the global embedding, written into the ``<|class|>`` slot of "a photo of a good <|class|>" and
   "a photo of a damaged <|class|>" (zsadbench.clip.qu_clip.splice_context).
3. Text encoder with learned text embeddings (n = 1 token): inserted after the start token before block 1, replaced at
   the input of blocks 2..12 (``prompt_proj``, dropout 0.1 while training), removed, then ``prompt_norm`` and
   ``ln_final``; pooled at the (shifted) end-of-text token, projected, normalised; per state the normalised mean over
   its templates, normalised: (B, 2, E) text per image.
4. Pre-VCP map ("raw"): per tap a linear layer (vision width → E) of the patch tokens, normalised;
   logits ``exp(τ1) · patch · text`` upsampled bilinearly (align_corners True) to the input size, softmax over
   {normal, abnormal}; the four layers' abnormal probabilities averaged.
5. Post-VCP map ("new", zsadbench.clip.visual_context.PromptGuidedAttention): the text attends (8 heads, 1×1 Conv1d
   projections, unscaled logits) to the normalised raw patch tokens of each tap; the refined, normalised text
   (vision width) scores those tokens: ``exp(τ2) · patch · refined``, upsampled and softmaxed as in 4, averaged.
6. Scores: map = Gaussian σ = 8 (scipy's) of 0.2 · raw + 0.8 · new; image score = mean of the 2000 largest pixels of
   the raw map + the same of the new map (unsmoothed).
7. Training on auxiliary data (the other dataset's test split, every category): frozen CLIP; the linear layers, the
   pre-VCP, the post-VCP and the text embeddings learn. Loss = Σ_taps [focal + Dice(abnormal)] of the raw maps +
   the same of the new maps. Adam betas (0.5, 0.999): lr 4e-5 (train.sh on VisA; 2e-5 on MVTec AD) except the two
   temperatures τ1, τ2 at 0.01; batch 32, 10 epochs, seed 333.

Checkpoints: zsadbench's (``<part>.<key>``: patch_projections, pre_vcp, post_vcp, text_prompts) and the authors'
(``{"trainable_linearlayer": ..., "New_Lan_Embed": ..., "Zero_try": ...}`` plus the text embeddings at top level:
``prompt_embeddings``, ``deep_prompt_embeddings``, ``prompt_proj.*``, ``prompt_norm.*``, ``prompt_text_projection``).

Deliberate deviations from the reference:

- Per-category min-max normalisation of the maps and of the image scores (test.py ``normalize`` and the ``pr_sp``
  rescaling) is left out: it is a monotone map per category, so every metric but none of the ranking changes; the
  raw values are what zsadbench stores and compares.
- fp32 throughout; the reference runs under CUDA autocast (fp16).
- Training: no augmentation (the reference's albumentations rotate/colour/noise and, on MVTec AD, 2×2 mosaics with
  probability 0.2) and no per-epoch validation on the other dataset; every epoch's checkpoint is kept. Initial values
  come from a generator seeded by ``train.seed``, not from the global RNG after building the model, and dropout masks
  are drawn differently. At batch 1 the reference's ``squeeze()`` turns the Dice into one over image rows; here it is
  always per image.
- Fewer than 2000 pixels (tiny test inputs): the image score takes all of them. The text sequences are cut after
  the end-of-text token (causal mask: the same features up to float summation order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.checkpoints import check_keys
from zsadbench.clip.learned_parts import LearnedPartsDetector
from zsadbench.clip.qu_clip import (
    QU_ACTIVATION,
    QU_POS_EMBED_MODE,
    end_of_text_id,
    end_of_text_positions,
    placeholder_tokens,
    splice_context,
)
from zsadbench.clip.text import TextTower
from zsadbench.clip.vision import forward_vision
from zsadbench.clip.visual_context import (
    ContextPrompting,
    InsertedTextPrompts,
    PromptGuidedAttention,
    encode_text_with_inserted_prompts,
)
from zsadbench.filters import gaussian_filter
from zsadbench.losses import binary_dice_loss, focal_loss
from zsadbench.registry import register_method
from zsadbench.training import TrainConfig
from zsadbench.types import Prediction, Sample

# the reference's Prompt_Ensemble (models/prompt_ensemble.py): one template per state
NORMAL_TEMPLATES = ("a photo of a good <|class|>",)
ABNORMAL_TEMPLATES = ("a photo of a damaged <|class|>",)
# zsadbench part name -> the authors' checkpoint entry (the text embeddings sit at the top level of their files)
REFERENCE_PARTS = {"patch_projections": "trainable_linearlayer", "pre_vcp": "New_Lan_Embed", "post_vcp": "Zero_try"}
TEXT_PART = "text_prompts"


@dataclass
class VCPCLIPConfig:
    """VCP-CLIP settings; defaults are the reference's (train.sh / test.sh)."""

    model: str = "ViT-L-14-336"  # open_clip architecture (the reference's models/model_configs/ViT-L-14-336.json)
    pretrained: str = "openai"  # open_clip tag, a local weights file, or "random"
    image_size: int = 518
    pos_embed_mode: str = QU_POS_EMBED_MODE  # bicubic with antialias (the reference's resize_pos_embed)
    activation: str = QU_ACTIVATION  # exact GELU in both towers, whatever the weights (the reference's transformer.py)
    feature_layers: tuple[int, ...] = (6, 12, 18, 24)  # --features_list
    prompt_len: int = 2  # r: class vectors per image (--prompt_len)
    deep_prompt_len: int = 1  # n: learned text tokens per text block (--deep_prompt_len)
    prompt_dropout: float = 0.1  # on the text embeddings while training (the reference's prompt_dropout)
    post_vcp_heads: int = 8
    use_global: bool = True  # pre-VCP adds the image's global context (--use_global)
    normal_templates: tuple[str, ...] = NORMAL_TEMPLATES
    abnormal_templates: tuple[str, ...] = ABNORMAL_TEMPLATES
    raw_weight: float = 0.2  # alpha of the map fusion: alpha · pre-VCP map + (1 - alpha) · post-VCP map
    sigma: float = 8.0
    image_score_top_k: int = 2000  # pixels averaged per map for the image score (test.py can_k)
    temperature_lr: float = 0.01  # learning rate of τ1 and τ2 (the second Adam group)
    checkpoint: str | None = None  # trained parts: a zsadbench checkpoint or the authors' train_{visa,mvtec}.pth
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=32, lr=4e-5, seed=333))


class PatchProjections(nn.Module):
    """One linear layer per tap, vision width → embedding (the reference's ``LinearLayer``; keys ``fc.<i>``)."""

    def __init__(self, in_features: int, out_features: int, count: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(in_features, out_features) for _ in range(count))


@dataclass
class VCPCLIPOutput:
    """Per-tap (B, 2, S, S) [normal, abnormal] probabilities of the pre-VCP (raw) and post-VCP (new) maps."""

    raw: list[Tensor]
    new: list[Tensor]


@register_method("vcpclip")
class VCPCLIP(LearnedPartsDetector):
    """VCP-CLIP: image context in the text prompts (pre-VCP) and text refined by the patch tokens (post-VCP)."""

    label = "VCP-CLIP"
    paper = "arXiv:2407.12276"
    reference = "xiaozhen228/VCP-CLIP@4dd96ec"
    code_license = "MIT (README; no LICENSE file)"
    weights_license = "MIT (OpenAI CLIP); released VCP-CLIP weights: per the reference's README"
    Config = VCPCLIPConfig
    learned_parts = "parts"  # the linear layers, pre-VCP, post-VCP and text embeddings
    reference_checkpoint_entries = (*REFERENCE_PARTS.values(), "prompt_embeddings", "deep_prompt_embeddings",
                                    "prompt_proj.weight", "prompt_proj.bias", "prompt_norm.weight",
                                    "prompt_norm.bias", "prompt_text_projection")
    # untrained parts on a tiny seeded backbone: guards the text splicing, both maps, the fusion and the scores
    presets = {"smoke": {"model": "tiny-ViT-L-14-336", "pretrained": "random", "image_size": 56}}
    regression_variants = {"zero-shot": presets["smoke"]}

    # ---- learned parts -----------------------------------------------------------------------------------------------
    def build_learnable_parts(self) -> None:
        """Creates the linear layers, pre-VCP, post-VCP and text embeddings, seeded by ``train.seed``."""
        cfg: VCPCLIPConfig = self.config
        tower = TextTower(self.clip)
        text_width = tower.token_embedding.weight.shape[1]
        vision_width = self.clip.visual.conv1.weight.shape[0]
        embed_dim = self.clip.text_projection.shape[1]
        if text_width != embed_dim:
            raise ValueError(f"vcpclip: {cfg.model} has text width {text_width} != embedding width {embed_dim}; "
                             "the pre-VCP class vectors are global embeddings written into the text (they must match)")
        if cfg.prompt_len < 1 or cfg.deep_prompt_len < 1:
            raise ValueError(f"vcpclip: prompt_len ({cfg.prompt_len}) and deep_prompt_len ({cfg.deep_prompt_len}) "
                             "must be at least 1")
        with torch.random.fork_rng(devices=[]):  # seeded inits, without touching the global RNG
            torch.manual_seed(cfg.train.seed)
            self.patch_projections = PatchProjections(vision_width, embed_dim, len(cfg.feature_layers))
            self.pre_vcp = ContextPrompting(embed_dim, cfg.prompt_len)
            self.post_vcp = PromptGuidedAttention(text_width, vision_width, vision_width, cfg.post_vcp_heads)
            self.text_prompts = InsertedTextPrompts(text_width, embed_dim, cfg.deep_prompt_len,
                                                    len(tower.transformer.resblocks), cfg.prompt_dropout)
        self.eot_id = end_of_text_id(cfg.model)
        self.templates = [placeholder_tokens(cfg.model, t) for t in (cfg.normal_templates, cfg.abnormal_templates)]

    def learnable_modules(self) -> dict[str, nn.Module]:
        """Returns the learned parts by checkpoint key prefix."""
        return {"patch_projections": self.patch_projections, "pre_vcp": self.pre_vcp, "post_vcp": self.post_vcp,
                TEXT_PART: self.text_prompts}

    # ---- 2.-3. text: pre-VCP class vectors in the prompts, encoded with the learned text embeddings ------------------
    def text_features(self, global_features: Tensor) -> Tensor:
        """Returns (B, 2, E) normalised [normal, abnormal] text features of (B, E) global image embeddings."""
        cfg: VCPCLIPConfig = self.config
        context = self.pre_vcp(global_features, cfg.use_global)
        embedding = TextTower(self.clip).token_embedding
        states = []
        for ids, positions in self.templates:
            ids, positions = ids.to(self.device), positions.to(self.device)
            spliced = splice_context(embedding(ids), positions, context)  # (B, T, L, W)
            batch, count = spliced.shape[:2]
            eot = (end_of_text_positions(ids, self.eot_id) + cfg.prompt_len - 1).repeat(batch)
            prompts = self.text_prompts.block_prompts(batch * count)
            features = encode_text_with_inserted_prompts(self.clip, spliced.flatten(0, 1), eot, prompts,
                                                         self.text_prompts.prompt_norm)
            features = features / features.norm(dim=-1, keepdim=True)
            mean = features.reshape(batch, count, -1).mean(dim=1)
            states.append(mean / mean.norm(dim=-1, keepdim=True))
        return torch.stack(states, dim=1)

    # ---- 4.-5. the pre-VCP and post-VCP maps -------------------------------------------------------------------------
    def upsampled_probabilities(self, logits: Tensor) -> Tensor:
        """Returns (B, 2, S, S) softmax of (B, P, 2) patch logits upsampled bilinearly (align_corners True)."""
        batch, count, classes = logits.shape
        side = int(count ** 0.5)
        if side * side != count:
            raise ValueError(f"vcpclip: {count} patch tokens do not form a square grid")
        grid = logits.permute(0, 2, 1).reshape(batch, classes, side, side)
        return F.interpolate(grid, size=self.input_size, mode="bilinear", align_corners=True).softmax(dim=1)

    def forward(self, images: Tensor) -> VCPCLIPOutput:
        """Returns both maps' per-tap probabilities (gradients into the learned parts, none into CLIP)."""
        layers = tuple(self.config.feature_layers)
        with torch.no_grad():
            vision = forward_vision(self.clip.visual, images.to(self.device, torch.float32), layers)
        text = self.text_features(vision.pooled)  # (B, 2, E)
        raw, new = [], []
        for index, layer in enumerate(layers):
            tokens = vision.taps[layer][:, 1:]
            dense = tokens / tokens.norm(dim=-1, keepdim=True)
            refined = self.post_vcp(text, dense)
            new.append(self.upsampled_probabilities(
                self.post_vcp.prompt_temp_l1.exp() * dense @ refined.permute(0, 2, 1)))
            projected = self.patch_projections.fc[index](tokens)
            projected = projected / projected.norm(dim=-1, keepdim=True)
            raw.append(self.upsampled_probabilities(
                self.pre_vcp.prompt_temp.exp() * projected @ text.permute(0, 2, 1)))
        return VCPCLIPOutput(raw, new)

    # ---- 6. scores ---------------------------------------------------------------------------------------------------
    def top_k_mean(self, maps: Tensor) -> Tensor:
        """Returns (B,) the mean of each (S, S) map's ``image_score_top_k`` largest pixels."""
        flat = maps.flatten(1)
        return flat.topk(min(self.config.image_score_top_k, flat.shape[1]), dim=1).values.mean(dim=1)

    @torch.no_grad()
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and smoothed maps (B, S, S); the category is not used (visual context instead)."""
        del category
        self.warn_if_untrained()
        out = self.forward(images)
        raw = torch.stack([p[:, 1] for p in out.raw]).mean(dim=0)
        new = torch.stack([p[:, 1] for p in out.new]).mean(dim=0)
        alpha = self.config.raw_weight
        maps = gaussian_filter(alpha * raw + (1 - alpha) * new, self.config.sigma)
        return Prediction(self.top_k_mean(raw) + self.top_k_mean(new), maps)

    # ---- 7. training -------------------------------------------------------------------------------------------------
    def temperatures(self) -> list[nn.Parameter]:
        """Returns τ1 and τ2, the parameters of the second Adam group."""
        return [self.post_vcp.prompt_temp_l1, self.pre_vcp.prompt_temp]

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Returns Adam with the reference's two groups: ``train.lr`` for the parts, ``temperature_lr`` for τ1, τ2."""
        options, special = self.config.train, {id(p) for p in self.temperatures()}
        rest = [p for p in self.trainable_parameters() if id(p) not in special]
        return torch.optim.Adam([{"params": rest, "lr": options.lr},
                                 {"params": self.temperatures(), "lr": self.config.temperature_lr}],
                                lr=options.lr, betas=tuple(options.betas), weight_decay=options.weight_decay)

    def training_step(self, images: Tensor, masks: Tensor, labels: Tensor,
                      samples: Sequence[Sample] = ()) -> dict[str, Tensor]:
        """Returns Σ_taps [focal + Dice(abnormal)] of the pre-VCP maps plus the same of the post-VCP maps."""
        del labels, samples  # pixels only (the reference's loss has no image term)
        out = self.forward(images)
        gt = (masks.to(self.device) > 0.5).to(torch.float32).reshape(len(images), *self.input_size)
        terms = {}
        for name, maps in (("loss_raw", out.raw), ("loss_new", out.new)):
            total = gt.new_zeros(())
            for probabilities in maps:
                total = total + focal_loss(probabilities, gt) + binary_dice_loss(probabilities[:, 1], gt)
            terms[name] = total
        self._fitted = True
        return {"loss": terms["loss_new"] + terms["loss_raw"], "loss_raw": terms["loss_raw"].detach(),
                "loss_new": terms["loss_new"].detach()}

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def state_description(self) -> str:
        """Returns what the learned state holds, for error messages."""
        cfg = self.config
        return (f"VCP-CLIP state ({len(cfg.feature_layers)} taps, prompt_len {cfg.prompt_len}, deep_prompt_len "
                f"{cfg.deep_prompt_len})")

    def reference_state_dict(self) -> dict[str, Any]:
        """Returns the learned parts in the authors' layout (train.py's ``save_dict``)."""
        out: dict[str, Any] = {}
        for name, module in self.learnable_modules().items():
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            if name == TEXT_PART:
                out.update(state)
            else:
                out[REFERENCE_PARTS[name]] = state
        return out

    def is_reference_checkpoint(self, checkpoint: dict[str, Any]) -> bool:
        """Returns whether ``checkpoint`` is in the authors' layout (entries ``Zero_try``, ``New_Lan_Embed``, ...)."""
        return any(isinstance(checkpoint.get(entry), dict) for entry in REFERENCE_PARTS.values())

    def load_reference_checkpoint(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Loads an authors' ``train_{visa,mvtec}.pth``; missing, unexpected or mis-shaped entries are named."""
        flat: dict[str, Any] = {}
        for key, value in checkpoint.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[str(key)] = value
        expected = {}
        for key, value in self.reference_state_dict().items():
            if isinstance(value, dict):
                expected.update({f"{key}.{k}": tuple(v.shape) for k, v in value.items()})
            else:
                expected[key] = tuple(value.shape)
        check_keys(flat, expected, f"checkpoint {path}: {self.state_description()} in the authors' layout")
        ours = {v: k for k, v in REFERENCE_PARTS.items()}
        state = {}
        for key, value in flat.items():
            entry, _, rest = key.partition(".")
            state[f"{ours[entry]}.{rest}" if entry in ours else f"{TEXT_PART}.{key}"] = torch.as_tensor(value)
        self.load_state_dict(state)
