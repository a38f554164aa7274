"""Text side: compositional prompts, encoding from ids and from embeddings, deep prompts, the feature cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zsadbench.clip.backbone import load_clip
from zsadbench.clip.testing import clip_like_state_dict
from zsadbench.clip.text import (
    TextFeatureCache,
    TextTower,
    compositional_prompts,
    encode_text,
    encode_text_embeddings,
    end_of_text_index,
    prompt_ensemble_features,
    tokenize,
)

MODEL = "tiny-ViT-L-14-336"


@pytest.fixture(scope="module")
def clip():
    """Returns a tiny CLIP with clip-like random weights."""
    model = load_clip(MODEL, "random").model
    model.load_state_dict(clip_like_state_dict(MODEL, seed=2))
    return model


def test_compositional_prompts_keep_reference_order_and_duplicate() -> None:
    normal, anomalous = compositional_prompts("metal_nut")
    assert len(normal) == 147 and len(anomalous) == 84
    assert normal[0] == "a cropped photo of the metal_nut."
    assert normal[21] == "a cropped photo of the flawless metal_nut."
    assert anomalous[-1] == "a photo of a metal_nut with damage for anomaly detection."
    assert normal.count("a jpeg corrupted photo of the metal_nut.") == 2


def test_encode_text_matches_open_clip_despite_truncation(clip) -> None:
    ids = tokenize(MODEL, ["a photo of a metal_nut.", "a blurry photo of the damaged bottle with defect.", "x"])
    with torch.no_grad():
        assert torch.allclose(encode_text(clip, ids), clip.encode_text(ids), atol=1e-5)


def test_encoding_from_embeddings_ignores_tokens_after_end_of_text(clip) -> None:
    ids = tokenize(MODEL, ["a photo of a flawless object."])
    tower = TextTower(clip)
    with torch.no_grad():
        embeddings = tower.token_embedding(ids)
        eot = end_of_text_index(ids)
        base = encode_text_embeddings(clip, embeddings, eot)
        changed = embeddings.clone()
        changed[:, int(eot) + 1:] = torch.randn_like(changed[:, int(eot) + 1:])
        assert torch.allclose(encode_text_embeddings(clip, changed, eot), base, atol=1e-6)
        # a context row before the end-of-text token does change the feature (a constant shift would not: the
        # LayerNorms remove it)
        changed[:, 1] += torch.randn_like(changed[:, 1])
        assert not torch.allclose(encode_text_embeddings(clip, changed, eot), base, atol=1e-3)


def test_deep_prompts_overwrite_block_inputs(clip) -> None:
    ids = tokenize(MODEL, ["X X X X X X object.", "X X X X X X damaged object."])
    tower = TextTower(clip)
    with torch.no_grad():
        embeddings = tower.token_embedding(ids)
        eot = end_of_text_index(ids)
        base = encode_text_embeddings(clip, embeddings, eot)
        # overwriting block 1's input rows 1..4 with exactly what they already hold changes nothing
        same = (embeddings[0, 1:5] + tower.positional_embedding[1:5]).clone()
        assert torch.allclose(encode_text_embeddings(clip, embeddings, eot, deep_prompts={1: same}), base, atol=1e-6)
        prompts = {k: 0.02 * torch.randn(4, 32) for k in range(2, 10)}  # AnomalyCLIP: blocks 2..9, 4 tokens
        deep = encode_text_embeddings(clip, embeddings, eot, deep_prompts=prompts)
        assert deep.shape == base.shape and not torch.allclose(deep, base, atol=1e-3)
        only_last = encode_text_embeddings(clip, embeddings, eot, deep_prompts={12: prompts[2]})
        assert not torch.allclose(only_last, base, atol=1e-4) and not torch.allclose(only_last, deep, atol=1e-4)
    with pytest.raises(ValueError, match="outside 1..12"):
        encode_text_embeddings(clip, embeddings, eot, deep_prompts={13: prompts[2]})


def test_prompt_ensemble_averages_raw_or_normalised_embeddings(clip) -> None:
    sets = (["a photo of a bottle.", "a dark photo of the bottle."], ["a photo of a damaged bottle."])
    with torch.no_grad():
        raw = prompt_ensemble_features(clip, MODEL, sets)
        normalised = prompt_ensemble_features(clip, MODEL, sets, normalize_each=True)
        first = clip.encode_text(tokenize(MODEL, sets[0]))
    assert raw.shape == (2, 32)
    assert torch.allclose(raw[0], first.mean(0), atol=1e-5)
    assert torch.allclose(normalised[0], F.normalize(first, dim=-1).mean(0), atol=1e-5)
    assert not torch.allclose(F.normalize(raw[0], dim=0), F.normalize(normalised[0], dim=0), atol=1e-4)


def test_text_feature_cache_computes_once_per_key() -> None:
    cache = TextFeatureCache()
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.ones(2, 3)

    first = cache.get("bottle", compute)
    assert cache.get("bottle", compute) is first
    cache.get("cable", compute)
    assert cache.computed == 2 and len(calls) == 2 and len(cache) == 2 and "cable" in cache
