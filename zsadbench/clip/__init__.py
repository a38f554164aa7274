"""Shared CLIP machinery every CLIP-based method composes (one place for each thing).

- :mod:`~zsadbench.clip.backbone`: :func:`load_clip` (open_clip tag / local file / ``random``; QuickGELU handling;
  positional-embedding resize ``bilinear`` or ``bicubic`` without antialias), tiny test configs.
- :mod:`~zsadbench.clip.attention`: the attention step as functions (:func:`project_qkv`, :func:`attend`,
  :func:`merge_heads` with optional per-head weights, :func:`attention`, :func:`block_forward`).
- :mod:`~zsadbench.clip.vision`: :func:`embed_patches`, :func:`forward_vision` (1-based layer taps = raw residual
  stream after block k), :func:`project_tokens` (ln_post + proj), :func:`forward_packed` (many short sequences).
- :mod:`~zsadbench.clip.windows`: WinCLIP window indices, incidence matrices, harmonic aggregation,
  :func:`encode_windows`.
- :mod:`~zsadbench.clip.text`: prompt ensembles, :func:`encode_text_embeddings` (from token embeddings, with deep
  prompts), :func:`encode_text`, :class:`TextFeatureCache`.
- :mod:`~zsadbench.clip.testing`: clip-like seeded random weights and synthetic images for tests and parity.

Example (AnomalyCLIP-style backbone, layer taps)::

    from zsadbench.clip import load_clip, forward_vision
    backbone = load_clip("ViT-L-14-336-quickgelu", "openai", image_size=518, pos_embed_mode="bilinear")
    out = forward_vision(backbone.visual, images, taps=(6, 12, 18, 24))   # out.taps[24]: (B, 1 + 37², 1024)
"""

from zsadbench.clip.attention import attend, attention, block_forward, merge_heads, project_qkv, split_heads
from zsadbench.clip.backbone import (
    ClipBackbone,
    WeightsMismatchError,
    WeightsNotFoundError,
    load_clip,
    resize_pos_embed,
    set_image_size,
)
from zsadbench.clip.text import (
    TextFeatureCache,
    compositional_prompts,
    encode_text,
    encode_text_embeddings,
    end_of_text_index,
    prompt_ensemble_features,
    tokenize,
)
from zsadbench.clip.vision import VisionOutput, embed_patches, forward_packed, forward_vision, project_tokens
from zsadbench.clip.windows import (
    WindowEmbeddings,
    encode_windows,
    harmonic_aggregation,
    window_incidence,
    window_indices,
)

__all__ = [
    "ClipBackbone", "TextFeatureCache", "VisionOutput", "WeightsMismatchError", "WeightsNotFoundError",
    "WindowEmbeddings", "attend", "attention", "block_forward", "compositional_prompts", "embed_patches",
    "encode_text", "encode_text_embeddings", "encode_windows", "end_of_text_index", "forward_packed",
    "forward_vision", "harmonic_aggregation", "load_clip", "merge_heads", "project_qkv", "project_tokens",
    "prompt_ensemble_features", "resize_pos_embed", "set_image_size", "split_heads", "tokenize", "window_incidence",
    "window_indices",
]
