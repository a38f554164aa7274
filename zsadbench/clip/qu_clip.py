"""The CLIP variant of Qu et al.'s references (xiaozhen228/VCP-CLIP, xiaozhen228/Bayes-PFL) and their class token.

Both references carry the same modified copy of OpenAI's CLIP code (``models/model_CLIP.py``,
``models/transformer.py``, ``models/simple_tokenizer.py``); what it changes, and what this module reproduces:

- **Exact GELU** (``nn.GELU``) in the MLP of every block of both towers, although the OpenAI weights were trained with
  QuickGELU (their ``ResidualAttentionBlock`` has the QuickGELU line commented out): ``QU_ACTIVATION``.
- The vision positional embedding resized to the input grid (336 px -> 518 px: 24x24 -> 37x37) by open_clip's
  ``resize_pos_embed``: **bicubic with antialias**, align_corners False: ``QU_POS_EMBED_MODE``.
- The vision taps are the raw residual stream after blocks 6/12/18/24 (no ln_post, no projection) and the global
  feature is ``ln_post(CLS) @ proj``: :func:`zsadbench.clip.vision.forward_vision` computes exactly these.
- The tokenizer knows one more special token, ``<|class|>`` (id 49408, a zero row appended to the token embedding):
  the methods write learned or image-conditioned vectors into its place. :func:`placeholder_tokens` tokenises a
  template with the placeholder (the reference's regex keeps ``<|class|>`` a word of its own, so the words around it
  tokenise as with the stock tokenizer) and :func:`splice_context` replaces the placeholder row by ``r`` vectors,
  shifting the rest of the sequence right and dropping its last ``r - 1`` rows (VCP-CLIP's ``encode_text``).

Used by methods/vcpclip.py (whose config defaults are QU_ACTIVATION and QU_POS_EMBED_MODE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import torch
from torch import Tensor

from zsadbench.clip.text import tokenizer

QU_ACTIVATION: Final = "gelu"  # nn.GELU in both towers (the references' transformer.py)
QU_POS_EMBED_MODE: Final = "bicubic-antialias"  # resize_pos_embed(interpolation="bicubic", antialias=True)
CLASS_PLACEHOLDER = "<|class|>"  # the references' extra special token (id 49408)
PLACEHOLDER_ID = 0  # the id zsadbench writes at the placeholder position (its embedding is replaced anyway)


def placeholder_tokens(model_name: str, templates: Sequence[str], context_length: int = 77) -> tuple[Tensor, Tensor]:
    """Returns (N, context_length) token ids of templates holding one ``<|class|>`` each, and each placeholder's index.

    The ids are ``[SOT] + encode(before) + [placeholder] + encode(after) + [EOT]`` padded with zeros, as the
    reference's tokenizer writes them; the placeholder position holds :data:`PLACEHOLDER_ID`.
    """
    bpe: Any = tokenizer(model_name)  # open_clip's SimpleTokenizer (typed as a plain callable)
    encode = getattr(bpe, "encode", None)
    if encode is None or not hasattr(bpe, "eot_token_id"):
        raise NotImplementedError(f"{model_name}: the {CLASS_PLACEHOLDER} templates need open_clip's BPE tokenizer")
    sot, eot = bpe.sot_token_id, bpe.eot_token_id
    rows, positions = [], []
    for template in templates:
        if template.count(CLASS_PLACEHOLDER) != 1:
            raise ValueError(f"prompt template {template!r} must hold {CLASS_PLACEHOLDER} exactly once")
        before, after = template.split(CLASS_PLACEHOLDER)
        head = [sot, *encode(before)]
        ids = [*head, PLACEHOLDER_ID, *encode(after), eot]
        if len(ids) > context_length:
            raise ValueError(f"prompt template {template!r} is longer than {context_length} tokens")
        rows.append(ids + [0] * (context_length - len(ids)))
        positions.append(len(head))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)


def end_of_text_id(model_name: str) -> int:
    """Returns the end-of-text token id of ``model_name``'s tokenizer."""
    bpe: Any = tokenizer(model_name)
    return int(bpe.eot_token_id)


def end_of_text_positions(token_ids: Tensor, eot_id: int) -> Tensor:
    """Returns the index of each row's end-of-text token (rows of ``placeholder_tokens``)."""
    return (token_ids == eot_id).int().argmax(dim=-1)


def splice_context(embeddings: Tensor, positions: Tensor, context: Tensor) -> Tensor:
    """Returns (B, N, L, W): each sequence's placeholder row replaced by the (B, r, W) ``context`` of each image.

    ``embeddings`` (N, L, W) token embeddings, ``positions`` (N,) placeholder indices. The rows after the placeholder
    shift right by r - 1 and the sequence keeps its length L (its last r - 1 rows, padding, are dropped), as the
    reference's ``torch.cat([x[:pos], context, x[pos + 1 : L - r + 1]])``.
    """
    count, length, width = embeddings.shape
    batch, r, _ = context.shape
    out = []
    for n in range(count):
        pos = int(positions[n])
        head = embeddings[n, :pos].expand(batch, -1, -1)
        tail = embeddings[n, pos + 1:length - r + 1].expand(batch, -1, -1)
        out.append(torch.cat([head, context.to(embeddings.dtype), tail], dim=1))
    return torch.stack(out, dim=1)
