"""The attention step and the residual block of open_clip's CLIP towers, as plain functions methods can extend.

open_clip (>= 2.26) blocks are batch-first ``ResidualAttentionBlock``s with an ``nn.MultiheadAttention`` whose packed
``in_proj_weight`` / ``in_proj_bias`` hold q, k and v, and whose ``out_proj`` mixes the heads. The functions here
compute exactly what ``block(x)`` computes, split into the steps other attention variants replace:

- :func:`project_qkv` -> q, k, v per head (B, H, N, d);
- :func:`attend` -> softmax(q kᵀ / sqrt(d)) v per head (scaled dot-product attention, optional additive mask);
- :func:`merge_heads` -> the out-projection of the concatenated heads, optionally re-weighting each head first
  (``head_weights``: HeadCLIP's learnable head weights scale head outputs before ``out_proj``; the bias is not scaled);
- :func:`block_forward` -> x + attn(ln_1(x)); x + mlp(ln_2(x)), with a pluggable attention function.

A V-V path (AnomalyCLIP's DPAM) is ``merge_heads(attn, attend(v, v, v))`` with q, k, v from :func:`project_qkv`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.clip.backbone import ResidualBlock

AttentionFn = Callable[[nn.MultiheadAttention, Tensor, Tensor | None], Tensor]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """Returns (..., N, H*d) tokens as (..., H, N, d) heads."""
    *lead, n, width = x.shape
    return x.reshape(*lead, n, num_heads, width // num_heads).transpose(-3, -2)


def project_qkv(attn: nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns q, k, v as (B, H, N, d) heads, projected with the block's packed in-projection weight and bias."""
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)
    heads = attn.num_heads
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """Returns softmax(q kᵀ / sqrt(d) + mask) v per head, (B, H, Nq, d); ``attn_mask`` is additive (-inf = blocked)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def merge_heads(attn: nn.MultiheadAttention, heads: Tensor, head_weights: Tensor | None = None) -> Tensor:
    """Returns the out-projection (B, N, D) of (B, H, N, d) head outputs, each head scaled by ``head_weights``.

    ``head_weights`` broadcasts against (B, H): shape (H,) for one weight per head, (B, H) for per-image weights.
    """
    if head_weights is not None:
        heads = heads * head_weights.reshape(*head_weights.shape, 1, 1)
    batch, num_heads, n, dim = heads.shape
    merged = heads.transpose(1, 2).reshape(batch, n, num_heads * dim)
    return F.linear(merged, attn.out_proj.weight, attn.out_proj.bias)


def attention(attn: nn.MultiheadAttention, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """Returns standard multi-head self-attention of (B, N, D) tokens (what ``attn(x, x, x)[0]`` computes)."""
    q, k, v = project_qkv(attn, x)
    if attn_mask is not None and attn_mask.dtype not in (q.dtype, torch.bool):
        attn_mask = attn_mask.to(q.dtype)
    return merge_heads(attn, attend(q, k, v, attn_mask))


def block_forward(block: ResidualBlock, x: Tensor, attn_mask: Tensor | None = None,
                  attention_fn: AttentionFn = attention) -> Tensor:
    """Returns the output of one open_clip residual block for batch-first tokens (B, N, D).

    ``attention_fn(attn, ln_1(x), attn_mask)`` replaces the attention step; the default reproduces ``block(x)``.
    """
    x = x + block.ls_1(attention_fn(block.attn, block.ln_1(x), attn_mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
