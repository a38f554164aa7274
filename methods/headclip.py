"""HeadCLIP: Domain Adaptation of Attention Heads for Zero-shot Anomaly Detection (Jeong et al., 2025) — reconstruction.

Paper: https://arxiv.org/abs/2505.22259v2 ("Head-adaptive CLIP"). The official code
(github.com/kiyoonjeong0305/HeadCLIP) is not available to us, so this is a reconstruction (documented in
docs/methods/headclip.md), labelled "HeadCLIP (reconstruction)" in every run and report until it can be checked
against the official code. What the abstract establishes: learnable text prompts for normality and abnormality,
learnable head weights in the image encoder, and a joint anomaly score that brings pixel-level evidence into the
image score.

Method, as reconstructed:

1. Base model: AnomalyCLIP unchanged (methods/anomalyclip.py): ViT-L/14@336px with QuickGELU at 518 px, the DPAM
   V-V path from block 6, patch features ln_post(v_24) @ proj, global feature o_24[CLS] @ proj without ln_post, and
   object-agnostic prompts "[V1..V12] object." / "[W1..W12] damaged object." with deep prompts (4 tokens overwriting
   positions 1..4 of text blocks 2..9, rounded to fp16).
2. Learnable Head Weights (LHW, zsadbench.clip.head_weights): one scalar per (vision layer, head), initialised to 1,
   multiplying each head's output before the attention out-projection (bias unscaled), in both paths of a DPAM layer;
   all 24 layers by default. ``static`` parameters (default) or ``conditioned`` on the layer's CLS token by a
   zero-initialised linear map. With all weights 1 the model is exactly AnomalyCLIP.
3. Joint Anomaly Score (JAS): s = α·p_global + (1 − α)·aggregate(M), M the smoothed 518×518 map, aggregate = max or
   the mean of the top-q % pixels, α = 0.5. With α = 1 the image score is AnomalyCLIP's.
4. Training: prompts and head weights jointly, with AnomalyCLIP's objective (CE on the global logits + 4·(focal + two
   Dice terms) on the layer-24 map) and optimiser (Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, seed 111),
   on another dataset's test split. Gradients reach the head weights through the frozen vision tower. JAS is
   inference-only.

Checkpoints: zsadbench's own (``prompt_learner.*`` in the AnomalyCLIP reference key layout + ``head_weights.*``:
``weight`` (layers, heads) static, ``generators.{i}.weight|bias`` conditioned), the nested
``{"prompt_learner": ..., "head_weights": ...}`` layout, and AnomalyCLIP's released ``{"prompt_learner": ...}`` files
(head weights then stay at 1: AnomalyCLIP's prompts with the joint score).

Deliberate deviations: every reconstructed choice above is one (layers, parameterisation, both paths weighted,
JAS formula, objective); the AnomalyCLIP deviations (own random generators, any batch size, SDPA) apply as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from zsadbench.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig

from zsadbench.checkpoints import check_keys
from zsadbench.clip.dual_path import HeadWeightsFn
from zsadbench.clip.head_weights import HeadWeights, HeadWeightsMode, select_layers
from zsadbench.registry import register_method
from zsadbench.types import Prediction


@dataclass
class HeadWeightsConfig:
    """Learnable head weights (LHW)."""

    enabled: bool = True  # False: exactly AnomalyCLIP's vision tower
    mode: HeadWeightsMode = "static"  # "static" parameters or "conditioned" on each layer's CLS token
    layers: str = "all"  # "all", "dpam" (the V-V layers), "last_K" or a comma list of 1-based vision layers


@dataclass
class JointScoreConfig:
    """Joint anomaly score (JAS): alpha·p_global + (1 - alpha)·aggregate(map)."""

    alpha: float = 0.5
    aggregate: Literal["max", "topk_mean"] = "max"
    topk_percent: float = 1.0  # topk_mean: mean of the top ceil(q/100 · H·W) map values


@dataclass
class HeadCLIPConfig(AnomalyCLIPConfig):
    """HeadCLIP (reconstruction) settings: AnomalyCLIP's plus the head weights and the joint score."""

    lhw: HeadWeightsConfig = field(default_factory=HeadWeightsConfig)
    jas: JointScoreConfig = field(default_factory=JointScoreConfig)


