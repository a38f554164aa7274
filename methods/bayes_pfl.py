"""Bayes-PFL: Bayesian Prompt Flow Learning for Zero-Shot Anomaly Detection (Qu et al., CVPR 2025).

Paper: https://arxiv.org/abs/2503.10080. Reference implementation: xiaozhen228/Bayes-PFL @8f155a0 (README: MIT; no
LICENSE file; read, not copied): ``models/VPB.py`` (``Context_Prompting``, ``TextEncoder``, RCA), ``models/PFL.py``
and ``models/flows.py`` (prompt flows), ``loss.py``, ``train.py`` / ``train.sh``, ``test.py`` / ``test.sh``,
``models/metric_and_visualization.py`` (the image-score fusion). Documentation: docs/methods/bayes_pfl.md.

Method, as implemented (the reference's defaults):

1. Backbone (frozen, fp32): OpenAI ViT-L/14@336px at 518 px, built as the reference's own CLIP code builds it:
   **exact GELU** in both towers, positional embedding resized **bicubically with antialias** (align_corners False) to
   37×37. Global feature g = ln_post(CLS) @ proj; patch tokens = the raw residual stream after blocks 6, 12, 18, 24
   (CLS dropped, no ln_post, no projection).
2. Prompt bank: B = 3 prompts, each P = 5 learned context vectors and Q = 5 learned state vectors per state (normal /
   abnormal), written into "[SOS] X <class> [EOT]" in place of the token "X" (the class word through the reference's
   ``class_mapping``: "pcb1" -> "printed circuit board", ...).
3. Prompt flows (zsadbench.clip.prompt_flows): an image-specific distribution (Gaussian from g, K = 10 planar flows
   amortised from g) whose sample z is added to every context vector, and two image-agnostic distributions (normal,
   abnormal: learned state vectors, free flow parameters, one Gaussian encoder shared by both) whose samples are added
   to the state vectors. Training draws one sample per image; inference R = 10 samples, giving B·R prompts per state.
4. Image score: text features t (normalised) -> class_mapping -> normalised; image feature g (stage 1) or
   image_mapping(g + fuse(patch tokens)) (stage 2: ``fuse`` = attention pooling of the concatenated layers),
   normalised; logits exp(τ_image)·cos; score = mean over the B·R prompt pairs of softmax([normal, abnormal])[1].
5. Maps: residual cross-modal attention (zsadbench.clip.cross_modal_attention) refines the text features with each
   layer's patch tokens; logits exp(τ_pixel)·cos(patch, refined text), upsampled bilinearly (align_corners True) as
   logits; per pair softmax; the map is the mean of P(abnormal) over the 4 layers and B·R pairs, then a scipy-style
   Gaussian with σ = 8.
6. Evaluation fusion (``image_score="fusion"``, the reference's ``calcuate_metric_pixel``): per category, the image
   scores of step 4 and the mean of the top-k values of each *unsmoothed* map (k = 2000; 20 for capsules, macaroni1/2,
   pipe_fryum, screw, cashew, chewinggum) are each min-max normalised over the category (+1e-8) and averaged with
   α = 0.5. This makes the method transductive (one category at a time); ``image_score="classifier"`` returns the
   step-4 scores and is inductive.
7. Training on another dataset's test split (train.sh): Adam, betas (0.5, 0.999): prompts lr 1e-3, flow parameters
   1e-3, temperatures 0.01, the other linear layers 1e-4, cosine schedule with 10 % linear warm-up (the first step at
   lr 0); batch 32, 30 epochs, seed 333. Stage 1 loss (the prompt flow loss, Eq. 7) = CE(image logits of one random
   prompt pair) + Σ_layers [balanced focal + foreground Dice](that pair's upsampled maps) + 0.01·(KL_image + KL_normal
   + KL_abnormal) + orthogonality of the B normal and of the B abnormal text features. Stage 2 trains class_mapping,
   image_mapping and fuse on the CE alone (maps without gradients).

Checkpoints: zsadbench's (``pfl.<key>``) and the authors' ``{"MyModel": state_dict}`` files (``train_visa.pth``,
``train_mvtec.pth``, ``epoch_post_N_S.pth``), whose keys are those of the learned module here one to one.

Sampling is seeded and recorded: ``sampling_seed`` draws the R standard-normal vectors of each distribution once (a
dedicated generator); training draws from the global RNG, which ``zsadbench train`` seeds (``train.seed``) and saves
in every checkpoint for exact resumption.

Deliberate deviations from the reference:

- The image-specific draws eps (R, D) are the same for every image (each image still gets its own samples, through
  its own mean, variance and flows); the reference draws fresh eps per image from its global CUDA RNG, so its
  scores depend on the image order and cannot be reproduced. The image-agnostic draws are made once per run in both.
- No validation-driven stage switch: the reference runs stage 1 until the pixel AP on five categories of the other
  dataset stops improving (patience 3), restores the best parameters, then stage 2 until the image AP stops
  improving. Here the last ``stage2_epochs`` of ``train.epochs`` are stage 2 (at least one stage-1 epoch), with the
  last parameters; stage 2 keeps the one optimiser (lr 0 for the stage-1 groups) instead of a fresh Adam.
  ``stage`` (default 2, what test.py uses for the released files) selects the inference branch.
- No training augmentation (the reference applies albumentations rotations, flips, colour and noise, and an MVTec
  2×2 mosaic with probability 0.4), no EMA bookkeeping.
- Text sequences are cut after their end-of-text token (causal mask: the same features up to float summation order);
  a batch of any size is scored at once (the reference tests at batch 1); top-k uses min(k, pixels) on small inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.checkpoints import check_keys
from zsadbench.clip.cross_modal_attention import ResidualCrossModalAttention
from zsadbench.clip.learned_parts import LearnedPartsDetector
from zsadbench.clip.prompt_flows import (
    Decoder,
    GaussianEncoder,
    ImageAgnosticFlow,
    ImageSpecificFlow,
    flow_kl_divergence,
)
from zsadbench.clip.text import TextTower, encode_text_embeddings, end_of_text_index, tokenize
from zsadbench.clip.vision import forward_vision
from zsadbench.detector import ImageSet
from zsadbench.filters import gaussian_filter
from zsadbench.losses import balanced_focal_loss, foreground_dice_loss
from zsadbench.registry import register_method
from zsadbench.training import TrainConfig, training_samples
from zsadbench.types import Dataset, Prediction, Sample

# The reference's class words (models/VPB.py class_mapping); any other category name is used as is, lower-cased.
CLASS_WORDS = {"macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
               "pcb2": "printed circuit board", "pcb3": "printed circuit board", "pcb4": "printed circuit board",
               "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut"}
PLACEHOLDER = "X"  # "X <class>": the learned tokens replace the token of "X" (position 1)
REFERENCE_ENTRY = "MyModel"  # train.py saves {"MyModel": Context_Prompting.state_dict()}
IMAGE_SCORES = ("fusion", "classifier")


@dataclass
class BayesPFLConfig:
    """Bayes-PFL settings; defaults are the reference's (train.sh / test.sh, models/VPB.py, metric code)."""

    model: str = "ViT-L-14-336"  # open_clip architecture
    pretrained: str = "openai"  # open_clip tag, a local weights file, or "random"
    image_size: int = 518
    pos_embed_mode: str = "bicubic-antialias"  # the reference's resize_pos_embed: bicubic, antialias, no corners
    activation: str = "gelu"  # the reference's CLIP code builds nn.GELU in both towers, whatever the weights
    feature_layers: tuple[int, ...] = (6, 12, 18, 24)
    prompt_num: int = 3  # B: prompts in the bank
    prompt_context_len: int = 5  # P: learned context vectors per prompt
    prompt_state_len: int = 5  # Q: learned state vectors per prompt and state
    num_flows: int = 10  # K: planar flows per distribution
    sample_num: int = 10  # R: Monte-Carlo samples at inference (test.sh)
    sampling_seed: int = 333  # seeds the inference draws (test.sh --seed 333); recorded with the run's config
    rca_heads: int = 4
    stage: int = 2  # inference branch: 2 = image_mapping(g + fuse(patches)) (released files), 1 = g
    image_score: str = "fusion"  # "fusion" (per category, transductive) or "classifier" (inductive)
    fusion_alpha: float = 0.5  # weight of the classifier score in the fusion
    topk: int = 2000  # pixels averaged for the map score of the fusion
    topk_small: int = 20  # ... for the categories with small defects
    topk_small_categories: tuple[str, ...] = ("capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew",
                                              "chewinggum")
    sigma: float = 8.0  # Gaussian smoothing of the maps (scipy's defaults otherwise)
    lr_prompts: float = 1e-3  # --learning_rate_prompt
    lr_flows: float = 1e-3  # --learning_rate_PFL
    lr_temperatures: float = 0.01
    warmup_fraction: float = 0.1  # of all training steps, linear warm-up before the cosine decay
    stage2_epochs: int = 5  # the last epochs train stage 2 (see the deviations)
    checkpoint: str | None = None  # learned parts: a zsadbench checkpoint or the authors' train_*.pth
    # lr: the linear layers' (--learning_rate_linear); seed: train.sh --seed 333
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, batch_size=32, lr=1e-4, seed=333))


