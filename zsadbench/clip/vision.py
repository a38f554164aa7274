"""Vision-tower forwards over open_clip's ``VisionTransformer``: token taps, projections, packed short sequences.

Layer numbers are 1-based and count residual blocks, as the papers do: tap ``k`` is the raw residual stream right
after block ``k`` (no ``ln_post``, no projection); MuSc taps 6/12/18/24 of ViT-L/14, AnomalyCLIP builds its own
dual-path loop from :func:`embed_patches`, :func:`zsadbench.clip.attention.block_forward` and
:func:`project_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.clip.attention import AttentionFn, attention, block_forward, split_heads


def check_supported(visual: nn.Module) -> None:
    """Raises a clear error for vision towers the machinery does not cover (CLS-pooled ViTs only)."""
    if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None \
            or getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
        raise NotImplementedError(f"{type(visual).__name__}: zsadbench's CLIP machinery supports open_clip "
                                  "VisionTransformers with a CLS token and ln_post before the projection")


def embed_patches(visual: nn.Module, images: Tensor) -> Tensor:
    """Returns (B, 1 + P, D) tokens: patch embedding, CLS prepended, positional embedding added (before ln_pre)."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    if x.shape[1] != visual.positional_embedding.shape[0]:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} give {x.shape[1] - 1} patches but the vision "
                         f"tower is set up for {tuple(visual.image_size)} ({visual.positional_embedding.shape[0] - 1} "
                         "patches); resize the images or load the backbone with that image_size")
    return x + visual.positional_embedding.to(x.dtype)


def project_tokens(visual: nn.Module, tokens: Tensor) -> Tensor:
    """Returns ``ln_post(tokens) @ proj`` (the joint embedding space), for any (..., D) tokens."""
    x = visual.ln_post(tokens)
    return x @ visual.proj if visual.proj is not None else x


@dataclass
class VisionOutput:
    """What :func:`forward_vision` returns."""

    pooled: Tensor  # (B, E): ln_post(final CLS) @ proj, what open_clip's encode_image returns
    tokens: Tensor  # (B, 1 + P, D): final residual stream, before ln_post (CLS first)
    taps: dict[int, Tensor] = field(default_factory=dict)  # block k (1-based) -> (B, 1 + P, D) after block k


def forward_vision(visual: nn.Module, images: Tensor, taps: Sequence[int] = (), *,
                   attention_fn: AttentionFn = attention) -> VisionOutput:
    """Returns the pooled embedding, the final tokens and the residual stream after each block in ``taps``."""
    check_supported(visual)
    blocks = visual.transformer.resblocks
    wanted = set(taps)
    bad = [k for k in wanted if not 1 <= k <= len(blocks)]
    if bad:
        raise ValueError(f"layer taps {sorted(bad)} are outside 1..{len(blocks)} (1-based block numbers)")
    x = visual.ln_pre(embed_patches(visual, images))
    out: dict[int, Tensor] = {}
    for index, block in enumerate(blocks, start=1):
        x = block_forward(block, x, attention_fn=attention_fn)
        if index in wanted:
            out[index] = x
    return VisionOutput(project_tokens(visual, x[:, 0]), x, {k: out[k] for k in taps})


@dataclass(frozen=True)
class SequenceGroup:
    """``count`` sequences of ``length`` tokens, packed consecutively; ``keep`` = output rows per sequence."""

    count: int
    length: int
    keep: int  # 1: only the CLS row of each sequence leaves the last block; ``length``: every row


def forward_packed(visual: nn.Module, groups: Sequence[tuple[Tensor, bool]]) -> list[Tensor]:
    """Returns the final-block tokens of many independent sequences run through the tower in one packed pass.

    ``groups`` = [(tokens (n_i, L_i, D) after ln_pre, keep_all_tokens_i)]; sequences of one group share a length and
    attend only within themselves. Token-wise layers (LayerNorm, projections, MLP) run once over all rows of all
    groups (large matrix products); attention runs per group. The last block computes only the rows that are
    returned: every row where ``keep_all_tokens_i``, else the first (CLS) row of each sequence, as (n_i, 1, D).
    Output rows are the residual stream before ``ln_post``.
    """
    check_supported(visual)
    dim = groups[0][0].shape[-1]
    layout = [SequenceGroup(t.shape[0], t.shape[1], t.shape[1] if keep_all else 1) for t, keep_all in groups]
    x = torch.cat([t.reshape(-1, dim) for t, _ in groups])
    blocks = visual.transformer.resblocks
    for index, block in enumerate(blocks):
        last = index == len(blocks) - 1
        x = _packed_block(block, x, layout, last)
    out, offset = [], 0
    for group in layout:
        rows = group.count * group.keep
        out.append(x[offset:offset + rows].reshape(group.count, group.keep, dim))
        offset += rows
    return out


def _packed_block(block: nn.Module, x: Tensor, layout: Sequence[SequenceGroup], last: bool) -> Tensor:
    """Returns one residual block applied to packed rows (on the last block: only the kept rows)."""
    attn = block.attn
    heads, dim = attn.num_heads, x.shape[-1]
    h = block.ln_1(x)
    if not last or all(g.keep == g.length for g in layout):
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q_all, kv = qkv[:, :dim], qkv[:, dim:]
        keep_rows = None
    else:
        kv = F.linear(h, attn.in_proj_weight[dim:], attn.in_proj_bias[dim:])
        keep_rows = _kept_rows(layout, x.device)
        q_all = F.linear(h[keep_rows], attn.in_proj_weight[:dim], attn.in_proj_bias[:dim])
    outputs, offset, q_offset = [], 0, 0
    for group in layout:
        rows = group.count * group.length
        q_len = group.length if keep_rows is None else group.keep
        k_v = kv[offset:offset + rows].reshape(group.count, group.length, 2 * dim)
        k, v = split_heads(k_v[..., :dim], heads), split_heads(k_v[..., dim:], heads)
        q = split_heads(q_all[q_offset:q_offset + group.count * q_len].reshape(group.count, q_len, dim), heads)
        o = F.scaled_dot_product_attention(q, k, v)
        outputs.append(o.transpose(1, 2).reshape(group.count * q_len, dim))
        offset += rows
        q_offset += group.count * q_len
    if keep_rows is not None:
        x = x[keep_rows]
    x = x + block.ls_1(F.linear(torch.cat(outputs), attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _kept_rows(layout: Sequence[SequenceGroup], device: torch.device) -> Tensor:
    """Returns the packed row indices that the last block outputs (CLS rows, or all rows of keep-all groups)."""
    parts, offset = [], 0
    for group in layout:
        starts = offset + torch.arange(group.count, device=device) * group.length
        parts.append((starts[:, None] + torch.arange(group.keep, device=device)).reshape(-1))
        offset += group.count * group.length
    return torch.cat(parts)
