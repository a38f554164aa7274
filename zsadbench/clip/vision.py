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
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from zsadbench.clip.attention import AttentionFn, attention, block_forward, split_heads
from zsadbench.clip.backbone import ResidualBlock, VisionTower


def check_supported(visual: VisionTower) -> None:
    """Raises a clear error for vision towers the machinery does not cover (CLS-pooled ViTs only)."""
    if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None \
            or getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
        raise NotImplementedError(f"{type(visual).__name__}: zsadbench's CLIP machinery supports open_clip "
                                  "VisionTransformers with a CLS token and ln_post before the projection")


def embed_patches(visual: VisionTower, images: Tensor) -> Tensor:
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


def project_tokens(visual: VisionTower, tokens: Tensor) -> Tensor:
    """Returns ``ln_post(tokens) @ proj`` (the joint embedding space), for any (..., D) tokens."""
    x = visual.ln_post(tokens)
    return x @ visual.proj if visual.proj is not None else x


def project_each(visual: VisionTower, tokens: Tensor) -> Tensor:
    """Returns :func:`project_tokens` of (B, D) tokens, one image at a time: the same bits whatever the batch.

    A (B, D) @ (D, E) product's rounding depends on B (the BLAS kernel chosen), so a pooled embedding would differ
    with the batch its image came in; per image it equals what the feature cache stored (zsadbench.feature_cache).
    """
    if not len(tokens):
        return project_tokens(visual, tokens)
    return torch.stack([project_tokens(visual, row) for row in tokens])


@dataclass
class VisionOutput:
    """What :func:`forward_vision` returns."""

    pooled: Tensor  # (B, E): ln_post(final CLS) @ proj, what open_clip's encode_image returns
    tokens: Tensor  # (B, 1 + P, D): final residual stream, before ln_post (CLS first)
    taps: dict[int, Tensor] = field(default_factory=dict)  # block k (1-based) -> (B, 1 + P, D) after block k


