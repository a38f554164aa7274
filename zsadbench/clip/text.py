"""Text side of CLIP: tokenising, encoding from token ids or from input embeddings, prompt ensembles, caching.

:func:`encode_text_embeddings` is the one text forward every method uses. It takes token *embeddings* (so learnable
context vectors can replace rows, CoOp / AnomalyCLIP style), the position of each sequence's end-of-text token, and
optional deep prompts that overwrite token positions 1..t of the input of chosen blocks (AnomalyCLIP's compound
prompts). With plain token ids it computes exactly open_clip's ``encode_text``.

The CLIP text transformer is causal, so tokens after the last end-of-text token never influence the pooled feature:
sequences are cut there (77 -> ~15 tokens for short prompts), which makes encoding prompt ensembles ~5x cheaper and
leaves the features unchanged (up to float summation order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsadbench.clip.attention import AttentionFn, attention, block_forward
from zsadbench.clip.backbone import ClipModel, quiet_open_clip

# Compositional prompt ensemble of WinCLIP (anomalib prompting.py / zqhang; reused by AdaptCLIP's static text).
NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",  # listed twice in the reference; kept for parity
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


# APRIL-GAN's prompt ensemble (ByChelsea/VAND-APRIL-GAN prompt_ensemble.py): WinCLIP's states plus "broken {}", and the
# 35 templates of its own list (CLIP's ImageNet-style phrasings), in the reference's order.
APRILGAN_NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)
APRILGAN_ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
APRILGAN_TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a photo of one {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)

def compositional_prompts(class_name: str, normal_states: Sequence[str] = NORMAL_STATES,
                          anomalous_states: Sequence[str] = ANOMALOUS_STATES,
                          templates: Sequence[str] = TEMPLATES) -> tuple[list[str], list[str]]:
    """Returns (normal prompts, anomalous prompts): every template filled with every state of ``class_name``.

    Order is state-major (all templates of the first state first), as the reference builds them.
    """
    def expand(states: Sequence[str]) -> list[str]:
        return [template.format(state.format(class_name)) for state in states for template in templates]

    return expand(normal_states), expand(anomalous_states)


class TextTower:
    """The text-side modules of an open_clip model (``CLIP`` keeps them at top level, ``CustomTextCLIP`` in .text)."""

    def __init__(self, clip: ClipModel) -> None:
        owner: Any = clip if hasattr(clip, "token_embedding") else getattr(clip, "text", None)
        if owner is None or not hasattr(owner, "token_embedding") or not hasattr(owner, "transformer"):
            raise NotImplementedError(f"{type(clip).__name__}: only open_clip's built-in text transformer is "
                                      "supported (no Hugging Face text towers)")
        pool = getattr(owner, "text_pool_type", getattr(owner, "pool_type", "argmax"))
        if pool != "argmax" or getattr(owner, "cls_emb", None) is not None:
            raise NotImplementedError(f"text pooling {pool!r} is not supported (argmax end-of-text pooling only)")
        self.token_embedding: nn.Embedding = owner.token_embedding
        self.positional_embedding: Tensor = owner.positional_embedding
        self.transformer: Any = owner.transformer  # open_clip Transformer (.resblocks)
        self.ln_final: nn.Module = owner.ln_final
        self.text_projection = owner.text_projection
        self.attn_mask: Tensor | None = owner.attn_mask

    @property
    def causal(self) -> bool:
        """Returns True when the blocks use a causal mask (later tokens never affect earlier ones)."""
        return self.attn_mask is not None


@functools.lru_cache(maxsize=8)
def tokenizer(model_name: str) -> Callable[[list[str]], Tensor]:
    """Returns open_clip's tokenizer for ``model_name`` (built once: reading the BPE vocabulary takes ~0.2 s)."""
    with quiet_open_clip():
        return open_clip.get_tokenizer(model_name)


def tokenize(model_name: str, texts: Sequence[str]) -> Tensor:
    """Returns (N, context_length) token ids from open_clip's tokenizer for ``model_name``."""
    return tokenizer(model_name)(list(texts))


def end_of_text_index(token_ids: Tensor) -> Tensor:
    """Returns the position of each sequence's end-of-text token (the largest id in CLIP's vocabulary)."""
    return token_ids.argmax(dim=-1)