# ---- learned parts (the reference's Context_Prompting, parameter for parameter) -------------------------------------

class GlobalFeature(nn.Module):
    """Attention pooling of the concatenated layers' patch tokens to one vector (the reference's ``Global_Feature``)."""

    def __init__(self, vision_width: int, hidden: int, out: int, layers: int) -> None:
        super().__init__()
        self.fuse_modules = nn.Linear(vision_width * layers, hidden)
        self.compress = nn.Linear(hidden, 1)
        self.post_process = nn.Linear(hidden, out)

    def forward(self, patch_tokens: Sequence[Tensor]) -> Tensor:
        """Returns (B, out) from per-layer (B, N, D_v) patch tokens."""
        x = self.fuse_modules(torch.cat(list(patch_tokens), dim=2))
        weights = self.compress(x).softmax(dim=1)
        return self.post_process(torch.sum(weights * x, dim=1))


class PromptFlowParts(nn.Module):
    """Every learned part of Bayes-PFL, named as the reference's ``Context_Prompting`` (so its state dicts match)."""

    def __init__(self, cfg: BayesPFLConfig, vision_width: int, text_width: int, embed_dim: int) -> None:
        super().__init__()
        if embed_dim != text_width:
            raise ValueError(f"bayes_pfl: the prompt samples (embedding width {embed_dim}) are added to text tokens "
                             f"of width {text_width}; the architecture must have equal widths (as ViT-B/L CLIP)")
        bank = cfg.prompt_num
        self.prompt_context = nn.Parameter(torch.randn(bank, cfg.prompt_context_len, text_width))
        self.prompt_state_normal = nn.Parameter(torch.randn(bank, cfg.prompt_state_len, text_width))
        self.prompt_state_abnormal = nn.Parameter(torch.randn(bank, cfg.prompt_state_len, text_width))
        self.temperature_pixel = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.temperature_image = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        hidden = vision_width // 2
        self.context_encoder = GaussianEncoder(embed_dim, hidden, embed_dim)
        self.context_decoder = Decoder(embed_dim, hidden, embed_dim)
        self.state_encoder = GaussianEncoder(embed_dim, hidden, embed_dim)  # shared by both image-agnostic flows
        self.state_decoder = Decoder(embed_dim, hidden, embed_dim)
        self.PFL_context = ImageSpecificFlow(self.context_encoder, self.context_decoder, embed_dim, cfg.num_flows)
        self.PFL_normal = ImageAgnosticFlow(self.state_encoder, self.state_decoder, embed_dim, cfg.num_flows)
        self.PFL_abnormal = ImageAgnosticFlow(self.state_encoder, self.state_decoder, embed_dim, cfg.num_flows)
        self.fuse = GlobalFeature(vision_width, hidden, text_width, len(cfg.feature_layers))
        self.RCA = ResidualCrossModalAttention(vision_width, text_width, len(cfg.feature_layers), cfg.rca_heads)
        self.class_mapping = nn.Linear(text_width, text_width)
        self.image_mapping = nn.Linear(text_width, text_width)
        for module in self.modules():  # the reference's _initialize_weights
            if isinstance(module, nn.Linear):
                module.weight.data.normal_(mean=0.0, std=0.02)
                if module.bias is not None:
                    module.bias.data.zero_()
        nn.init.trunc_normal_(self.prompt_context, mean=0, std=0.02)
        nn.init.trunc_normal_(self.prompt_state_normal, mean=0.5, std=0.02)
        nn.init.trunc_normal_(self.prompt_state_abnormal, mean=-0.5, std=0.02)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Returns the reference's optimiser groups: prompts, temperatures, flows, linear, classifier (stage 2)."""
        groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("prompts", "temperatures", "flows", "linear",
                                                                  "classifier")}
        for name, parameter in self.named_parameters():  # deduplicated: shared encoders under their first name
            if "prompt" in name:
                groups["prompts"].append(parameter)
            elif "temperature" in name:
                groups["temperatures"].append(parameter)
            elif "PFL" in name and "encoder" not in name and "decoder" not in name:
                groups["flows"].append(parameter)
            elif name.startswith(("class_mapping", "image_mapping", "fuse")):
                groups["classifier"].append(parameter)
            else:
                groups["linear"].append(parameter)
        return groups


