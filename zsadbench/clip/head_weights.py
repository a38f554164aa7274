"""Learnable head weights (HeadCLIP's "LHW", as reconstructed in specs/headclip.md §3.2).

One scalar per (vision layer, attention head) multiplies that head's output before the layer's attention
out-projection: ``attn = W_out · concat_h(w_{l,h} · o_{l,h}) + b_out`` (the bias is not scaled). In a dual-path (DPAM)
layer the same weights scale the heads of both paths, which share ``W_out``. The scaling itself lives in
:func:`zsadbench.clip.attention.merge_heads`; this module holds the parameters and answers the dual path's
``head_weights(layer, u)`` calls (:data:`zsadbench.clip.dual_path.HeadWeightsFn`).

Two parameterisations, both the identity at initialisation:

- ``static``: a (layers, heads) parameter initialised to 1. Equivalent to multiplying the input columns
  [d·h, d·h + d) of each layer's ``out_proj.weight`` by ``w_{l,h}`` (the parity handle against AnomalyCLIP).
- ``conditioned``: per layer, ``w_l(x) = 1 + Linear_l(c_l)`` with ``c_l`` the CLS row of the layer's attention input
  ln_1(o_{l-1}) and ``Linear_l`` zero-initialised; one set of weights per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

HeadWeightsMode = Literal["static", "conditioned"]


def select_layers(selection: str, depth: int, vv_start_layer: int) -> tuple[int, ...]:
    """Returns the 1-based vision layers named by ``selection``: "all", "dpam", "last_K" or a list like "6,12,18"."""
    text = selection.strip().lower()
    if text == "all":
        return tuple(range(1, depth + 1))
    if text == "dpam":
        return tuple(range(vv_start_layer, depth + 1))
    if text.startswith("last_") and text[5:].isdigit() and 1 <= int(text[5:]) <= depth:
        return tuple(range(depth - int(text[5:]) + 1, depth + 1))
    try:
        layers = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        layers = ()
    if not layers or not all(1 <= layer <= depth for layer in layers):
        raise ValueError(f"lhw.layers={selection!r}: expected 'all', 'dpam', 'last_K' (1 <= K <= {depth}) or a comma "
                         f"list of vision layers in 1..{depth}")
    return layers


class HeadWeights(nn.Module):
    """Per-head output weights for selected vision layers; call it as ``head_weights(layer, u)``."""

    def __init__(self, layers: Sequence[int], num_heads: int, width: int, mode: HeadWeightsMode = "static") -> None:
        super().__init__()
        if mode not in ("static", "conditioned"):
            raise ValueError(f"lhw.mode={mode!r}: expected 'static' or 'conditioned'")
        self.layers = tuple(layers)
        self.mode = mode
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        if mode == "static":
            self.weight = nn.Parameter(torch.ones(len(self.layers), num_heads))
        else:
            generators = [nn.Linear(width, num_heads) for _ in self.layers]
            for generator in generators:
                nn.init.zeros_(generator.weight)
                nn.init.zeros_(generator.bias)
            self.generators = nn.ModuleList(generators)

    def forward(self, layer: int, u: Tensor) -> Tensor | None:
        """Returns the weights of ``layer``'s heads for attention input ``u`` (B, N, D); None for unweighted layers.

        Static weights have shape (H,), conditioned ones (B, H).
        """
        row = self._row.get(layer)
        if row is None:
            return None
        if self.mode == "static":
            return self.weight[row]
        return 1 + self.generators[row](u[:, 0])

    def extra_repr(self) -> str:
        return f"mode={self.mode}, layers={list(self.layers)}"
