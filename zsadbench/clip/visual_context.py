"""Visual context prompting pieces (VCP-CLIP, Qu et al., ECCV 2024): composable, independent of the method plugin.

- :class:`ContextPrompting` (Pre-VCP, the reference's ``models/pre_vcp.py`` ``Context_Prompting``): r learned query
  vectors plus a Conv1d(1 -> r, kernel 3) of the image's global CLIP embedding: the per-image "class" vectors written
  into the ``<|class|>`` slot of the text prompts (:func:`zsadbench.clip.qu_clip.splice_context`).
- :class:`InsertedTextPrompts` and :func:`encode_text_with_inserted_prompts` (the reference's ``CLIP.encode_text`` /
  ``forward_deep_prompt``): n learned text tokens **inserted** after the start token before block 1 (the rest of the
  sequence shifts right, keeping its positional embeddings), replaced by block-specific tokens at the input of every
  later block, removed after the last block, then a LayerNorm of their own (``prompt_norm``, eps 1e-6) and the
  tower's ``ln_final`` before end-of-text pooling. The prompts pass ``prompt_proj`` and a dropout (p 0.1, active
  while training).
- :class:`PromptGuidedAttention` (Post-VCP, the reference's ``models/post_vcp.py`` ``Zero_Parameter``): multi-head
  cross-attention from the text embeddings (queries) to the normalised patch tokens (keys, values) through 1x1
  Conv1d projections, **unscaled** logits (``beta_t = 1``, no 1/sqrt(d)), an output projection and L2
  normalisation; its learned temperature ``prompt_temp_l1`` scales the refined map.

Parameter names are the reference's, so the authors' checkpoint entries load into these modules as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.clip.attention import block_forward
from zsadbench.clip.backbone import ClipModel
from zsadbench.clip.text import TextTower


class _ContextConv(nn.Module):
    """Conv1d(1 -> r, kernel 3, padding "same") over the embedding axis (the reference's ``Linear1``)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.fc = nn.Conv1d(1, count, 3, stride=1, padding="same")

    def forward(self, features: Tensor) -> Tensor:
        """Returns (B, r, C) of (B, C) features."""
        return self.fc(features.unsqueeze(1))


class ContextPrompting(nn.Module):
    """Pre-VCP: per-image class vectors = learned queries (1, r, C) + Conv1d(global embedding) (B, r, C)."""

    def __init__(self, width: int, count: int) -> None:
        super().__init__()
        self.prompt_query = nn.Parameter(torch.randn(1, count, width))
        self.prompt_linear1 = _ContextConv(count)
        self.prompt_temp = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))  # τ1 of the pre-VCP (raw) maps
        nn.init.trunc_normal_(self.prompt_query)

    def forward(self, global_features: Tensor, use_global: bool = True) -> Tensor:
        """Returns the (B, r, C) class vectors of (B, C) unnormalised global image embeddings."""
        if global_features.shape[-1] != self.prompt_query.shape[-1]:
            raise ValueError(f"pre-VCP: global features of width {global_features.shape[-1]} do not fit the text "
                             f"width {self.prompt_query.shape[-1]} (the embedding and text widths must be equal)")
        queries = self.prompt_query.expand(global_features.shape[0], -1, -1)
        return queries + self.prompt_linear1(global_features) if use_global else queries