@dataclass
class PromptDraws:
    """Standard-normal draws of one forward: image-specific (R, B, D), normal and abnormal (R, 1, D)."""

    context: Tensor
    normal: Tensor
    abnormal: Tensor


@dataclass
class BayesPFLOutput:
    """What one forward computes: text features, image logits, per-layer patch logits, the flows' KL terms."""

    text: Tensor  # (B, 2M, E) normalised; [normal prompts | abnormal prompts], prompt m = r * bank + b
    image_logits: Tensor  # (B, 2M)
    layer_logits: list[Tensor]  # per feature layer (B, 2M, h, w), before upsampling
    kl: tuple[Tensor, Tensor, Tensor] | None = None  # (image-specific, normal, abnormal), training only


@register_method("bayes_pfl")
class BayesPFL(LearnedPartsDetector):
    """Bayes-PFL: prompts sampled from learned flow distributions, RCA-refined maps, Monte-Carlo averaged scores."""

    label = "Bayes-PFL"
    paper = "arXiv:2503.10080"
    reference = "xiaozhen228/Bayes-PFL@8f155a0"
    code_license = "MIT (README; no LICENSE file)"
    weights_license = "MIT (OpenAI CLIP); released Bayes-PFL weights: per the reference's README (MIT)"
    Config = BayesPFLConfig
    learned_parts = "prompt flows"
    reference_checkpoint_entries = (REFERENCE_ENTRY,)
    presets = {"smoke": {"model": "tiny-ViT-L-14-336", "pretrained": "random", "image_size": 56}}
    # untrained parts on a tiny seeded exact-GELU backbone: guards the flows, the prompts, RCA, sampling and fusion
    regression_variants = {"zero-shot": presets["smoke"]}

    def __init__(self, config: BayesPFLConfig | None = None, *, seed: int = 0, **overrides: object) -> None:
        self._noise: dict[str, PromptDraws] = {}
        self._schedule: tuple[int, int] | None = None  # (steps per epoch, stage-1 epochs) once training is prepared
        self._optimizer: torch.optim.Optimizer | None = None
        super().__init__(config, seed=seed, **overrides)
        cfg: BayesPFLConfig = self.config
        if cfg.image_score not in IMAGE_SCORES:
            raise ValueError(f"bayes_pfl: image_score must be one of {IMAGE_SCORES}, got {cfg.image_score!r}")
        if cfg.stage not in (1, 2):
            raise ValueError(f"bayes_pfl: stage must be 1 or 2, got {cfg.stage}")
        if min(cfg.sample_num, cfg.prompt_num, cfg.num_flows, cfg.topk, cfg.topk_small) < 1:
            raise ValueError("bayes_pfl: sample_num, prompt_num, num_flows, topk and topk_small must be >= 1")
        self.transductive = cfg.image_score == "fusion"  # type: ignore[misc]

    # ---- learned parts -----------------------------------------------------------------------------------------------
    def build_learnable_parts(self) -> None:
        """Creates the prompt bank, the flows, RCA and the mappings, seeded by ``train.seed``."""
        cfg: BayesPFLConfig = self.config
        tower = TextTower(self.clip)
        with torch.random.fork_rng(devices=[]):  # seeded inits, without touching the global RNG
            torch.manual_seed(cfg.train.seed)
            self.pfl = PromptFlowParts(cfg, int(self.clip.visual.conv1.out_channels),
                                       int(tower.token_embedding.weight.shape[1]),
                                       int(self.clip.text_projection.shape[1]))

    def learnable_modules(self) -> dict[str, nn.Module]:
        """Returns the learned parts by checkpoint key prefix."""
        return {"pfl": self.pfl}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Returns every learned parameter once (the shared encoders are not repeated)."""
        return list(self.pfl.parameters())

    def to(self, device: str | torch.device) -> BayesPFL:
        """Moves the backbone and the learned parts to ``device``."""
        super().to(device)
        return self

    # ---- 1. visual features ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def visual_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Returns g (B, E) = ln_post(CLS) @ proj and the raw (B, N, D_v) patch tokens after each feature layer."""
        layers = tuple(self.config.feature_layers)
        out = forward_vision(self.clip.visual, images.to(self.device, torch.float32), taps=layers)
        return out.pooled, [out.taps[layer][:, 1:] for layer in layers]

    # ---- 3. prompt draws ---------------------------------------------------------------------------------------------
    def inference_draws(self, batch: int) -> PromptDraws:
        """Returns the seeded standard-normal draws of inference (drawn once per device, see the deviations)."""
        key = str(self.device)
        if key not in self._noise:
            cfg: BayesPFLConfig = self.config
            dim = int(self.clip.text_projection.shape[1])
            generator = torch.Generator().manual_seed(cfg.sampling_seed)
            draws = [torch.randn(cfg.sample_num, 1, dim, generator=generator) for _ in range(3)]
            self._noise[key] = PromptDraws(*(d.to(self.device) for d in draws))
        noise = self._noise[key]
        return PromptDraws(noise.context.expand(-1, batch, -1), noise.normal, noise.abnormal)

    def training_draws(self, batch: int) -> PromptDraws:
        """Returns one draw per image (image-specific) and one per image-agnostic flow, from the global RNG."""
        dim = int(self.clip.text_projection.shape[1])
        return PromptDraws(*(torch.randn(1, n, dim, device=self.device) for n in (batch, 1, 1)))

    # ---- 2.-3. text features -----------------------------------------------------------------------------------------
    def class_word(self, category: str) -> str:
        """Returns the reference's class word for ``category`` (lower case)."""
        return CLASS_WORDS.get(category, category).lower()

    def text_features(self, categories: Sequence[str], image_samples: Tensor, normal_samples: Tensor,
                      abnormal_samples: Tensor) -> Tensor:
        """Returns (B, 2M, E) normalised text features; M = R·bank prompts per state, prompt m = r·bank + b.

        ``image_samples`` (R, B, D) are added to the context vectors of image b, ``normal_samples`` /
        ``abnormal_samples`` (R, 1, D) to the state vectors (sample r of both paired, as the reference).
        """
        pfl, cfg = self.pfl, self.config
        samples, batch, _ = image_samples.shape
        bank = cfg.prompt_num
        tower = TextTower(self.clip)
        ids = tokenize(cfg.model, [f"{PLACEHOLDER} {self.class_word(c)}" for c in categories]).to(self.device)
        tokens = tower.token_embedding(ids)  # (B, 77, W)
        context = pfl.prompt_context[None, None] + image_samples.permute(1, 0, 2)[:, :, None, None, :]  # (B,R,b,P,W)
        learned = []
        for states, draws in ((pfl.prompt_state_normal, normal_samples), (pfl.prompt_state_abnormal, abnormal_samples)):
            state = states[None] + draws[:, 0, None, None, :]  # (R, bank, Q, W)
            learned.append(torch.cat([context, state.unsqueeze(0).expand(batch, -1, -1, -1, -1)], dim=3))
        prompts = torch.stack(learned, dim=1)  # (B, 2, R, bank, L, W)
        length = prompts.shape[-2]
        eot = end_of_text_index(ids)  # of "[SOS] X <class> [EOT]"
        shifted = eot + length - 1  # after the learned tokens replace "X"
        context_length = tokens.shape[1]
        if int(shifted.max()) >= context_length:
            raise ValueError(f"bayes_pfl: the class words of {sorted(set(categories))} with {length} learned tokens "
                             f"do not fit the text context of {context_length} tokens")
        suffix = tokens[:, 2:int(eot.max()) + 1]  # the class word tokens and [EOT] (padding after shorter ones)
        per_prompt = 2 * samples * bank
        prompts = prompts.reshape(batch, per_prompt, length, -1)
        sequences = torch.cat([tokens[:, None, :1].expand(-1, per_prompt, -1, -1), prompts,
                               suffix[:, None].expand(-1, per_prompt, -1, -1)], dim=2)
        features = encode_text_embeddings(self.clip, sequences.flatten(0, 1),
                                          shifted.repeat_interleave(per_prompt))
        features = features.reshape(batch, per_prompt, -1)
        return features / features.norm(dim=-1, keepdim=True)

    # ---- forward (4.-5.) ---------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, categories: Sequence[str], draws: PromptDraws, stage: int,
                with_kl: bool = False) -> BayesPFLOutput:
        """Returns text features, image logits and per-layer patch logits for the given prompt draws."""
        pfl = self.pfl
        global_features, patch_tokens = self.visual_features(images)
        context = [pfl.PFL_context.sample(global_features, e) for e in draws.context.unbind(0)]
        image_samples = torch.stack([s.zk for s in context])
        normal = [pfl.PFL_normal.sample(global_features, e) for e in draws.normal.unbind(0)]
        abnormal = [pfl.PFL_abnormal.sample(global_features, e) for e in draws.abnormal.unbind(0)]
        text = self.text_features(categories, image_samples, torch.stack([s.zk for s in normal]),
                                  torch.stack([s.zk for s in abnormal]))
        mapped = pfl.class_mapping(text)
        mapped = mapped / mapped.norm(dim=-1, keepdim=True)
        image = global_features if stage == 1 else pfl.image_mapping(global_features + pfl.fuse(patch_tokens))
        image = image / image.norm(dim=-1, keepdim=True)
        image_logits = pfl.temperature_image.exp() * (mapped @ image.unsqueeze(2)).squeeze(2)
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage == 1):
            layer_logits = []
            for layer, tokens in enumerate(patch_tokens):
                refined, dense = pfl.RCA(text, tokens, layer)
                logits = pfl.temperature_pixel.exp() * dense @ refined.permute(0, 2, 1)
                batch, count, channels = logits.shape
                side = int(math.isqrt(count))
                layer_logits.append(logits.permute(0, 2, 1).reshape(batch, channels, side, side))
        kl = None
        if with_kl:
            batch = images.shape[0]
            kl = (flow_kl_divergence(context[0], batch), flow_kl_divergence(normal[0], batch),
                  flow_kl_divergence(abnormal[0], batch))
        return BayesPFLOutput(text, image_logits, layer_logits, kl)

    def upsample(self, logits: Tensor) -> Tensor:
        """Returns patch-grid logits upsampled to the input size (bilinear, align_corners True, as the reference)."""
        return F.interpolate(logits, size=self.input_size, mode="bilinear", align_corners=True)

    # ---- inference ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_batch(self, images: Tensor, category: str) -> tuple[Tensor, Tensor]:
        """Returns (classifier scores (B,), unsmoothed maps (B, S, S)): the Monte-Carlo means of steps 4 and 5."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(f"bayes_pfl: expected a (B, 3, {self.input_size[0]}, {self.input_size[1]}) batch, got "
                             f"shape {tuple(images.shape)}")
        out = self.forward(images, [category] * len(images), self.inference_draws(len(images)), self.config.stage)
        prompts = out.image_logits.shape[1] // 2
        pairs = torch.stack([out.image_logits[:, :prompts], out.image_logits[:, prompts:]], dim=1)
        scores = pairs.softmax(dim=1)[:, 1].mean(dim=1)
        maps = []
        for b in range(len(images)):  # one image at a time: 2M upsampled maps per layer are large at 518 px
            total = torch.zeros(self.input_size, device=self.device)
            for logits in out.layer_logits:
                upsampled = self.upsample(logits[b:b + 1])[0]
                total = total + torch.stack([upsampled[:prompts], upsampled[prompts:]]).softmax(dim=0)[1].sum(dim=0)
            maps.append(total / (len(out.layer_logits) * prompts))
        return scores, torch.stack(maps)

    def topk_for(self, category: str) -> int:
        """Returns k of the fusion's top-k map score for ``category``."""
        cfg: BayesPFLConfig = self.config
        return cfg.topk_small if category in cfg.topk_small_categories else cfg.topk

    def fuse_scores(self, scores: Tensor, maps: Tensor, category: str) -> Tensor:
        """Returns α·minmax(scores) + (1 - α)·minmax(top-k mean of each unsmoothed map) over the set (step 6)."""
        k = min(self.topk_for(category), maps[0].numel())
        map_scores = maps.flatten(1).topk(k, dim=1).values.mean(dim=1)

        def minmax(x: Tensor) -> Tensor:
            return (x - x.min()) / (x.max() - x.min() + 1e-8)

        alpha = self.config.fusion_alpha
        return alpha * minmax(scores) + (1 - alpha) * minmax(map_scores)

    @torch.no_grad()
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and smoothed maps (B, S, S); with the fusion the batch is the whole set."""
        if self.transductive:
            return self.predict_set(ImageSet.from_tensor(images, batch_size=max(1, len(images))), category)
        self.warn_if_untrained()
        scores, maps = self.score_batch(images, category)
        return Prediction(scores, gaussian_filter(maps, self.config.sigma))

    @torch.no_grad()
    def predict_set(self, images: ImageSet, category: str) -> Prediction:
        """Returns the scores and maps of a whole category (the fusion's min-max runs over it)."""
        self.warn_if_untrained()
        batches = [self.score_batch(batch, category) for batch in images.batches()]
        scores, maps = torch.cat([s for s, _ in batches]), torch.cat([m for _, m in batches])
        if self.config.image_score == "fusion":
            scores = self.fuse_scores(scores, maps, category)
        return Prediction(scores, gaussian_filter(maps, self.config.sigma))

    # ---- 7. training -------------------------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        """Returns Adam over the reference's parameter groups (their base lr kept for the schedule)."""
        cfg: BayesPFLConfig = self.config
        rates = {"prompts": cfg.lr_prompts, "temperatures": cfg.lr_temperatures, "flows": cfg.lr_flows,
                 "linear": cfg.train.lr, "classifier": cfg.train.lr}
        groups = [{"params": params, "lr": rates[name], "base_lr": rates[name], "name": name}
                  for name, params in self.pfl.parameter_groups().items() if params]
        beta1, beta2 = cfg.train.betas
        self._optimizer = torch.optim.Adam(groups, lr=cfg.train.lr, betas=(beta1, beta2),
                                           weight_decay=cfg.train.weight_decay)
        return self._optimizer

    def prepare_training(self, dataset: Dataset) -> None:
        """Counts the steps per epoch for the learning-rate schedule and the stage switch."""
        options = self.config.train
        steps_per_epoch = math.ceil(len(training_samples(dataset, options.split)) / options.batch_size)
        self._schedule = (steps_per_epoch, max(1, options.epochs - self.config.stage2_epochs))

    def steps_taken(self) -> int:
        """Returns the optimiser steps done so far (read from Adam's state, so it survives a resume)."""
        state = self._optimizer.state.get(self.pfl.class_mapping.weight) if self._optimizer is not None else None
        return int(state["step"]) if state else 0

    def training_stage(self) -> int:
        """Returns the stage of the next step and sets the groups' learning rates for it (warm-up + cosine)."""
        if self._schedule is None or self._optimizer is None:
            return 1  # training_step called on its own: stage 1 at the base rates
        steps_per_epoch, stage1_epochs = self._schedule
        step, epochs = self.steps_taken(), self.config.train.epochs
        stage = 1 if step // steps_per_epoch < stage1_epochs else 2
        total = steps_per_epoch * epochs
        warmup = int(self.config.warmup_fraction * total)
        if step < warmup:  # transformers' get_cosine_schedule_with_warmup, as a factor of the base rates
            factor = step / max(1, warmup)
        else:
            factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
        for group in self._optimizer.param_groups:
            if stage == 1:
                group["lr"] = group["base_lr"] * factor
            else:  # stage 2: only the classification branch learns, at a constant rate
                group["lr"] = group["base_lr"] if group["name"] == "classifier" else 0.0
        return stage

    def training_step(self, images: Tensor, masks: Tensor, labels: Tensor,
                      samples: Sequence[Sample] = ()) -> dict[str, Tensor]:
        """Returns the stage-1 prompt flow loss (or the stage-2 CE) of one batch; one random prompt pair learns."""
        stage = self.training_stage()
        categories = [s.category for s in samples] if samples else ["object"] * len(images)
        draws = self.training_draws(len(images))
        pair = int(torch.randint(0, self.config.prompt_num, (1,)).item())
        return self.losses(images, masks, labels, categories, draws, pair, stage)

    def losses(self, images: Tensor, masks: Tensor, labels: Tensor, categories: Sequence[str], draws: PromptDraws,
               pair: int, stage: int = 1) -> dict[str, Tensor]:
        """Returns the reference's loss terms for given draws and prompt pair (the parity check fixes both)."""
        bank = self.config.prompt_num
        out = self.forward(images, categories, draws, stage, with_kl=stage == 1)
        selected = [pair, pair + bank]
        image_loss = F.cross_entropy(out.image_logits[:, selected], labels.to(self.device).long())
        self._fitted = True
        if stage == 2:
            return {"loss": image_loss, "image": image_loss.detach()}
        gt = (masks.to(self.device) > 0.5).to(torch.float32)
        focal = dice = image_loss.new_zeros(())
        for logits in out.layer_logits:
            probabilities = self.upsample(logits[:, selected]).softmax(dim=1)
            focal = focal + balanced_focal_loss(probabilities, gt)
            dice = dice + foreground_dice_loss(probabilities, gt)
        assert out.kl is not None
        regulariser = 0.01 * (out.kl[0] + out.kl[1] + out.kl[2])
        orthogonal = orthogonality_loss(out.text[:, :bank]) + orthogonality_loss(out.text[:, bank:])
        loss = image_loss + focal + dice + regulariser + orthogonal
        return {"loss": loss, "image": image_loss.detach(), "focal": focal.detach(), "dice": dice.detach(),
                "kl": regulariser.detach(), "orthogonal": orthogonal.detach()}

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def state_description(self) -> str:
        """Returns what the learned state holds, for error messages."""
        cfg = self.config
        return (f"Bayes-PFL state (bank {cfg.prompt_num}, context {cfg.prompt_context_len}, state "
                f"{cfg.prompt_state_len}, {cfg.num_flows} flows, {len(cfg.feature_layers)} feature layers)")

    def reference_state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Returns the learned parts in the authors' layout, ``{"MyModel": Context_Prompting.state_dict()}``."""
        return {REFERENCE_ENTRY: {k: v.detach().cpu().clone() for k, v in self.pfl.state_dict().items()}}

    def is_reference_checkpoint(self, checkpoint: dict[str, Any]) -> bool:
        """Returns whether ``checkpoint`` is an authors' file (``{"MyModel": ...}``)."""
        return isinstance(checkpoint.get(REFERENCE_ENTRY), dict)

    def load_reference_checkpoint(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Loads an authors' ``train_*.pth`` / ``epoch_post_*.pth``; keys that do not fit are named."""
        state = checkpoint[REFERENCE_ENTRY]
        expected = {k: tuple(v.shape) for k, v in self.pfl.state_dict().items()}
        check_keys(state, expected, f"checkpoint {path}: {self.state_description()} in the authors' layout")
        self.load_state_dict({f"pfl.{k}": v for k, v in state.items()})


def orthogonality_loss(embeddings: Tensor) -> Tensor:
    """Returns the mean over (B, L, L) of the squared off-diagonal cosine similarities of (B, L, E) embeddings."""
    normalised = F.normalize(embeddings, p=2, dim=-1)
    similarity = torch.einsum("blc,bkc->blk", normalised, normalised) ** 2
    eye = torch.eye(embeddings.shape[1], device=embeddings.device).unsqueeze(0)
    return (similarity * (1 - eye)).mean()
