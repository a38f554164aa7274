"""Residual cross-modal attention (RCA, Bayes-PFL): text embeddings attend to one layer's patch tokens.

Per feature layer l, the raw patch tokens F_s (B, N, D_v) are projected to the text width by a bias-free linear map
and L2-normalised; they serve as keys and values. The text embeddings F_t (B, T, D_t) pass through a 1x1 convolution
(the queries); multi-head attention (``num_heads`` heads of ``D_t / num_heads`` channels, scale ``D_t ** -0.5`` of
the *full* width, as the reference) over the patches gives each text embedding a patch-weighted update, which is
added back (the residual) and L2-normalised. Returns the refined text (B, T, D_t) and the normalised patch tokens
(B, N, D_t), whose products are the anomaly map logits. Parameter names follow xiaozhen228/Bayes-PFL's
``Zero_Parameter`` (``q_proj_pre``, ``linear_proj.{l}``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualCrossModalAttention(nn.Module):
    """Text-to-patch attention with a residual connection; one patch projection per feature layer."""

    def __init__(self, vision_width: int, text_width: int, num_layers: int, num_heads: int = 4) -> None:
        super().__init__()
        if text_width % num_heads:
            raise ValueError(f"RCA: text width {text_width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = text_width // num_heads
        self.width = text_width
        self.scale = text_width ** -0.5  # the full width, not the head width (as the reference)
        self.q_proj_pre = nn.Conv1d(text_width, text_width, kernel_size=1)
        self.linear_proj = nn.ModuleList([nn.Linear(vision_width, text_width, bias=False) for _ in range(num_layers)])

    def forward(self, text: Tensor, patches: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Returns (refined normalised text (B, T, D_t), normalised projected patches (B, N, D_t)) for ``layer``."""
        batch, count, _ = text.shape
        if patches.shape[0] != batch:
            raise ValueError(f"RCA: {batch} text batches but {patches.shape[0]} patch batches")
        keys = self.linear_proj[layer](patches)
        keys = keys / keys.norm(dim=-1, keepdim=True)
        heads = keys.reshape(batch, keys.shape[1], self.num_heads, self.head_dim)
        queries = self.q_proj_pre(text.permute(0, 2, 1)).permute(0, 2, 1)
        queries = queries.reshape(batch, count, self.num_heads, self.head_dim)
        weights = (torch.einsum("bnkc,bmkc->bknm", queries, heads) * self.scale).softmax(dim=-1)
        refined = torch.einsum("bknm,bmkc->bnkc", weights, heads).reshape(batch, count, self.width) + text
        return refined / refined.norm(dim=-1, keepdim=True), keys