def forward_vision(visual: VisionTower, images: Tensor, taps: Sequence[int] = (), *,
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
    return VisionOutput(project_each(visual, x[:, 0]), x, {k: out[k] for k in taps})


ROW_CHUNK = 8192  # token rows per token-wise step (~3 images of WinCLIP windows): bounds the MLP buffer to ~120 MB


@dataclass(frozen=True)
class SequenceGroup:
    """``count`` sequences of ``length`` tokens, packed consecutively; ``keep`` = output rows per sequence."""

    count: int
    length: int
    keep: int  # 1: only the CLS row of each sequence leaves the last block; ``length``: every row


@torch.no_grad()
def forward_packed(visual: VisionTower, tokens: Tensor, groups: Sequence[tuple[Tensor, bool]]) -> list[Tensor]:
    """Returns the final-block tokens of many independent sequences assembled from a shared pool of tokens.

    ``tokens`` (U, D): token rows after ``ln_pre``. ``groups`` = [(index (n_i, L_i) into those rows, keep_all_i)]:
    n_i sequences of length L_i each, attending only within themselves. Token-wise layers (LayerNorm, projections,
    MLP) run over all rows of all groups together (large matrix products over up to ``ROW_CHUNK`` rows, into buffers
    allocated once per call rather than once per block); attention runs per group. Two shortcuts leave the result
    unchanged: the first block's q/k/v projection runs once per pool row (every sequence starts from copies of those
    rows), and the last block computes only the rows returned: every row where ``keep_all_i``, else the first (CLS)
    row of each sequence. Returns per group (n_i, L_i or 1, D): the residual stream before ``ln_post``. Inference only.
    """
    check_supported(visual)
    dim = tokens.shape[-1]
    layout = [SequenceGroup(index.shape[0], index.shape[1], index.shape[1] if keep_all else 1)
              for index, keep_all in groups]
    row_index = torch.cat([index.reshape(-1) for index, _ in groups]).to(tokens.device)
    x = tokens.index_select(0, row_index)
    qkv = x.new_empty(x.shape[0], 3 * dim)
    attended = x.new_empty(x.shape[0], dim)
    blocks = visual.transformer.resblocks
    mlp_width = getattr(getattr(blocks[0].mlp, "c_fc", None), "out_features", 0)
    hidden = x.new_empty(min(x.shape[0], ROW_CHUNK), mlp_width)
    for number, block in enumerate(blocks, start=1):
        attn = block.attn
        if number == 1:
            pool_qkv = F.linear(block.ln_1(tokens), attn.in_proj_weight, attn.in_proj_bias)
            torch.index_select(pool_qkv, 0, row_index, out=qkv)
            del pool_qkv
        elif number < len(blocks):
            for start in range(0, x.shape[0], ROW_CHUNK):
                rows = slice(start, start + ROW_CHUNK)
                torch.addmm(attn.in_proj_bias, block.ln_1(x[rows]), attn.in_proj_weight.T, out=qkv[rows])
        if number < len(blocks):
            _packed_attention(attn, qkv, layout, attended)
            x = _packed_residual(block, x, attended, hidden)
        else:
            x = _packed_last_block(block, x, layout, qkv, hidden)
    out, offset = [], 0
    for group in layout:
        count = group.count * group.keep
        out.append(x[offset:offset + count].reshape(group.count, group.keep, dim))
        offset += count
    return out


def _packed_attention(attn: nn.MultiheadAttention, qkv: Tensor, layout: Sequence[SequenceGroup], out: Tensor,
                      queries: Tensor | None = None) -> None:
    """Writes per-sequence attention (heads merged, before out_proj) into ``out``.

    ``qkv`` rows hold q|k|v of every packed row; with ``queries`` given (last block) q comes from those rows instead,
    ``group.keep`` per sequence.
    """
    heads, dim = attn.num_heads, qkv.shape[-1] // 3
    offset = q_offset = 0
    for group in layout:
        rows = group.count * group.length
        k_v = qkv[offset:offset + rows, dim:].reshape(group.count, group.length, 2 * dim)
        k, v = split_heads(k_v[..., :dim], heads), split_heads(k_v[..., dim:], heads)
        q_len = group.length if queries is None else group.keep
        q_rows = qkv[offset:offset + rows, :dim] if queries is None \
            else queries[q_offset:q_offset + group.count * q_len]
        q = split_heads(q_rows.reshape(group.count, q_len, dim), heads)
        o = F.scaled_dot_product_attention(q, k, v)  # (n, H, q_len, d)
        target = out[q_offset:q_offset + group.count * q_len].view(group.count, q_len, heads, dim // heads)
        target.copy_(o.transpose(1, 2))
        offset += rows
        q_offset += group.count * q_len


def _packed_residual(block: ResidualBlock, x: Tensor, attended: Tensor, hidden: Tensor) -> Tensor:
    """Returns ``x`` after the block's out-projection residual and MLP residual (in place, in row chunks).

    ``hidden`` is a reusable (chunk rows, MLP width) buffer: writing into it avoids a fresh ~100 MB allocation (and its
    page faults) in every block.
    """
    attn, mlp = block.attn, block.mlp
    plain = isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity) \
        and list(mlp._modules) == ["c_fc", "gelu", "c_proj"]
    for start in range(0, x.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        chunk = x[rows]
        if plain:
            chunk.addmm_(attended[rows], attn.out_proj.weight.T).add_(attn.out_proj.bias)
            buffer = hidden[:chunk.shape[0]]
            torch.addmm(mlp.c_fc.bias, block.ln_2(chunk), mlp.c_fc.weight.T, out=buffer)
            _activation_(mlp.gelu, buffer)
            chunk.addmm_(buffer, mlp.c_proj.weight.T).add_(mlp.c_proj.bias)
        else:
            chunk.add_(block.ls_1(F.linear(attended[rows], attn.out_proj.weight, attn.out_proj.bias)))
            chunk.add_(block.ls_2(mlp(block.ln_2(chunk))))
    return x


def _activation_(activation: nn.Module, x: Tensor) -> None:
    """Applies the MLP activation to ``x`` in place (exact GELU, QuickGELU, or any module via a copy)."""
    if type(activation) is nn.GELU:
        torch.ops.aten.gelu.out(x, approximate=activation.approximate, out=x)
    elif isinstance(activation, QuickGELU):
        x.mul_(torch.sigmoid(1.702 * x))
    else:
        x.copy_(activation(x))


def _packed_last_block(block: ResidualBlock, x: Tensor, layout: Sequence[SequenceGroup], qkv: Tensor,
                       hidden: Tensor) -> Tensor:
    """Returns the last block's output for the kept rows only (k/v still come from every row; ``qkv`` is reused)."""
    attn = block.attn
    dim = x.shape[-1]
    keep_rows = _kept_rows(layout, x.device)
    h = torch.cat([block.ln_1(x[start:start + ROW_CHUNK]) for start in range(0, x.shape[0], ROW_CHUNK)])
    # the q third of ``qkv`` is not refreshed: queries come from the kept rows only
    for start in range(0, x.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        qkv[rows, dim:] = F.linear(h[rows], attn.in_proj_weight[dim:], attn.in_proj_bias[dim:])
    queries = F.linear(h[keep_rows], attn.in_proj_weight[:dim], attn.in_proj_bias[:dim])
    attended = x.new_empty(keep_rows.shape[0], dim)
    _packed_attention(attn, qkv, layout, attended, queries)
    return _packed_residual(block, x[keep_rows], attended, hidden)


def _kept_rows(layout: Sequence[SequenceGroup], device: torch.device) -> Tensor:
    """Returns the packed row indices that the last block outputs (CLS rows, or all rows of keep-all groups)."""
    parts, offset = [], 0
    for group in layout:
        starts = offset + torch.arange(group.count, device=device) * group.length
        parts.append((starts[:, None] + torch.arange(group.keep, device=device)).reshape(-1))
        offset += group.count * group.length
    return torch.cat(parts)
