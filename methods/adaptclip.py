"""AdaptCLIP: Adapting CLIP for Universal Visual Anomaly Detection (Gao et al., AAAI 2026).

Paper: https://arxiv.org/abs/2505.09926. Reference implementation: gaobb/AdaptCLIP @354d9e3 (GPL-2.0: reimplemented,
no code copied); released adapters: HF ``csgaobb/AdaptCLIP`` (epoch_15.pth).

Method, as implemented:

1. Backbone (frozen, fp32), AnomalyCLIP's: OpenAI ViT-L/14@336px with QuickGELU at 518 px, positional embedding
   resized bilinearly to 37×37, the V-V (DPAM) path from block 6 (zsadbench.clip.dual_path). Patch features
   P^(l) = ln_post(v_l) @ proj for l in {6, 12, 18, 24} (distinct layers: AnomalyCLIP's copy bug does not apply);
   global feature g = o_24[CLS] @ proj without ln_post.
2. Visual adapter (VA): residual MLPs x + Linear-BN-ReLU-Linear (768 → 192 → 768, no biases) on g and, row-wise with
   the CLS row, on P^(24), scored against the frozen hand-crafted text T_s (WinCLIP's 7 + 4 states × 21 templates with
   the class word "object"; the mean of the raw sentence embeddings).
3. Textual adapter (TA): 12 learned context vectors per prompt ("[V1..V12] ." / "[W1..W12] .", input layer only)
   scored against the frozen visual features g and P^(24).
   Both: logits = cos / 0.07, maps = softmax over {normal, abnormal} per patch, CLS dropped, upsampled bilinearly.
4. Zero-shot: M = G_σ4(½(M_VA + M_TA)); s = ⅓(p_VA + p_TA + max M).
5. Prompt-query adapter (PQA, few-shot, k normal prompt images per category): per layer l, every query patch q finds its
   nearest prompt patch r (cosine over all k·1369 prompt patches): alignment map A_l = min(1 − q·r), upsampled;
   F_l = q + |q − r| (with context) → BatchNorm2d_l (one per layer) → a local head (convolutions, two 2× transposed
   convolutions, 2 classes, softmax, upsampled) and a global head (MLP on ½(mean + mean of the top 10) of F_l over the
   patches); both heads shared by the four layers. M = G_σ4(HM(⅓(M_VA + M_TA + M_PQ), HM_l A_l)),
   s = HM(⅓(p_VA + p_TA + p_PQ), max M), M_PQ and p_PQ averaged over the layers, HM the harmonic mean, NaN → 0.
6. Training on another dataset's test split, each query with one random normal train-split image of its category as
   prompt: all three adapters in one Adam step (lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, seed 10) on the plain
   sum of CE(logits) + focal(S) + Dice(S_abn, gt) + Dice(S_norm, 1 − gt) for VA, TA and each PQA layer ("alternating"
   learning = decoupled co-training: VA against the frozen text, TA against the frozen visual features).

Checkpoints: zsadbench's own and the authors' ``{"textual_learner", "visual_learner", "pq_learner"}`` files.

Deliberate deviations from the reference:

- Random draws differ: the adapters are initialised from seeded private generators and the training batches are
  shuffled by the loop's own generator; prompt images are drawn with Python's ``random`` like the reference, but after
  a different history of draws.
- A training batch of a single image (the last one of an epoch) runs the two image-level BatchNorm1d layers (VA global
  MLP, PQA global head) with their running statistics for that step; the reference cannot train on it.
- The top-10 pooling of the PQA global head takes min(10, patches) values (small test inputs have fewer patches).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.checkpoints import CheckpointError, check_keys
from zsadbench.clip.learned_parts import LearnedPartsDetector
from zsadbench.clip.prompts import LearnablePrompts
from zsadbench.clip.scoring import harmonic_mean, patch_probability_maps
from zsadbench.clip.text import compositional_prompts, prompt_ensemble_features
from zsadbench.data import load_images
from zsadbench.detector import FewShot
from zsadbench.filters import gaussian_filter
from zsadbench.losses import binary_dice_loss, focal_loss
from zsadbench.registry import register_method
from zsadbench.training import TrainConfig
from zsadbench.types import Dataset, Prediction, Sample

TEXTUAL_ADAPTER_TEXTS = (".", ".")  # "[V1..V12] ." and "[W1..W12] .": no class word, no state word


@dataclass
class AdaptCLIPConfig:
    """AdaptCLIP settings; defaults are the reference's (scripts/{train,test}_adaptclip.sh)."""

    model: str = "ViT-L-14-336-quickgelu"  # open_clip architecture; QuickGELU as the OpenAI weights were trained
    pretrained: str = "openai"  # open_clip tag, a local weights file, or "random"
    image_size: int = 518
    pos_embed_mode: str = "bilinear"
    activation: str = "auto"  # "auto" = the reference's: QuickGELU always (its OpenAI CLIP code hard-codes it)
    vv_start_layer: int = 6  # DPAM_layer=20 of 24
    feature_layers: tuple[int, ...] = (6, 12, 18, 24)  # PQA layers; the VA and TA use the last one
    class_word: str = "object"  # the static text's class word (never the category name)
    n_ctx: int = 12  # TA context vectors per prompt
    va_reduction: int = 4  # VA bottleneck: width / 4
    pq_hidden: int = 128  # PQA heads' first hidden width ("pq_mid_dim")
    pq_context: bool = True  # F = q + |q - r| (False: |q - r| only)
    temperature: float = 0.07
    sigma: float = 4.0
    shots: int = 0  # k normal prompt images per category (0 = zero-shot: VA + TA)
    reference_seed: int = 10  # seed of the per-category prompt draw (the reference reports seeds 10, 20, 30)
    checkpoint: str | None = None  # trained adapters: a zsadbench checkpoint or the authors' epoch_15.pth
    train: TrainConfig = field(default_factory=lambda: TrainConfig(seed=10))