def joint_anomaly_score(global_probability: Tensor, anomaly_maps: Tensor, alpha: float, aggregate: str = "max",
                        topk_percent: float = 1.0) -> Tensor:
    """Returns alpha·p_global + (1 - alpha)·aggregate(map) per image, for (B,) probabilities and (B, H, W) maps."""
    pixels = anomaly_maps.flatten(1)
    if aggregate == "max":
        pooled = pixels.amax(dim=1)
    elif aggregate == "topk_mean":
        k = max(1, math.ceil(topk_percent / 100 * pixels.shape[1]))
        pooled = pixels.topk(min(k, pixels.shape[1]), dim=1).values.mean(dim=1)
    else:
        raise ValueError(f"jas.aggregate={aggregate!r}: expected 'max' or 'topk_mean'")
    return alpha * global_probability + (1 - alpha) * pooled


@register_method("headclip")
class HeadCLIP(AnomalyCLIP):
    """HeadCLIP (reconstruction): AnomalyCLIP + learnable head weights + joint anomaly score."""

    label = "HeadCLIP (reconstruction)"
    paper = "arXiv:2505.22259"
    reference = ""  # no official code: see the module docstring
    code_license = "none (no official code)"
    weights_license = "MIT (OpenAI CLIP)"
    Config = HeadCLIPConfig
    # untrained prompts, head weights at their identity initialisation: guards the inference path and the joint score
    presets = {"smoke": {"model": "tiny-ViT-L-14-336-quickgelu", "pretrained": "random", "image_size": 56}}
    uses_frozen_stages = False  # the head weights act inside the tower: no feature cache (zsadbench.feature_cache)
    loads_checkpoints_of = ("anomalyclip",)  # its prompts, from zsadbench's own AnomalyCLIP training (heads stay 1)
    regression_variants = {"zero-shot": presets["smoke"]}

    def __init__(self, config: HeadCLIPConfig | None = None, *, seed: int = 0, **overrides: object) -> None:
        super().__init__(config, seed=seed, **overrides)
        jas = self.config.jas
        if not 0.0 <= jas.alpha <= 1.0 or not 0.0 < jas.topk_percent <= 100.0:
            raise ValueError(f"headclip: jas.alpha must lie in [0, 1] and jas.topk_percent in (0, 100], got "
                             f"{jas.alpha} and {jas.topk_percent}")

    # ---- 2. learnable head weights -----------------------------------------------------------------------------------
    def build_learnable_parts(self) -> None:
        """Creates the prompts (AnomalyCLIP's) and the head weights of the selected vision layers."""
        super().build_learnable_parts()
        cfg: HeadCLIPConfig = self.config
        blocks = self.clip.visual.transformer.resblocks
        layers = select_layers(cfg.lhw.layers, len(blocks), cfg.vv_start_layer) if cfg.lhw.enabled else ()
        attn = blocks[0].attn
        self.head_weights = HeadWeights(layers, attn.num_heads, attn.embed_dim, cfg.lhw.mode)

    def learnable_modules(self) -> dict[str, nn.Module]:
        """Returns the prompts and the head weights, by checkpoint key prefix."""
        return {**super().learnable_modules(), "head_weights": self.head_weights}

    def encode_images(self, images: Tensor, head_weights: HeadWeightsFn | None = None) -> tuple[Tensor, list[Tensor]]:
        """Returns global and patch features with the head weights applied (gradients reach them when training)."""
        return super().encode_images(images, self.head_weights if head_weights is None else head_weights)

    # ---- 3. joint anomaly score --------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns joint anomaly scores (B,) and AnomalyCLIP-style smoothed maps (B, S, S)."""
        prediction = super().predict(images, category)  # image score = p_global, map = smoothed M
        jas = self.config.jas
        scores = joint_anomaly_score(prediction.image_scores, prediction.anomaly_maps, jas.alpha, jas.aggregate,
                                     jas.topk_percent)
        return Prediction(scores, prediction.anomaly_maps)

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def state_description(self) -> str:
        """Returns what the learnable state holds, for error messages."""
        lhw = self.config.lhw
        return f"{super().state_description()}, head weights {lhw.mode} on layers {lhw.layers!r}"

    def load_reference_checkpoint(self, checkpoint: dict, path: str | Path) -> None:
        """Loads the nested ``{"prompt_learner", "head_weights"}`` layout or AnomalyCLIP's (head weights stay 1)."""
        super().load_reference_checkpoint(checkpoint, path)
        if "head_weights" in checkpoint:
            expected = {k: tuple(v.shape) for k, v in self.head_weights.state_dict().items()}
            check_keys(checkpoint["head_weights"], expected, f"head weights of {self.state_description()}")
            self.head_weights.load_state_dict(checkpoint["head_weights"])
