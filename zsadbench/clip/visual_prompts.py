"""Learnable prompt tokens injected into the CLIP image encoder's layers (AdaCLIP's visual prompting).

The vision tower runs with ``t`` extra tokens appended **after** the patch tokens: the prompts of block 1 are
concatenated to the block's input (after ``ln_pre``), the prompts of blocks 2..J replace the ``t`` tokens the previous
block produced at those positions, and from block J + 1 on the last block's outputs at those positions simply flow on
(caoyunkang/AdaCLIP ``PromptLayer.forward_visual``). Every tap drops them again, so a tap is shaped like the plain
tower's (B, 1 + P, D) residual stream; the pooled feature is the CLS token's, ``ln_post(x[:, 0]) @ proj``.

The text-side counterpart (prompts overwriting token positions 1..t of chosen text blocks) is
:func:`zsadbench.clip.text.encode_text_embeddings`'s ``deep_prompts``.

:func:`round_to_half` reproduces what the AdaCLIP reference does to every prompt before inserting it: a cast to
float16 (``.half()``), promoted back to the stream's float32 by the concatenation. Values and gradients pass through
the float16 grid; it is a separate step so that other methods can inject full-precision prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from zsadbench.clip.attention import block_forward
from zsadbench.clip.backbone import VisionTower
from zsadbench.clip.vision import VisionOutput, check_supported, embed_patches, project_tokens


def round_to_half(x: Tensor) -> Tensor:
    """Returns ``x`` rounded to float16 and cast back to its dtype (gradients are rounded the same way)."""
    return x.to(torch.float16).to(x.dtype)


def forward_prompted_vision(visual: VisionTower, images: Tensor, layer_prompts: Sequence[Tensor],
                            taps: Sequence[int] = ()) -> VisionOutput:
    """Returns the pooled feature, the final tokens and the taps of the vision tower with prompts in its layers.

    ``layer_prompts[j]`` (B, t, D), or (t, D) for prompts shared by the batch, are the prompt tokens of block j + 1
    (1-based; J = len(layer_prompts) blocks get prompts, all with the same t). Taps (1-based block numbers) and the
    returned ``tokens`` exclude the prompt tokens. Gradients flow into the prompts.
    """
    check_supported(visual)
    blocks = visual.transformer.resblocks
    if not layer_prompts:
        raise ValueError("forward_prompted_vision needs the prompts of at least one block")
    if len(layer_prompts) > len(blocks):
        raise ValueError(f"{len(layer_prompts)} blocks of prompts for a tower of {len(blocks)} blocks")
    lengths = {p.shape[-2] for p in layer_prompts}
    if len(lengths) != 1:
        raise ValueError(f"prompts of every block must have the same number of tokens, got {sorted(lengths)}")
    length = lengths.pop()
    wanted = set(taps)
    bad = [k for k in wanted if not 1 <= k <= len(blocks)]
    if bad:
        raise ValueError(f"layer taps {sorted(bad)} are outside 1..{len(blocks)} (1-based block numbers)")
    x = visual.ln_pre(embed_patches(visual, images))
    batch = x.shape[0]
    out: dict[int, Tensor] = {}
    for index, block in enumerate(blocks):
        if index < len(layer_prompts):
            prompts = layer_prompts[index].to(x.dtype)
            if prompts.dim() == 2:
                prompts = prompts.unsqueeze(0).expand(batch, -1, -1)
            kept = x if index == 0 else x[:, :-length]  # block 1 appends, later prompted blocks replace
            x = torch.cat([kept, prompts], dim=1)
        x = block_forward(block, x)
        if index + 1 in wanted:
            out[index + 1] = x[:, :-length]
    return VisionOutput(project_tokens(visual, x[:, 0]), x[:, :-length], {k: out[k] for k in taps})