# ---- 2. visual adapter -----------------------------------------------------------------------------------------------

class ResidualMLP(nn.Module):
    """x + Linear-BatchNorm-ReLU-Linear(x) (no biases), applied to the last dimension of (..., D) features."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = dim // reduction
        self.fc = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        """Returns the adapted features, shaped like ``x``."""
        rows = x.reshape(-1, x.shape[-1])  # every token is a BatchNorm sample (the CLS row included)
        return x + self.fc(rows).reshape(x.shape)


class VisualAdapter(nn.Module):
    """Adapts the global feature and the last layer's patch features (VA)."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.global_mlp = ResidualMLP(dim, reduction)
        self.local_mlp = ResidualMLP(dim, reduction)

    def forward(self, global_features: Tensor, patch_features: Tensor) -> tuple[Tensor, Tensor]:
        """Returns adapted (B, E) global and (B, 1 + P, E) patch features (not normalised)."""
        return self.global_mlp(global_features), self.local_mlp(patch_features)


# ---- 5. prompt-query adapter -----------------------------------------------------------------------------------------

@dataclass
class PromptQueryOutput:
    """What the PQA gives for one layer."""

    alignment: Tensor  # (B, P) min_j (1 - q·r_j): distance of each query patch to its nearest prompt patch
    probabilities: Tensor  # (B, 2, 4·side, 4·side) local-head softmax [normal, abnormal]
    logits: Tensor  # (B, 2) global-head logits