class InsertedTextPrompts(nn.Module):
    """Learned text tokens for every text block: ``prompt_embeddings`` (block 1), ``deep_prompt_embeddings`` (2..L).

    ``prompt_text_projection`` is kept only because the reference's CLIP has it (and its checkpoints save it); its
    forward never uses it.
    """

    def __init__(self, width: int, embed_dim: int, length: int, blocks: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(torch.empty(1, length, width).uniform_(-1, 1))
        self.deep_prompt_embeddings = nn.Parameter(torch.empty(blocks - 1, length, width).uniform_(-1, 1))
        self.prompt_proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_norm = nn.LayerNorm(width, eps=1e-6)
        self.prompt_text_projection = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
        self.dropout = dropout

    def block_prompts(self, count: int) -> list[Tensor]:
        """Returns per text block the (count, n, W) prompts: prompt_proj, then dropout (while training) per sequence."""
        tables = [self.prompt_embeddings[0], *self.deep_prompt_embeddings]
        return [F.dropout(self.prompt_proj(table).expand(count, -1, -1), self.dropout, self.training)
                for table in tables]


def encode_text_with_inserted_prompts(clip: ClipModel, embeddings: Tensor, eot_index: Tensor,
                                      prompts: Sequence[Tensor], final_norm: nn.Module) -> Tensor:
    """Returns (M, E) unnormalised text features of (M, L, W) token embeddings with inserted deep prompts.

    ``prompts[0]`` (M, n, W) is inserted after the start token (positional embeddings are added before, so the
    prompt gets none and the shifted tokens keep theirs; the last n rows drop out); ``prompts[k]`` overwrites rows
    1..n of the input of block k + 1; one prompt per block. The prompt rows are removed after the last block,
    ``final_norm`` (``prompt_norm``) and ``ln_final`` applied, and each sequence pooled at ``eot_index`` (positions
    without the prompt rows).
    """
    tower = TextTower(clip)
    blocks = tower.transformer.resblocks
    if len(prompts) != len(blocks):
        raise ValueError(f"inserted text prompts: {len(prompts)} prompts for {len(blocks)} text blocks (one each)")
    count, length, _ = embeddings.shape
    n = prompts[0].shape[-2]
    x = embeddings + tower.positional_embedding[:length].to(embeddings.dtype)
    x = torch.cat([x[:, :1], prompts[0].to(x.dtype), x[:, 1:length - n]], dim=1)
    if tower.causal:  # rows after the end-of-text token never reach it: cut them
        length = min(length, int(eot_index.max()) + n + 1)
        x = x[:, :length]
    mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
    for number, block in enumerate(blocks, start=1):
        if number > 1:
            x = torch.cat([x[:, :1], prompts[number - 1].to(x.dtype), x[:, 1 + n:]], dim=1)
        x = block_forward(block, x, mask)
    x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
    x = tower.ln_final(final_norm(x))
    pooled = x[torch.arange(count, device=x.device), eot_index]
    projection = tower.text_projection
    return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection


class PromptGuidedAttention(nn.Module):
    """Post-VCP: text embeddings attend to the patch tokens; returns normalised refined text (B, N_text, D_out)."""

    def __init__(self, text_width: int, patch_width: int, out_width: int, num_heads: int = 8) -> None:
        super().__init__()
        if out_width % num_heads:
            raise ValueError(f"post-VCP: width {out_width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj_pre = nn.Conv1d(text_width, out_width, kernel_size=1)
        self.k_proj_pre_1 = nn.Conv1d(patch_width, out_width, kernel_size=1)
        self.v_proj_pre_1 = nn.Conv1d(patch_width, out_width, kernel_size=1)
        self.proj_post_t = nn.Conv1d(out_width, out_width, kernel_size=1)
        self.prompt_temp_l1 = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))  # τ2 of the post-VCP maps

    @staticmethod
    def _project(conv: nn.Conv1d, x: Tensor) -> Tensor:
        return conv(x.transpose(1, 2)).transpose(1, 2)

    def forward(self, text: Tensor, patches: Tensor) -> Tensor:
        """Returns (B, N_text, D_out) refined, L2-normalised text of (B, N_text, C_t) text and (B, P, C_v) patches."""
        batch, n_text, _ = text.shape
        heads = self.num_heads
        q = self._project(self.q_proj_pre, text).reshape(batch, n_text, heads, -1)
        k = self._project(self.k_proj_pre_1, patches).reshape(batch, patches.shape[1], heads, -1)
        v = self._project(self.v_proj_pre_1, patches).reshape(batch, patches.shape[1], heads, -1)
        weights = torch.einsum("bnkc,bmkc->bknm", q, k).softmax(dim=-1)  # no 1/sqrt(d): the reference's beta_t = 1
        refined = torch.einsum("bknm,bmkc->bnkc", weights, v).reshape(batch, n_text, -1)
        refined = self._project(self.proj_post_t, refined)
        return refined / refined.norm(dim=-1, keepdim=True)