def encode_text_embeddings(clip: ClipModel, embeddings: Tensor, eot_index: Tensor, *,
                           deep_prompts: Mapping[int, Tensor] | None = None,
                           attention_fn: AttentionFn = attention) -> Tensor:
    """Returns (N, E) text features (unnormalised) of (N, L, W) token embeddings; pooled at ``eot_index``.

    ``deep_prompts`` maps a 1-based text block number k to a (t, W) tensor (shared by all sequences) or an (N, t, W)
    one that overwrites token positions 1..t of that block's input (AnomalyCLIP: blocks 2..9, t = 4). Positional
    embeddings are added here.
    """
    tower = TextTower(clip)
    count, length, _ = embeddings.shape
    if tower.causal:
        length = min(length, int(eot_index.max()) + 1)
        if deep_prompts:
            length = max(length, 1 + max(p.shape[-2] for p in deep_prompts.values()))
    x = embeddings[:, :length] + tower.positional_embedding[:length].to(embeddings.dtype)
    mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
    blocks = tower.transformer.resblocks
    if deep_prompts:
        bad = [k for k in deep_prompts if not 1 <= k <= len(blocks)]
        if bad:
            raise ValueError(f"deep prompts for blocks {sorted(bad)} are outside 1..{len(blocks)}")
    for number, block in enumerate(blocks, start=1):
        if deep_prompts and number in deep_prompts:
            prompt = deep_prompts[number].to(x.dtype)
            if prompt.dim() == 2:
                prompt = prompt.unsqueeze(0).expand(count, -1, -1)
            x = torch.cat([x[:, :1], prompt, x[:, 1 + prompt.shape[1]:]], dim=1)
        x = block_forward(block, x, mask, attention_fn)
    x = tower.ln_final(x)
    pooled = x[torch.arange(count, device=x.device), eot_index]
    projection = tower.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection


def encode_text(clip: ClipModel, token_ids: Tensor, batch_size: int = 256) -> Tensor:
    """Returns (N, E) unnormalised text features of token ids (open_clip's ``encode_text``), in batches."""
    tower = TextTower(clip)
    token_ids = token_ids.to(tower.token_embedding.weight.device)
    out = []
    for start in range(0, len(token_ids), batch_size):
        ids = token_ids[start:start + batch_size]
        out.append(encode_text_embeddings(clip, tower.token_embedding(ids), end_of_text_index(ids)))
    return torch.cat(out)


def prompt_ensemble_features(clip: ClipModel, model_name: str, prompt_sets: Sequence[Sequence[str]],
                             normalize_each: bool = False) -> Tensor:
    """Returns (n_sets, E): per set of prompts, the mean of their text features.

    ``normalize_each=False`` averages the raw embeddings (WinCLIP / AdaptCLIP static text); ``True`` L2-normalises
    each prompt's feature before averaging (the CLIP zero-shot classifier recipe). The result is not normalised.
    """
    features = []
    for prompts in prompt_sets:
        if not prompts:
            raise ValueError("a prompt set is empty")
        encoded = encode_text(clip, tokenize(model_name, prompts))
        if normalize_each:
            encoded = F.normalize(encoded, dim=-1)
        features.append(encoded.mean(dim=0))
    return torch.stack(features)


class TextFeatureCache:
    """Text features computed once per key (e.g. per category) and reused for every later batch."""

    def __init__(self) -> None:
        self._features: dict[Hashable, Tensor] = {}
        self.computed = 0  # how many times ``compute`` ran (tests check that repeated lookups do not recompute)

    def get(self, key: Hashable, compute: Callable[[], Tensor]) -> Tensor:
        """Returns the features cached under ``key``, computing them with ``compute()`` the first time."""
        if key not in self._features:
            with torch.no_grad():
                self._features[key] = compute().detach()
            self.computed += 1
        return self._features[key]

    def to(self, device: str | torch.device) -> TextFeatureCache:
        """Moves every cached tensor to ``device`` and returns the cache."""
        self._features = {k: v.to(device) for k, v in self._features.items()}
        return self

    def clear(self) -> None:
        """Drops every cached feature (after the text tower's weights change)."""
        self._features.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._features

    def __len__(self) -> int:
        return len(self._features)