class PromptQueryAdapter(nn.Module):
    """Compares query patches with their nearest normal prompt patches, per layer (PQA)."""

    def __init__(self, dim: int, hidden: int = 128, layers: int = 4, context: bool = True) -> None:
        super().__init__()
        self.context = context
        self.fusion_norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(layers))  # one per layer
        self.local_head = nn.Sequential(  # shared by all layers: 2x2 transposed convolutions upsample 4x
            nn.Conv2d(dim, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(hidden, hidden, 2, stride=2),
            nn.Conv2d(hidden, hidden // 2, 3, padding=1, bias=False), nn.BatchNorm2d(hidden // 2),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(hidden // 2, hidden // 2, 2, stride=2),
            nn.Conv2d(hidden // 2, 2, 1))
        self.global_head = nn.Sequential(  # shared by all layers
            nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden // 2, bias=False), nn.BatchNorm1d(hidden // 2), nn.ReLU(inplace=True),
            nn.Linear(hidden // 2, 2, bias=False))

    def forward(self, layer: int, query: Tensor, prompts: Tensor) -> PromptQueryOutput:
        """Scores (B, 1 + P, E) query tokens of the ``layer``-th PQA layer against (B, S, 1 + P, E) prompt tokens."""
        q = F.normalize(query, dim=-1)[:, 1:]
        r = F.normalize(prompts, dim=-1)[:, :, 1:].flatten(1, 2)  # the S·P prompt patches, pooled
        alignment, nearest = (1.0 - q @ r.transpose(1, 2)).min(dim=-1)
        matched = torch.gather(r, 1, nearest.unsqueeze(-1).expand(-1, -1, r.shape[-1]))
        fused = q + (q - matched).abs() if self.context else (q - matched).abs()
        batch, patches, dim = fused.shape
        side = int(patches ** 0.5)
        fused = self.fusion_norms[layer](fused.transpose(1, 2).reshape(batch, dim, side, side))
        probabilities = self.local_head(fused).softmax(dim=1)
        flat = fused.flatten(2)
        pooled = (flat.mean(dim=-1) + flat.topk(min(10, patches), dim=-1).values.mean(dim=-1)) / 2
        return PromptQueryOutput(alignment, probabilities, self.global_head(pooled))


# ---- the detector ----------------------------------------------------------------------------------------------------

@dataclass
class BranchOutput:
    """One branch's scores for a batch: image logits (B, 2) and upsampled [normal, abnormal] maps (B, 2, H, W)."""

    logits: Tensor
    maps: Tensor


@register_method("adaptclip")
class AdaptCLIP(LearnedPartsDetector, FewShot):
    """AdaptCLIP: visual and textual adapters (zero-shot) plus a prompt-query adapter (k normal prompt images)."""

    label = "AdaptCLIP"
    paper = "arXiv:2505.09926"
    reference = "gaobb/AdaptCLIP@354d9e3"
    code_license = "GPL-2.0"
    weights_license = "MIT (OpenAI CLIP); GPL-2.0 (released adapters)"
    Config = AdaptCLIPConfig
    reference_checkpoint_entries = ("textual_learner", "visual_learner", "pq_learner")  # train.py saves these only
    learned_parts = "adapters"
    # untrained adapters on a tiny seeded backbone: guards the zero-shot fusion and the PQA path
    presets = {"smoke": {"model": "tiny-ViT-L-14-336-quickgelu", "pretrained": "random", "image_size": 56}}
    regression_variants = {"zero-shot": presets["smoke"], "1-shot": {**presets["smoke"], "shots": 1}}

    def __init__(self, config: AdaptCLIPConfig | None = None, *, seed: int = 0, **overrides: object) -> None:
        super().__init__(config, seed=seed, **overrides)
        if self.config.shots < 0:
            raise ValueError(f"adaptclip: shots must be >= 0, got {self.config.shots}")
        self.references: dict[str, list[Tensor]] = {}  # category -> per PQA layer (S, 1 + P, E) prompt tokens
        self.training_prompts: dict[str, list[Sample]] = {}  # category -> normal train-split images (training)

    # ---- learned parts: the three adapters ---------------------------------------------------------------------------
    def build_learnable_parts(self) -> None:
        """Creates the TA (learned prompts), the VA and the PQA, seeded by ``train.seed``."""
        cfg: AdaptCLIPConfig = self.config
        embed_dim = self.clip.text_projection.shape[1]
        self.textual_adapter = LearnablePrompts(self.clip, cfg.model, n_ctx=cfg.n_ctx, texts=TEXTUAL_ADAPTER_TEXTS,
                                                deep_depth=1, seed=cfg.train.seed)
        with torch.random.fork_rng(devices=[]):  # PyTorch's default inits, seeded, without touching the global RNG
            torch.manual_seed(cfg.train.seed)
            self.visual_adapter = VisualAdapter(embed_dim, cfg.va_reduction)
            self.pq_adapter = PromptQueryAdapter(embed_dim, cfg.pq_hidden, len(cfg.feature_layers), cfg.pq_context)
        self._static_text: Tensor | None = None  # T_s (2, E), frozen: computed once
        self._learned_text: Tensor | None = None  # T_l (2, E) for inference

    def learnable_modules(self) -> dict[str, nn.Module]:
        """Returns the three adapters by checkpoint key prefix."""
        return {"textual_adapter": self.textual_adapter, "visual_adapter": self.visual_adapter,
                "pq_adapter": self.pq_adapter}

    def clear_caches(self) -> None:
        """Drops the cached learned text T_l (the adapters changed, moved or switched to training)."""
        self._learned_text = None

    def to(self, device: str | torch.device) -> AdaptCLIP:
        """Moves the backbone, the adapters, the static text and the prompt memories to ``device``."""
        super().to(device)
        self._static_text = None if self._static_text is None else self._static_text.to(self.device)
        self.references = {c: [t.to(self.device) for t in m] for c, m in self.references.items()}
        return self

    # ---- 1. visual features (DPAM): LearnedPartsDetector.encode_images gives g and P^(l) of every PQA layer ----------

    # ---- text features -----------------------------------------------------------------------------------------------
    def static_text(self) -> Tensor:
        """Returns T_s (2, E): the means of the raw normal and abnormal sentence embeddings (computed once)."""
        if self._static_text is None:
            with torch.no_grad():
                prompts = compositional_prompts(self.config.class_word)
                self._static_text = prompt_ensemble_features(self.clip, self.config.model, prompts)
        return self._static_text

    def learned_text(self) -> Tensor:
        """Returns T_l (2, E) of the textual adapter (with gradients while training, cached otherwise)."""
        if self.textual_adapter.training:
            return self.textual_adapter(self.clip)
        if self._learned_text is None:
            with torch.no_grad():
                self._learned_text = self.textual_adapter(self.clip)
        return self._learned_text

    # ---- 2.-3. zero-shot branches ------------------------------------------------------------------------------------
    def score(self, global_features: Tensor, patch_features: Tensor, text: Tensor) -> BranchOutput:
        """Returns logits cos(g, t) / τ and upsampled patch probabilities of features against a text pair."""
        tau = self.config.temperature
        logits = F.normalize(global_features, dim=-1) @ F.normalize(text, dim=-1).T / tau
        return BranchOutput(logits, patch_probability_maps(patch_features, text, tau, self.input_size))

    def visual_branch(self, global_features: Tensor, patches: Tensor) -> BranchOutput:
        """Returns the VA's scores: adapted visual features against the frozen static text."""
        adapted_global, adapted_patches = self.visual_adapter(global_features, patches)
        return self.score(adapted_global, adapted_patches, self.static_text())

    def textual_branch(self, global_features: Tensor, patches: Tensor) -> BranchOutput:
        """Returns the TA's scores: the frozen visual features against the learned text."""
        return self.score(global_features, patches, self.learned_text())

    # ---- 5. prompt-query branch --------------------------------------------------------------------------------------
    def prompt_query_branch(self, patch_features: Sequence[Tensor],
                            prompt_features: Sequence[Tensor]) -> tuple[list[BranchOutput], list[Tensor]]:
        """Returns the PQA's scores per layer and the upsampled alignment maps A_l (B, H, W).

        ``prompt_features`` per layer: (B, S, 1 + P, E), the prompt tokens of each query.
        """
        branches, alignments = [], []
        for layer, (query, prompts) in enumerate(zip(patch_features, prompt_features)):
            out = self.pq_adapter(layer, query, prompts)
            side = int(out.alignment.shape[1] ** 0.5)
            alignment = F.interpolate(out.alignment.reshape(-1, 1, side, side), size=self.input_size, mode="bilinear",
                                      align_corners=False)
            alignments.append(alignment[:, 0])
            maps = F.interpolate(out.probabilities, size=self.input_size, mode="bilinear", align_corners=False)
            branches.append(BranchOutput(out.logits, maps))
        return branches, alignments

    # ---- 4.-5. inference ---------------------------------------------------------------------------------------------
    def set_reference(self, images: Tensor, category: str) -> None:
        """Stores the prompt tokens of the k normal prompt images of ``category`` for the PQA (all layers)."""
        if self.shots == 0:
            raise RuntimeError("adaptclip: set_reference needs shots > 0")
        _, patch_features = self.encode_images(images)
        self.references[category] = patch_features

    @torch.no_grad()
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns fused image scores (B,) and smoothed anomaly maps (B, S, S) (zero-shot, or k-shot with prompts)."""
        self.warn_if_untrained()
        global_features, patch_features = self.encode_images(images)
        visual = self.visual_branch(global_features, patch_features[-1])
        textual = self.textual_branch(global_features, patch_features[-1])
        p_visual, p_textual = visual.logits.softmax(-1)[:, 1], textual.logits.softmax(-1)[:, 1]
        if self.shots == 0:
            maps = gaussian_filter((visual.maps[:, 1] + textual.maps[:, 1]) / 2, self.config.sigma)
            scores = (p_visual + p_textual + maps.flatten(1).amax(dim=1)) / 3
        else:
            memory = self.references.get(category)
            if memory is None:
                raise RuntimeError(f"adaptclip: shots={self.shots} but no prompt images were set for category "
                                   f"{category!r} (set_reference)")
            prompts = [m.unsqueeze(0).expand(len(images), *m.shape) for m in memory]
            branches, alignments = self.prompt_query_branch(patch_features, prompts)
            pq_map = torch.stack([b.maps[:, 1] for b in branches]).mean(dim=0)
            p_pq = torch.stack([b.logits.softmax(-1)[:, 1] for b in branches]).mean(dim=0)
            fused = harmonic_mean((visual.maps[:, 1] + textual.maps[:, 1] + pq_map) / 3, harmonic_mean(*alignments))
            maps = gaussian_filter(fused, self.config.sigma)
            scores = harmonic_mean((p_visual + p_textual + p_pq) / 3, maps.flatten(1).amax(dim=1))
        # the reference's nan_to_num covers 0/0 in the harmonic means; an image with a non-finite pixel stays NaN, so
        # that corrupt input is never scored as a clean number
        corrupt = ~torch.isfinite(images).flatten(1).all(dim=1)
        scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0).masked_fill(corrupt, float("nan"))
        maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0).masked_fill(corrupt[:, None, None], float("nan"))
        return Prediction(scores, maps)

    # ---- 6. training -------------------------------------------------------------------------------------------------
    def prepare_training(self, dataset: Dataset) -> None:
        """Collects each category's normal train-split images: the prompt images of the training queries."""
        self.training_prompts = {c: [s for s in dataset.split(c, "train") if s.label == 0]
                                 for c in dataset.categories("train")}
        missing = [c for c in dataset.categories(self.config.train.split) if not self.training_prompts.get(c)]
        if missing:
            raise ValueError(f"adaptclip training: categories {', '.join(map(repr, missing))} of {dataset.name!r} have "
                             "no normal 'train' images to use as prompt images (AdaptCLIP pairs each training query "
                             "with one)")

    def training_prompt_images(self, samples: Sequence[Sample]) -> Tensor:
        """Returns one random normal train-split image of each sample's category, preprocessed (B, 3, S, S)."""
        # Python's RNG, as the reference; the loop checkpoints its state. prepare_training checked every category.
        chosen = [random.choice(self.training_prompts[sample.category]) for sample in samples]
        return load_images(chosen, self.transform).to(self.device)

    def branch_losses(self, branch: BranchOutput, masks: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (CE of the logits, focal + Dice(abnormal) + Dice(normal) of the maps) of one branch."""
        probabilities = branch.maps
        local = (focal_loss(probabilities, masks) + binary_dice_loss(probabilities[:, 1], masks)
                 + binary_dice_loss(probabilities[:, 0], 1 - masks))
        return F.cross_entropy(branch.logits, labels.long()), local

    def training_step(self, images: Tensor, masks: Tensor, labels: Tensor,
                      samples: Sequence[Sample] = ()) -> dict[str, Tensor]:
        """Returns the summed VA, TA and per-layer PQA losses of one batch (each query with one prompt image)."""
        if len(samples) != len(images):
            raise ValueError("adaptclip training needs each query's sample (its category picks the prompt image)")
        global_features, patch_features = self.encode_images(images)
        _, prompt_features = self.encode_images(self.training_prompt_images(samples))
        image_level_norms = (self.visual_adapter.global_mlp, self.pq_adapter.global_head)
        if len(images) == 1:  # BatchNorm1d cannot normalise a batch of one: running statistics for this step
            for module in image_level_norms:
                module.eval()
        try:
            visual = self.visual_branch(global_features, patch_features[-1])
            textual = self.textual_branch(global_features, patch_features[-1])
            pq, _ = self.prompt_query_branch(patch_features, [p.unsqueeze(1) for p in prompt_features])
        finally:
            for module in image_level_norms:
                module.train(self.pq_adapter.training)
        losses = {}
        for name, branches in (("va", [visual]), ("ta", [textual]), ("pq", pq)):
            terms = [self.branch_losses(branch, masks, labels) for branch in branches]
            losses[f"{name}_image"] = torch.stack([image for image, _ in terms]).sum()
            losses[f"{name}_local"] = torch.stack([local for _, local in terms]).sum()
        self._fitted = True
        total = torch.stack(list(losses.values())).sum()
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def state_description(self) -> str:
        """Returns what the learned state holds, for error messages."""
        return (f"AdaptCLIP state (n_ctx {self.config.n_ctx}, {len(self.config.feature_layers)} PQA layers, "
                f"PQA hidden {self.config.pq_hidden})")

    def reference_state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Returns the adapters in the authors' layout: textual/visual/pq learners, the PQ heads aliased per layer."""
        visual = renamed(self.visual_adapter.state_dict(), REFERENCE_VISUAL)
        pq: dict[str, Tensor] = {}
        for key, value in self.pq_adapter.state_dict().items():
            name, rest = key.split(".", 1)
            if name == "fusion_norms":
                pq[f"sharebn.{rest}"] = value.detach().clone()
            else:
                for layer in range(len(self.config.feature_layers)):  # the same module listed once per layer
                    pq[f"{REFERENCE_PQ_HEADS[name]}.{layer}.{rest}"] = value
        return {"textual_learner": self.textual_adapter.reference_state_dict(),
                "visual_learner": visual, "pq_learner": pq}

    def is_reference_checkpoint(self, checkpoint: dict[str, Any]) -> bool:
        """Returns whether ``checkpoint`` is the authors' ``{"textual_learner", ...}`` layout (HF epoch_15.pth)."""
        return isinstance(checkpoint.get("textual_learner"), dict)

    def load_reference_checkpoint(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Loads the authors' ``{"textual_learner", "visual_learner", "pq_learner"}`` file (epoch_15.pth)."""
        self.textual_adapter.load_reference_state(checkpoint["textual_learner"], str(path))
        expected = self.reference_state_dict()
        for part in ("visual_learner", "pq_learner"):
            state = checkpoint.get(part)
            if not isinstance(state, dict):
                raise CheckpointError(f"checkpoint {path}: no {part!r} state dict")
            check_keys(state, {k: tuple(v.shape) for k, v in expected[part].items()},
                       f"checkpoint {path}: {part} of AdaptCLIP ({len(self.config.feature_layers)} PQA layers)")
        self.visual_adapter.load_state_dict(renamed(checkpoint["visual_learner"],
                                                    {v: k for k, v in REFERENCE_VISUAL.items()}))
        pq_state, heads = {}, {v: k for k, v in REFERENCE_PQ_HEADS.items()}
        for key, value in checkpoint["pq_learner"].items():
            name, rest = key.split(".", 1)
            if name == "sharebn":
                pq_state[f"fusion_norms.{rest}"] = value
                continue
            layer, leaf = rest.split(".", 1)
            first = checkpoint["pq_learner"][f"{name}.0.{leaf}"]
            if not torch.equal(value, first):  # the released files hold one shared head, listed once per layer
                raise CheckpointError(f"checkpoint {path}: pq_learner.{key} differs from {name}.0.{leaf}; AdaptCLIP "
                                      "shares its PQA heads across layers")
            pq_state[f"{heads[name]}.{leaf}"] = first
        self.pq_adapter.load_state_dict(pq_state)


REFERENCE_VISUAL = {"global_mlp": "global_adapter", "local_mlp": "local_adater"}  # (sic) the authors' key
REFERENCE_PQ_HEADS = {"local_head": "local_adapter", "global_head": "global_adapter"}


def renamed(state: dict[str, Tensor], names: dict[str, str]) -> dict[str, Tensor]:
    """Returns copies of ``state``'s tensors with each key's first component renamed by ``names``."""
    return {f"{names[head]}.{rest}": v.detach().clone() for key, v in state.items()
            for head, rest in [key.split(".", 1)]}
