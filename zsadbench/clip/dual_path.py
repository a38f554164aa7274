"""The V-V attention dual path of AnomalyCLIP (DPAM), shared with AdaptCLIP and HeadCLIP.

From ``start_layer`` on (6 for ViT-L/14: zqhang/AnomalyCLIP ``DAPM_replace(DPAM_layer=20)`` replaces blocks
-1..-19), every block carries two token streams that share its weights:

- the original path ``o``: a standard CLIP block, so ``o_l`` equals the plain vision tower's residual stream;
- the V-V path ``v``: attention with q and k both replaced by v, ``softmax(v vᵀ / sqrt(d)) v`` per head, through the
  same out-projection; no MLP and no LayerNorm of its own.

Both paths take their attention input from the **original** stream, u_l = ln_1(o_{l-1}):
``o_l = o_{l-1} + A(u_l); o_l += MLP(ln_2(o_l))`` and ``v_l = v_{l-1} + VV(u_l)`` with ``v_{start-1} = o_{start-1}``.
The methods read patch features from the V-V stream (``ln_post(v_l) @ proj``) and the global feature from the final
original-path CLS token **without** ln_post (``o_L[CLS] @ proj``, zqhang/AnomalyCLIP#14).

``head_weights`` (HeadCLIP's learnable head weights) scales each head's output before the out-projection, in both
paths of a dual-path block and in the plain blocks before it; see :data:`HeadWeightsFn`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from zsadbench.clip.attention import attend, block_forward, merge_heads, project_qkv
from zsadbench.clip.backbone import VisionTower
from zsadbench.clip.vision import check_supported, embed_patches, project_tokens

HeadWeightsFn = Callable[[int, Tensor], Tensor | None]
"""``head_weights(layer, u)`` -> per-head weights for 1-based vision ``layer`` given its attention input ``u`` (B, N, D)
(the same for both paths): shape (H,) for static weights, (B, H) for per-image ones, or None to leave the layer as is.
"""


def dual_attention(attn: nn.MultiheadAttention, x: Tensor, head_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns (standard attention, V-V attention) of (B, N, D) tokens, both through the block's out-projection."""
    q, k, v = project_qkv(attn, x)
    original = merge_heads(attn, attend(q, k, v), head_weights)
    value_value = merge_heads(attn, attend(v, v, v), head_weights)  # q and k replaced by v; scale d^-0.5 as usual
    return original, value_value


@dataclass
class DualPathOutput:
    """What :func:`forward_dual_path` returns (token index 0 is the CLS token)."""

    global_feature: Tensor  # (B, E): final original-path CLS @ proj, no ln_post
    tokens: Tensor  # (B, 1 + P, D): final original-path residual stream (before ln_post)
    vv_taps: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, 1 + P, D) V-V stream v_l (raw)
    original_taps: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, 1 + P, D) original stream o_l
    # layer -> (B, 1 + P, D) original stream half-way through block l: o_{l-1} + A_l(ln_1(o_{l-1})), before its MLP
    attention_taps: dict[int, Tensor] = field(default_factory=dict)

    def patch_features(self, visual: VisionTower, layers: Sequence[int]) -> list[Tensor]:
        """Returns ``ln_post(v_l) @ proj`` (B, 1 + P, E) for each tapped V-V layer l, in the order asked."""
        return [project_tokens(visual, self.vv_taps[layer]) for layer in layers]


def _head_weighted(layer: int, head_weights: HeadWeightsFn) -> Callable[[nn.MultiheadAttention, Tensor, Tensor | None],
                                                                          Tensor]:
    """Returns a plain-block attention function that scales the heads of ``layer``."""
    def attention_fn(attn: nn.MultiheadAttention, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        q, k, v = project_qkv(attn, x)
        return merge_heads(attn, attend(q, k, v, attn_mask), head_weights(layer, x))

    return attention_fn


def forward_dual_path(visual: VisionTower, images: Tensor, *, start_layer: int = 6, vv_taps: Sequence[int] = (24,),
                      original_taps: Sequence[int] = (), attention_taps: Sequence[int] = (),
                      head_weights: HeadWeightsFn | None = None) -> DualPathOutput:
    """Returns the global feature, the final tokens and the requested taps of both streams of the dual-path tower.

    ``start_layer`` is the first (1-based) block with the V-V path; V-V taps must lie in start_layer..L. Gradients flow
    as usual: run it under ``torch.no_grad()`` when the tower is frozen and nothing before the output is learned.
    ``attention_taps`` (start_layer..L) read the original stream after a block's attention residual, before its MLP:
    what PromptAD's forward hooks end up holding (the next block adds its attention output to the hooked tensor in
    place).
    """
    check_supported(visual)
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    if not 1 <= start_layer <= depth:
        raise ValueError(f"V-V start layer {start_layer} is outside 1..{depth}")
    bad = [k for k in vv_taps if not start_layer <= k <= depth]
    bad += [k for k in original_taps if not 1 <= k <= depth]
    bad += [k for k in attention_taps if not start_layer <= k <= depth]
    if bad:
        raise ValueError(f"layer taps {sorted(bad)} are outside the tower (V-V and attention taps: "
                         f"{start_layer}..{depth}, original-path taps: 1..{depth})")
    want_vv, want_original, want_attention = set(vv_taps), set(original_taps), set(attention_taps)
    x = visual.ln_pre(embed_patches(visual, images))
    vv: Tensor | None = None
    vv_out: dict[int, Tensor] = {}
    original_out: dict[int, Tensor] = {}
    attention_out: dict[int, Tensor] = {}
    for layer, block in enumerate(blocks, start=1):
        if layer < start_layer:
            if head_weights is None:
                x = block_forward(block, x)
            else:
                x = block_forward(block, x, attention_fn=_head_weighted(layer, head_weights))
        else:
            u = block.ln_1(x)
            original, value_value = dual_attention(block.attn, u, None if head_weights is None else
                                                   head_weights(layer, u))
            vv = (x if vv is None else vv) + block.ls_1(value_value)
            x = x + block.ls_1(original)
            if layer in want_attention:
                attention_out[layer] = x
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            if layer in want_vv:
                vv_out[layer] = vv
        if layer in want_original:
            original_out[layer] = x
    # per image (no ln_post): a (B, D) @ (D, E) product's rounding depends on B, see vision.project_each
    cls = x[:, 0]
    if visual.proj is None:
        global_feature = cls
    else:
        global_feature = torch.stack([row @ visual.proj for row in cls]) if len(cls) else cls @ visual.proj
    return DualPathOutput(global_feature, x, {k: vv_out[k] for k in vv_taps},
                          {k: original_out[k] for k in original_taps}, {k: attention_out[k] for k in attention_taps})
