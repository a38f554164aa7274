"""AdaCLIP: Adapting CLIP with Hybrid Learnable Prompts for Zero-Shot Anomaly Detection (Cao et al., ECCV 2024).

Paper: https://arxiv.org/abs/2407.15795. Reference implementation: caoyunkang/AdaCLIP @e27ee32 (MIT; read, not copied);
released weights: the ``pretrained_{mvtec_colondb,visa_clinicdb,all}.pth`` files linked from its README (same layout).

Method, as implemented (the reference's defaults: ``train.py`` / ``method/adaclip.py``):

1. Backbone (frozen, fp32): OpenAI ViT-L/14@336px at 518 px, built as the reference builds it: **exact GELU** in both
   towers (its ``model_configs/ViT-L-14-336.json`` has no ``quick_gelu``, although the OpenAI weights were trained with
   QuickGELU), positional embedding resized **bicubically** (align_corners False, no antialias) to 37×37. Feature
   layers 6, 12, 18, 24 (``n_layers // 4`` multiples).
2. Hybrid prompts, t = 5 tokens in the first J = 4 blocks of both encoders: static prompts (one (t, D) table per
   block, N(0, 0.02)) plus dynamic prompts generated per image by t linear heads from the image's plain CLIP embedding
   (``ln_post(CLS) @ proj`` of a prompt-free pass); the dynamic prompts are the same in every block. Each prompt is
   rounded to float16 before insertion, as the reference's ``.half()`` does.
   - vision (zsadbench.clip.visual_prompts): appended after the patch tokens in block 1, replacing the previous block's
     prompt outputs in blocks 2..4, flowing on after; removed from every tap.
   - text (zsadbench.clip.text deep prompts): overwrite token positions 1..5 of the input of blocks 2..4 (the block-1
     prompts are never inserted); the text is therefore encoded once per image.
3. Text: per state, the 28 normal (7 states × 4 templates) and 20 abnormal (5 × 4) sentences of the category name
   (``-`` → space), each feature normalised, averaged, normalised.
4. Visual tokens: per feature layer a linear head (1024 → 768) on the raw residual-stream patch tokens (no ln_post,
   no projection), normalised; the prompted CLS embedding through one more linear head (768 → 768), normalised.
5. Maps: per layer logits 100 · patch · text (fixed 100, not CLIP's logit scale), upsampled bilinearly
   (align_corners **True**) as logits; inference averages the layers' logits, softmax, map = (p_abn + 1 − p_norm) / 2,
   Gaussian σ = 4 (scipy's).
6. Hybrid semantic fusion (HSF, the reference's "upgraded" variant): the 100 (= 5 × 20) patches with the highest
   layer-averaged abnormal probability, their tokens of all four layers concatenated and clustered by k-means
   (k = 20); the fused feature is the mean over clusters of each cluster's mean token (pooled over the four layers),
   normalised; image feature = normalise(0.2 · fused + 0.8 · CLS); score = softmax(100 · feature · text)[abnormal].
7. Training on another dataset's test split (README "Corrections": MVTec AD + ColonDB train the model evaluated on
   every other dataset, VisA + ClinicDB the one for MVTec AD and ColonDB): AdamW (lr 0.01, betas (0.5, 0.999),
   weight decay 0.01), batch 1, 5 epochs, seed 111, on focal(image probabilities) + Σ_layers [focal(map) +
   Dice(abnormal, gt) + Dice(normal, 1 − gt)] with per-layer softmax maps. At batch 1 the reference squeezes the mask
   to (H, W), so its Dice runs over the 518 image **rows** (N = H): reproduced (for B > 1 over all B·H rows).

Checkpoints: zsadbench's (``<part>.<key>``) and the authors' files (``clip_model.<part>.<key>``, the parts named as
here: text_prompter, visual_prompter, patch_token_layer, cls_token_layer, dynamic_{visual,text}_prompt_generator).

Deliberate deviations from the reference:

- k-means is seeded (``kmeans_seed``, sklearn ``KMeans(n_init="auto", random_state=seed)``); the reference's is not,
  so its image scores change from run to run. The parity driver gives the reference the same seed.
- Batches of more than one image: each image gets its own text features (its own dynamic prompts); the reference
  supports batch 1 only (its text prompts broadcast against the batch). Results at batch 1 are the reference's.
- Fewer patches than ``k_clusters`` × 5 (tiny test inputs): k-means uses min(k_clusters, selected patches) clusters;
  the reference raises.
- fp32 throughout; the reference trains and tests under CUDA autocast (fp16), which only its CPU runs avoid.
- No mosaic augmentation (the reference's MVTec/VisA loaders combine 4 images of a category with probability 0.2
  during training) and no validation-based choice of the best epoch (the reference keeps the epoch with the best
  pixel F1-max on a validation dataset); every epoch's checkpoint is kept. ``zsadbench train`` takes one dataset: the
  two-dataset recipe needs the datasets merged into one folder (one meta.json).
- The reference's text sequences run at full length 77; zsadbench cuts them after the end-of-text token (causal mask:
  equal up to float summation order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.checkpoints import check_keys
from zsadbench.clip.learned_parts import LearnedPartsDetector
from zsadbench.clip.text import TextTower, encode_text_embeddings, end_of_text_index, tokenize
from zsadbench.clip.vision import forward_vision
from zsadbench.clip.visual_prompts import forward_prompted_vision, round_to_half
from zsadbench.filters import gaussian_filter
from zsadbench.losses import binary_dice_loss, focal_loss
from zsadbench.registry import register_method
from zsadbench.training import TrainConfig
from zsadbench.types import Prediction, Sample

# The reference's prompt words (method/adaclip.py TextEmbebddingLayer): state words and templates.
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}.")
REFERENCE_PREFIX = "clip_model."  # the authors' files store AdaCLIP_Trainer.state_dict() entries


@dataclass
class AdaCLIPConfig:
    """AdaCLIP settings; defaults are the reference's (train.py arguments, method/adaclip.py constants)."""

    model: str = "ViT-L-14-336"  # open_clip architecture
    pretrained: str = "openai"  # open_clip tag, a local weights file, or "random"
    image_size: int = 518
    pos_embed_mode: str = "bicubic"  # the reference's resize_pos_embed: bicubic, align_corners False, no antialias
    activation: str = "gelu"  # the reference builds ViT-L-14-336 with exact GELU (no quick_gelu in its config)
    feature_layers: tuple[int, ...] = (6, 12, 18, 24)  # n_layers // 4 multiples
    prompt_length: int = 5  # t prompt tokens per block
    prompt_depth: int = 4  # J: blocks 1..J of each encoder get prompts (text: 2..J, see the docstring)
    prompt_types: str = "SD"  # S static, D dynamic, SD hybrid
    prompt_branches: str = "VL"  # V vision encoder, L text encoder
    fp16_prompts: bool = True  # round prompts to float16 before insertion, as the reference's .half()
    logit_scale: float = 100.0  # fixed, not CLIP's learned scale
    use_hsf: bool = True
    hsf_alpha: float = 0.2  # weight of the clustered feature against the CLS feature
    k_clusters: int = 20
    hsf_patches_per_cluster: int = 5  # top 5 * k_clusters patches are clustered
    kmeans_seed: int = 0  # the reference's k-means is unseeded
    sigma: float = 4.0
    checkpoint: str | None = None  # trained prompts: a zsadbench checkpoint or the authors' pretrained_*.pth
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, batch_size=1, lr=0.01,
                                                                   weight_decay=0.01, seed=111))


