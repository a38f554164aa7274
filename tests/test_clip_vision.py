"""Attention steps, vision forward with layer taps, windows and the packed window forward, on tiny CLIP models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zsadbench.clip.attention import attend, attention, block_forward, merge_heads, project_qkv
from zsadbench.clip.backbone import load_clip
from zsadbench.clip.testing import clip_like_state_dict
from zsadbench.clip.vision import embed_patches, forward_vision
from zsadbench.clip.windows import encode_windows, harmonic_aggregation, window_incidence, window_indices


@pytest.fixture(scope="module")
def tiny_l():
    """Returns a tiny ViT-L-14-336 mirror with clip-like (non-trivial) random weights, at 70 px (5×5 grid)."""
    backbone = load_clip("tiny-ViT-L-14-336", "random", image_size=70, pos_embed_mode="bilinear")
    state = clip_like_state_dict("tiny-ViT-L-14-336", seed=0)
    state["visual.positional_embedding"] = backbone.visual.positional_embedding.detach().clone()
    backbone.model.load_state_dict(state)
    return backbone


def test_attention_step_reproduces_multihead_attention(tiny_l) -> None:
    block = tiny_l.visual.transformer.resblocks[3]
    x = torch.randn(2, 26, 64)
    with torch.no_grad():
        expected = block.attn(x, x, x, need_weights=False)[0]
        assert torch.allclose(attention(block.attn, x), expected, atol=1e-5)
        assert torch.allclose(block_forward(block, x), block(x), atol=1e-5)


def test_head_weights_scale_heads_like_out_projection_columns(tiny_l) -> None:
    attn = tiny_l.visual.transformer.resblocks[5].attn
    x = torch.randn(2, 26, 64)
    with torch.no_grad():
        heads = attend(*project_qkv(attn, x))
        assert torch.allclose(merge_heads(attn, heads, torch.ones(4)), merge_heads(attn, heads))
        weights = torch.tensor([0.5, 2.0, 0.0, 1.5])
        scaled = nn.MultiheadAttention(64, 4, batch_first=True)
        scaled.load_state_dict(attn.state_dict())
        scaled.out_proj.weight.mul_(weights.repeat_interleave(16))  # head h owns input columns [16h, 16h + 16)
        assert torch.allclose(merge_heads(attn, heads, weights), scaled(x, x, x, need_weights=False)[0], atol=1e-5)
        per_image = merge_heads(attn, heads, torch.stack([weights, torch.ones(4)]))
        assert torch.allclose(per_image[1], merge_heads(attn, heads)[1])


def test_vision_forward_and_layer_taps_match_open_clip(tiny_l) -> None:
    visual = tiny_l.visual
    images = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        out = forward_vision(visual, images, taps=(6, 12, 18, 24))
        reference = visual.forward_intermediates(images, indices=[5, 11, 17, 23], output_fmt="NLC",
                                                 normalize_intermediates=False, output_extra_tokens=True)
        assert torch.allclose(out.pooled, tiny_l.model.encode_image(images), atol=1e-5)
    assert list(out.taps) == [6, 12, 18, 24]
    for tap, patches, cls in zip(out.taps.values(), reference["image_intermediates"],
                                 reference["image_intermediates_prefix"]):
        assert tap.shape == (2, 26, 64)
        assert torch.allclose(tap[:, 1:], patches, atol=1e-5) and torch.allclose(tap[:, :1], cls, atol=1e-5)
    assert torch.equal(out.taps[24], out.tokens)
    assert not torch.allclose(out.taps[6], out.taps[12])
    with pytest.raises(ValueError, match="outside 1..24"):
        forward_vision(visual, images, taps=(0,))
    with pytest.raises(ValueError, match="image_size"):
        embed_patches(visual, torch.randn(1, 3, 56, 56))


def test_window_indices_and_incidence() -> None:
    windows = window_indices((3, 4), 2)
    assert windows.tolist() == [[0, 1, 4, 5], [1, 2, 5, 6], [2, 3, 6, 7], [4, 5, 8, 9], [5, 6, 9, 10],
                                [6, 7, 10, 11]]
    assert window_indices((15, 15), 2).shape == (196, 4) and window_indices((15, 15), 3).shape == (169, 9)
    incidence = window_incidence(window_indices((15, 15), 3), 225)
    counts = incidence.sum(dim=1).reshape(15, 15)
    assert counts[0, 0] == 1 and counts[0, 1] == 2 and counts[7, 7] == 9 and counts[1, 0] == 2
    with pytest.raises(ValueError, match="does not fit"):
        window_indices((2, 5), 3)


def test_harmonic_aggregation_is_the_harmonic_mean_of_covering_windows() -> None:
    windows = window_indices((4, 5), 2)
    scores = torch.rand(3, windows.shape[0]) * 0.9 + 0.05
    result = harmonic_aggregation(scores, window_incidence(windows, 20))
    for b in range(3):
        for patch in range(20):
            covering = [w for w in range(windows.shape[0]) if patch in windows[w].tolist()]
            expected = len(covering) / sum(1.0 / scores[b, w].item() for w in covering)
            assert abs(result[b, patch].item() - expected) < 1e-6
    scores[0, 0] = 0.0  # a zero score zeroes the patches it covers instead of producing NaN
    zeroed = harmonic_aggregation(scores, window_incidence(windows, 20))
    assert torch.isfinite(zeroed).all()
    assert zeroed[0, [0, 1, 5, 6]].eq(0).all() and zeroed[0, 2] > 0


def test_packed_window_forward_equals_one_forward_per_window(tiny_l) -> None:
    visual = tiny_l.visual
    images = torch.randn(2, 3, 70, 70)
    windows = [window_indices((5, 5), 2), window_indices((5, 5), 3)]
    with torch.no_grad():
        out = encode_windows(visual, images, windows, patch_tokens=True)
        tokens = embed_patches(visual, images)
        for window, embedded in zip(windows, out.windows):
            assert embedded.shape == (2, window.shape[0], 32)
            for b in range(2):
                for w in (0, window.shape[0] // 2, window.shape[0] - 1):
                    sequence = tokens[b, torch.cat([torch.zeros(1, dtype=torch.long), window[w] + 1])][None]
                    cls = visual.transformer(visual.ln_pre(sequence))[0, 0]
                    expected = visual.ln_post(cls) @ visual.proj
                    assert torch.allclose(embedded[b, w], expected, atol=1e-5)
            # windows attend within themselves only: their embeddings differ (anomalib#2571 made them identical)
            assert embedded.std(dim=1).mean() > 1e-3
        visual.output_tokens = True
        try:
            pooled, patch_tokens = visual(images)
        finally:
            visual.output_tokens = False
        assert torch.allclose(out.image, pooled, atol=1e-5)
        assert torch.allclose(out.patch_tokens, patch_tokens, atol=1e-5)
        assert encode_windows(visual, images, windows).patch_tokens is None


def test_packed_forward_in_row_chunks_and_with_quickgelu(monkeypatch) -> None:
    import zsadbench.clip.vision as vision

    backbone = load_clip("tiny-ViT-L-14-336-quickgelu", "random", seed=5)  # 56 px: 4×4 grid
    visual = backbone.visual
    images = torch.randn(3, 3, 56, 56)
    windows = [window_indices((4, 4), 2), window_indices((4, 4), 3)]
    with torch.no_grad():
        whole = encode_windows(visual, images, windows, patch_tokens=True)
        monkeypatch.setattr(vision, "ROW_CHUNK", 64)  # 306 rows: 5 chunks, the last one shorter
        chunked = encode_windows(visual, images, windows, patch_tokens=True)
        sequence = embed_patches(visual, images)[1:2, torch.tensor([0, 6, 7, 10, 11])]  # window (1, 1) of image 1
        cls = visual.transformer(visual.ln_pre(sequence))[0, 0]
        expected = visual.ln_post(cls) @ visual.proj
    assert torch.allclose(chunked.windows[0][1, 4], expected, atol=1e-5)  # 3 windows per row: (1, 1) is 4
    for a, b in zip(whole.windows + [whole.image, whole.patch_tokens], chunked.windows + [chunked.image,
                                                                                         chunked.patch_tokens]):
        assert torch.allclose(a, b, atol=1e-5)