# ---- learned parts ---------------------------------------------------------------------------------------------------

class StaticPrompts(nn.Module):
    """One learnable (t, D) prompt table per prompted block, N(0, 0.02) (the reference's ``PromptLayer``)."""

    def __init__(self, length: int, width: int, depth: int, enabled: bool = True) -> None:
        super().__init__()
        tables = [nn.Parameter(torch.empty(length, width)) for _ in range(depth)] if enabled else []
        for table in tables:
            nn.init.normal_(table, std=0.02)
        self.static_prompts = nn.ParameterList(tables)


class LinearHeads(nn.Module):
    """n parallel linear heads (the reference's ``ProjectLayer``; ``head.<i>`` as in its checkpoints)."""

    def __init__(self, in_features: int, out_features: int, count: int) -> None:
        super().__init__()
        self.head = nn.ModuleList(nn.Linear(in_features, out_features) for _ in range(count))

    def each(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """Returns head i applied to inputs[i]."""
        return [head(x) for head, x in zip(self.head, inputs)]

    def stacked(self, x: Tensor) -> Tensor:
        """Returns every head applied to (B, in) ``x``, stacked to (B, count, out)."""
        return torch.stack([head(x) for head in self.head], dim=1)


@dataclass
class AdaCLIPOutput:
    """The per-layer logits and the image probabilities of a batch."""

    layer_logits: list[Tensor]  # per feature layer (B, 2, H, W) upsampled [normal, abnormal] logits
    image_probabilities: Tensor  # (B, 2)


def hybrid_semantic_fusion(patch_tokens: Sequence[Tensor], patch_logits: Sequence[Tensor], k_clusters: int,
                           patches_per_cluster: int, seed: int) -> Tensor:
    """Returns the (B, E) normalised HSF feature: the mean of k-means cluster centres of the most abnormal patches.

    ``patch_tokens`` per layer (B, P, E) normalised, ``patch_logits`` per layer (B, P, 2). The selected patches' tokens
    of all layers are concatenated for clustering; a cluster's centre pools its patches' tokens over the layers.
    """
    from sklearn.cluster import KMeans

    abnormality = torch.stack(list(patch_logits), dim=1).mean(dim=1).softmax(dim=-1)[..., 1]
    count = min(abnormality.shape[1], k_clusters * patches_per_cluster)
    top = abnormality.topk(count, dim=1).indices
    selected = [t.gather(1, top.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in patch_tokens]
    stacked = torch.cat(selected, dim=2).detach().cpu().numpy()
    clusters = min(k_clusters, count)
    centres = []
    for b in range(len(top)):
        labels = KMeans(n_clusters=clusters, n_init="auto", random_state=seed).fit_predict(stacked[b])
        members = torch.from_numpy(labels.astype(np.int64)).to(top.device)
        means = [torch.cat([s[b][members == c] for s in selected]).mean(dim=0) for c in range(clusters)]
        centres.append(torch.stack(means).mean(dim=0))
    return F.normalize(torch.stack(centres), dim=1)


@register_method("adaclip")
class AdaCLIP(LearnedPartsDetector):
    """AdaCLIP: static + dynamic prompts in both CLIP encoders, multi-layer patch maps, hybrid semantic fusion."""

    label = "AdaCLIP"
    paper = "arXiv:2407.15795"
    reference = "caoyunkang/AdaCLIP@e27ee32"
    code_license = "MIT"
    weights_license = "MIT (OpenAI CLIP); released AdaCLIP weights: per the reference's README"
    Config = AdaCLIPConfig
    learned_parts = "prompts"
    # untrained prompts on a tiny seeded backbone: guards the prompted towers, the maps and the HSF score. fp32 prompts:
    # the fp16 rounding of the per-image dynamic prompts is a step function of the input (a 1e-5 input change flips
    # roundings and moved 2 of 600 values beyond tolerance), so a golden with it would not reproduce elsewhere
    regression_variants = {
        "zero-shot": {"model": "tiny-ViT-L-14-336", "pretrained": "random", "image_size": 56, "k_clusters": 3,
                      "fp16_prompts": False},
    }

    def __init__(self, config: AdaCLIPConfig | None = None, *, seed: int = 0, **overrides: object) -> None:
        super().__init__(config, seed=seed, **overrides)
        self._fixed_text: dict[str, Tensor] = {}  # category -> (2, E) when the text has no image-dependent prompts

    # ---- learned parts -----------------------------------------------------------------------------------------------
    def build_learnable_parts(self) -> None:
        """Creates the static prompt tables, the token heads and the dynamic prompt generators, seeded by train.seed."""
        cfg: AdaCLIPConfig = self.config
        if not cfg.prompt_types or set(cfg.prompt_types) - set("SD"):
            raise ValueError(f"adaclip: prompt_types must be 'S', 'D' or 'SD', got {cfg.prompt_types!r}")
        if set(cfg.prompt_branches) - set("VL"):
            raise ValueError(f"adaclip: prompt_branches must be '', 'V', 'L' or 'VL', got {cfg.prompt_branches!r}")
        if not 1 <= cfg.prompt_depth <= len(self.clip.visual.transformer.resblocks):
            raise ValueError(f"adaclip: prompt_depth {cfg.prompt_depth} is outside the towers")
        visual_width = self.clip.visual.conv1.weight.shape[0]
        text_width = TextTower(self.clip).token_embedding.weight.shape[1]
        embed_dim = self.clip.text_projection.shape[1]
        static, length, depth = "S" in cfg.prompt_types, cfg.prompt_length, cfg.prompt_depth
        with torch.random.fork_rng(devices=[]):  # seeded inits, without touching the global RNG
            torch.manual_seed(cfg.train.seed)
            self.text_prompter = StaticPrompts(length, text_width, depth, static and "L" in cfg.prompt_branches)
            self.visual_prompter = StaticPrompts(length, visual_width, depth, static and "V" in cfg.prompt_branches)
            self.patch_token_layer = LinearHeads(visual_width, embed_dim, len(cfg.feature_layers))
            self.cls_token_layer = LinearHeads(embed_dim, embed_dim, 1)
            self.generators: dict[str, LinearHeads] = {}
            if "D" in cfg.prompt_types:
                self.generators = {"dynamic_visual_prompt_generator": LinearHeads(embed_dim, visual_width, length),
                                   "dynamic_text_prompt_generator": LinearHeads(embed_dim, text_width, length)}
        normal = [t.format(s.format("{}")) for s in NORMAL_STATES for t in TEMPLATES]
        abnormal = [t.format(s.format("{}")) for s in ABNORMAL_STATES for t in TEMPLATES]
        self.sentence_patterns = (normal, abnormal)

    def learnable_modules(self) -> dict[str, nn.Module]:
        """Returns the learned parts under the authors' names."""
        return {"text_prompter": self.text_prompter, "visual_prompter": self.visual_prompter,
                "patch_token_layer": self.patch_token_layer, "cls_token_layer": self.cls_token_layer,
                **self.generators}

    def clear_caches(self) -> None:
        """Drops the cached prompt-free text features."""
        if hasattr(self, "_fixed_text"):
            self._fixed_text.clear()

    # ---- 2. hybrid prompts -------------------------------------------------------------------------------------------
    def dynamic_prompts(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """Returns the per-image (B, t, D_vision) and (B, t, D_text) dynamic prompts, or None without them."""
        if not self.generators:
            return None
        with torch.no_grad():
            embedding = forward_vision(self.clip.visual, images).pooled
        return (self.generators["dynamic_visual_prompt_generator"].stacked(embedding),
                self.generators["dynamic_text_prompt_generator"].stacked(embedding))

    def block_prompts(self, static: StaticPrompts, dynamic: Tensor | None) -> list[Tensor]:
        """Returns the prompts of blocks 1..J: static + dynamic (or either alone), rounded to float16 if asked."""
        prompts = []
        for depth in range(self.config.prompt_depth):
            if len(static.static_prompts) and dynamic is not None:
                prompt = dynamic + static.static_prompts[depth]
            elif len(static.static_prompts):
                prompt = static.static_prompts[depth]
            else:
                assert dynamic is not None  # build_learnable_parts requires S or D
                prompt = dynamic
            prompts.append(round_to_half(prompt) if self.config.fp16_prompts else prompt)
        return prompts

    # ---- 3. text -----------------------------------------------------------------------------------------------------
    def text_features(self, category: str, dynamic: Tensor | None, batch: int) -> Tensor:
        """Returns (B, 2, E) normalised [normal, abnormal] text features of ``category`` (with the text prompts)."""
        prompted = "L" in self.config.prompt_branches
        if not prompted or dynamic is None:  # the same text for every image
            if not prompted and category in self._fixed_text:
                return self._fixed_text[category].expand(batch, -1, -1)
            text = self.encode_category(category, self.block_prompts(self.text_prompter, None) if prompted else None)
            if not prompted:
                self._fixed_text[category] = text.detach()
            return text.expand(batch, -1, -1)
        per_image = [self.encode_category(category, self.block_prompts(self.text_prompter, d)) for d in dynamic]
        return torch.cat(per_image)

    def encode_category(self, category: str, prompts: list[Tensor] | None) -> Tensor:
        """Returns (1, 2, E): per state the normalised mean of the normalised sentence features."""
        name = category.replace("-", " ")
        normal, abnormal = ([p.format(name) for p in patterns] for patterns in self.sentence_patterns)
        ids = tokenize(self.config.model, normal + abnormal).to(self.device)
        tower = TextTower(self.clip)
        deep = None if prompts is None else {block + 1: prompts[block] for block in range(1, len(prompts))}
        features = F.normalize(encode_text_embeddings(self.clip, tower.token_embedding(ids), end_of_text_index(ids),
                                                      deep_prompts=deep), dim=-1)
        states = torch.stack([features[:len(normal)].mean(dim=0), features[len(normal):].mean(dim=0)])
        return F.normalize(F.normalize(states, dim=-1), dim=-1).unsqueeze(0)  # the reference normalises twice

    # ---- 4.-6. forward -----------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, category: str) -> AdaCLIPOutput:
        """Returns the per-layer upsampled logits and the HSF image probabilities (gradients into the learned parts)."""
        cfg: AdaCLIPConfig = self.config
        images = images.to(self.device, torch.float32)
        dynamic = self.dynamic_prompts(images)
        layers = tuple(cfg.feature_layers)
        if "V" in cfg.prompt_branches:
            vision = forward_prompted_vision(self.clip.visual, images, self.block_prompts(
                self.visual_prompter, None if dynamic is None else dynamic[0]), layers)
        else:
            with torch.no_grad():
                vision = forward_vision(self.clip.visual, images, layers)
        text = self.text_features(category, None if dynamic is None else dynamic[1], len(images))
        patches = [F.normalize(t, dim=-1) for t in
                   self.patch_token_layer.each([vision.taps[layer][:, 1:] for layer in layers])]
        cls = F.normalize(self.cls_token_layer.head[0](vision.pooled), dim=-1)
        patch_logits = [cfg.logit_scale * torch.einsum("bpe,bce->bpc", p, text) for p in patches]
        if cfg.use_hsf:
            fused = hybrid_semantic_fusion(patches, patch_logits, cfg.k_clusters, cfg.hsf_patches_per_cluster,
                                           cfg.kmeans_seed)
            cls = F.normalize(cfg.hsf_alpha * fused + (1 - cfg.hsf_alpha) * cls, dim=1)
        image_probabilities = (cfg.logit_scale * torch.einsum("be,bce->bc", cls, text)).softmax(dim=-1)
        maps = []
        for logits in patch_logits:
            batch, count, _ = logits.shape
            side = int(count ** 0.5)
            grid = logits.permute(0, 2, 1).reshape(batch, 2, side, side)
            maps.append(F.interpolate(grid, size=self.input_size, mode="bilinear", align_corners=True))
        return AdaCLIPOutput(maps, image_probabilities)

    @torch.no_grad()
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns HSF image scores (B,) and smoothed maps (B, S, S): softmax of the layer-averaged logits."""
        self.warn_if_untrained()
        out = self.forward(images, category)
        probabilities = torch.stack(out.layer_logits, dim=1).mean(dim=1).softmax(dim=1)
        maps = (probabilities[:, 1] + 1 - probabilities[:, 0]) / 2
        return Prediction(out.image_probabilities[:, 1], gaussian_filter(maps, self.config.sigma))

    # ---- 7. training -------------------------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        """Returns AdamW (the reference's optimiser; weight decay 0.01 by default) over the learned parts."""
        options = self.config.train
        return torch.optim.AdamW(self.trainable_parameters(), lr=options.lr, betas=tuple(options.betas),
                                 weight_decay=options.weight_decay)

    def training_step(self, images: Tensor, masks: Tensor, labels: Tensor,
                      samples: Sequence[Sample] = ()) -> dict[str, Tensor]:
        """Returns focal(image) + Σ_layers [focal + Dice(abnormal) + Dice(normal)] of one batch of one category each."""
        categories = [s.category for s in samples] if samples else []
        if len(set(categories)) > 1:  # text prompts per image, but one category per forward
            groups = [[i for i, s in enumerate(samples) if s.category == c] for c in dict.fromkeys(categories)]
            parts = [self.category_losses(images[g], masks[g], labels[g], categories[g[0]]) for g in groups]
            weights = [len(g) / len(images) for g in groups]
            return {k: sum(w * p[k] for w, p in zip(weights, parts)) for k in parts[0]}  # type: ignore[misc]
        return self.category_losses(images, masks, labels, categories[0] if categories else "object")

    def category_losses(self, images: Tensor, masks: Tensor, labels: Tensor, category: str) -> dict[str, Tensor]:
        """Returns the reference's loss terms for a batch of one category."""
        out = self.forward(images, category)
        gt = (masks > 0.5).to(torch.float32)
        image_loss = focal_loss(out.image_probabilities.unsqueeze(-1), (labels > 0.5).long().unsqueeze(-1))
        rows = gt.reshape(-1, gt.shape[-1])  # the reference's Dice runs over image rows (see the docstring)
        local = []
        for logits in out.layer_logits:
            probabilities = logits.softmax(dim=1)
            local.append(focal_loss(probabilities, gt)
                         + binary_dice_loss(probabilities[:, 1].reshape(rows.shape), rows)
                         + binary_dice_loss(probabilities[:, 0].reshape(rows.shape), 1 - rows))
        pixel_loss = torch.stack(local).sum()
        self._fitted = True
        return {"loss": image_loss + pixel_loss, "image": image_loss.detach(), "pixel": pixel_loss.detach()}

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def state_description(self) -> str:
        """Returns what the learned state holds, for error messages."""
        cfg = self.config
        return (f"AdaCLIP state (prompts {cfg.prompt_types}/{cfg.prompt_branches}, length {cfg.prompt_length}, depth "
                f"{cfg.prompt_depth}, {len(cfg.feature_layers)} feature layers)")

    def reference_state_dict(self) -> dict[str, Tensor]:
        """Returns the learned parts in the authors' layout (``clip_model.<part>.<key>``)."""
        return {REFERENCE_PREFIX + k: v for k, v in self.state_dict().items()}

    def is_reference_checkpoint(self, checkpoint: dict[str, Any]) -> bool:
        """Returns whether ``checkpoint`` is an authors' file (keys ``clip_model.*``)."""
        return any(isinstance(k, str) and k.startswith(REFERENCE_PREFIX) for k in checkpoint)

    def load_reference_checkpoint(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Loads an authors' ``pretrained_*.pth``; keys that do not fit are named (the reference loads non-strictly)."""
        expected = {REFERENCE_PREFIX + k: tuple(v.shape) for k, v in self.state_dict().items()}
        check_keys(checkpoint, expected, f"checkpoint {path}: {self.state_description()} in the authors' layout")
        self.load_state_dict({k[len(REFERENCE_PREFIX):]: v for k, v in checkpoint.items()})
