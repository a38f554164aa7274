"""PromptAD on a tiny CLIP (12-layer vision tower, 80 px, 5×5 grid): prompts, losses, features, fit, scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zsadbench.methods.promptad import (
    CATEGORY_ANOMALY_STATES,
    GENERIC_ANOMALY_STATES,
    PromptAD,
    PromptADConfig,
    anchor_losses,
    memory_distance,
)

import zsadbench
from zsadbench.clip.attention import attention
from zsadbench.clip.dual_path import forward_dual_path
from zsadbench.clip.prompts import ConcatenatedPrompts
from zsadbench.clip.testing import clip_like_state_dict, save_state_dict, synthetic_images
from zsadbench.clip.text import tokenize
from zsadbench.filters import gaussian_filter
from zsadbench.losses import triplet_margin_loss

TINY = {"model": "tiny-ViT-B-16-plus-240", "image_size": 80, "map_resolution": 80, "sigma": 0.8,
        "fit.epochs": 4, "fit.progress": False}


@pytest.fixture(autouse=True)
def one_thread():
    """Runs each test on one thread: tiny matrices are much slower with two threads on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Returns a clip-like random weights file for the tiny backbone."""
    return str(save_state_dict(clip_like_state_dict(TINY["model"], seed=0),
                               tmp_path_factory.mktemp("w") / "tiny_b16p.pt"))


@pytest.fixture(scope="module")
def images():
    """Returns five synthetic PIL images: two normal shots, then normal, anomalous, anomalous test images."""
    return synthetic_images(5, seed=0, anomalous=(3, 4))


@pytest.fixture(scope="module")
def fitted(weights, images):
    """Returns a tiny PromptAD fitted on two shots of "bottle" and the preprocessed test batch."""
    detector = PromptAD(pretrained=weights, shots=2, **TINY)
    batch = torch.stack([detector.transform(im) for im in images])
    detector.set_reference(batch[:2], "bottle")
    return detector, batch[2:]


def test_registered_with_reference_defaults() -> None:
    assert zsadbench.get_method("promptad") is PromptAD
    cfg = PromptADConfig()
    assert (cfg.model, cfg.pretrained, cfg.image_size) == ("ViT-B-16-plus-240", "laion400m_e32", 240)
    assert (cfg.n_ctx, cfg.n_anomaly_ctx, cfg.n_prompts_image, cfg.n_prompts_map, cfg.n_anomaly_prompts) == \
        (4, 1, 3, 1, 4)
    assert (cfg.fit.epochs, cfg.fit.lr, cfg.fit.momentum, cfg.fit.weight_decay, cfg.fit.lr_min, cfg.fit.lambda1,
            cfg.fit.seed) == (100, 0.002, 0.9, 0.0005, 1e-5, 0.001, 111)
    assert cfg.memory_layers == (4, 9) and cfg.vv_start_layer == 1 and cfg.map_resolution == 400
    assert cfg.sigma == 4.0


def test_bad_options_are_named(weights) -> None:
    with pytest.raises(ValueError, match="shots must be >= 1"):
        PromptAD(pretrained=weights, shots=0, **TINY)
    with pytest.raises(ValueError, match="memory_layers"):
        PromptAD(pretrained=weights, **{**TINY, "memory_layers": (4, 13)})
    detector = PromptAD(pretrained=weights, **TINY)
    with pytest.raises(RuntimeError, match="'carpet'"):
        detector.predict(torch.zeros(1, 3, 80, 80), "carpet")
    with pytest.raises(ValueError, match="non-empty"):
        detector.set_reference(torch.zeros(0, 3, 80, 80), "carpet")


def test_semantic_concatenation_layout(weights) -> None:
    detector = PromptAD(pretrained=weights, **TINY)
    prompts = detector.make_prompts("metal_nut", 3)
    states = GENERIC_ANOMALY_STATES + CATEGORY_ANOMALY_STATES["metal_nut"]
    assert prompts.class_word == "metal nut"
    normal, manual, learned = prompts.input_embeddings()
    assert normal.shape[0] == 3 and manual.shape[0] == 3 * len(states) and learned.shape[0] == 3 * 4
    ctx, anomaly_ctx = prompts.normal_ctx, prompts.abnormal_ctx
    for row in range(manual.shape[0]):  # each manual row: normal context row % 3, then the state's words
        assert torch.equal(manual[row, 1:5], ctx[row % 3])
    for row in range(learned.shape[0]):  # learned rows pair normal r % 3 with anomaly r % 4 (every pair once)
        assert torch.equal(learned[row, 1:5], ctx[row % 3])
        assert torch.equal(learned[row, 5:6], anomaly_ctx[row % 4])
    ids = tokenize("tiny-ViT-B-16-plus-240", ["N N N N damaged metal nut."])
    token_embedding = detector.clip.token_embedding
    with torch.no_grad():
        assert torch.equal(manual[0, 5:12], token_embedding(ids)[0, 5:12])  # "damaged metal nut." [EOT] ...
    assert torch.equal(prompts.manual_ids[0], ids[0])
    features = prompts(detector.clip)
    assert [f.shape for f in features] == [(3, 32), (3 * len(states), 32), (12, 32)]
    other = detector.make_prompts("synthetic_thing", 1)  # unknown category: generic states, its own name
    assert other.class_word == "synthetic_thing" and other.manual_ids.shape[0] == len(GENERIC_ANOMALY_STATES)


def test_prompt_sets_are_seeded(weights) -> None:
    detector = PromptAD(pretrained=weights, **TINY)
    a, b = detector.make_prompts("bottle", 3), detector.make_prompts("bottle", 1)
    assert torch.equal(a.normal_ctx[:1], b.normal_ctx)  # one seed: the map set's context is the first image one
    assert a.normal_ctx.std().item() == pytest.approx(0.02, rel=0.2)
    other = PromptAD(pretrained=weights, **{**TINY, "fit.seed": 5}).make_prompts("bottle", 3)
    assert not torch.equal(a.normal_ctx, other.normal_ctx)
    with pytest.raises(ValueError, match="at least one"):
        ConcatenatedPrompts(detector.clip, TINY["model"], "bottle", ())


def test_attention_taps_are_the_half_block_state(weights) -> None:
    detector = PromptAD(pretrained=weights, **TINY)
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    visual = detector.clip.visual
    with torch.no_grad():
        out = forward_dual_path(visual, x, start_layer=1, vv_taps=(12,), original_taps=(3, 4),
                                attention_taps=(4,))
        block = visual.transformer.resblocks[3]
        expected = out.original_taps[3] + attention(block.attn, block.ln_1(out.original_taps[3]))
        assert torch.allclose(out.attention_taps[4], expected, atol=1e-6)
        assert not torch.allclose(out.attention_taps[4], out.original_taps[4], atol=1e-3)
    with pytest.raises(ValueError, match="outside the tower"):
        forward_dual_path(visual, x, start_layer=6, attention_taps=(5,))


def test_features_are_normalised_and_shaped(fitted) -> None:
    detector, batch = fitted
    features = detector.encode(batch)
    assert features.global_feature.shape == (3, 32) and features.patch_tokens.shape == (3, 25, 32)
    assert [m.shape for m in features.memory] == [(3, 25, 64), (3, 25, 64)]
    for f in (features.global_feature, features.patch_tokens, *features.memory):
        assert torch.allclose(f.norm(dim=-1), torch.ones(()), atol=1e-5)


def test_triplet_margin_loss_sums_over_dimension_one() -> None:
    g = torch.Generator().manual_seed(0)
    anchor, positive, negative = (torch.randn(4, 6, 8, generator=g) for _ in range(3))
    expected = torch.relu((anchor - positive).pow(2).sum(1) - (anchor - negative).pow(2).sum(1)).mean()
    assert torch.allclose(triplet_margin_loss(anchor, positive, negative), expected)
    per_feature = torch.relu((anchor - positive).pow(2).sum(-1) - (anchor - negative).pow(2).sum(-1)).mean()
    assert not torch.allclose(triplet_margin_loss(anchor, positive, negative), per_feature)
    flat = torch.randn(5, 8, generator=g)
    assert triplet_margin_loss(flat, flat, flat + 1).item() == 0.0  # margin 0: closer to the positive costs nothing
    assert triplet_margin_loss(flat, flat, flat, margin=0.5).item() == pytest.approx(0.5)


def test_anchor_losses_components() -> None:
    g = torch.Generator().manual_seed(1)
    normal, manual, learned = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(4, 8,
                                                                                                        generator=g)
    features = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    out = anchor_losses(features, normal, manual, learned, torch.tensor(4.6), lambda1=0.001)
    normal_anchor = F.normalize(normal.mean(0), dim=-1)
    anomalous = F.normalize(torch.cat([manual, learned]), dim=-1)
    logits = torch.cat([features @ normal_anchor[:, None], features @ anomalous.T], dim=1) * 4.6
    assert torch.allclose(out["cross_entropy"], -logits.log_softmax(-1)[:, 0].mean(), atol=1e-6)
    matching = (F.normalize(manual, dim=-1).mean(0) - F.normalize(learned, dim=-1).mean(0)).pow(2).sum()
    assert torch.allclose(out["matching"], matching, atol=1e-6)
    assert torch.allclose(out["loss"], out["cross_entropy"] + out["margin"] + 0.001 * matching)


def test_fit_lowers_both_losses_and_is_deterministic(fitted, weights) -> None:
    detector, batch = fitted
    losses = detector.categories["bottle"].losses
    assert len(losses["image"]) == 4 and len(losses["map"]) == 4
    assert losses["image"][-1] < losses["image"][0] and losses["map"][-1] < losses["map"][0]
    again = PromptAD(pretrained=weights, shots=2, **TINY)
    again.set_reference(torch.stack([again.transform(im) for im in synthetic_images(2, seed=0)]), "bottle")
    a, b = detector.predict(batch, "bottle"), again.predict(batch, "bottle")
    assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps)
    assert detector.categories["bottle"].losses == again.categories["bottle"].losses


def test_scores_fuse_text_and_memory_as_the_reference(fitted) -> None:
    detector, batch = fitted
    text_image, text_patch, visual = detector.score_grids(batch, "bottle")
    assert ((text_image > 0) & (text_image < 1)).all() and ((text_patch > 0) & (text_patch < 1)).all()
    features = detector.encode(batch)
    memory = detector.categories["bottle"].memory
    expected_visual = (memory_distance(features.memory[0], memory[0]) + memory_distance(features.memory[1],
                                                                                        memory[1])) / 2
    assert torch.allclose(visual, expected_visual)
    at_size = detector.predict_at(batch, "bottle", 40)
    fused = 1 / (1 / text_patch + 1 / visual)
    grid = F.interpolate(fused.reshape(3, 1, 5, 5), size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(at_size.anomaly_maps, gaussian_filter(grid, 0.8), atol=1e-6)
    upsampled = F.interpolate(visual.reshape(3, 1, 5, 5), size=(40, 40), mode="bilinear", align_corners=False)
    assert torch.allclose(at_size.image_scores, 1 / (1 / upsampled.flatten(1).amax(1) + 1 / text_image), atol=1e-6)
    prediction = detector.predict(batch, "bottle")
    assert prediction.anomaly_maps.shape == (3, 80, 80) and prediction.image_scores.shape == (3,)


def test_a_shot_scores_lowest(fitted) -> None:
    detector, batch = fitted
    shot = torch.stack([detector.transform(im) for im in synthetic_images(1, seed=0)])
    prediction = detector.predict(torch.cat([shot, batch]), "bottle")
    assert prediction.image_scores[0] < 1e-4 < prediction.image_scores[1:].min()  # zero memory distance to itself


def test_memory_layers_matter(weights, images) -> None:
    a = PromptAD(pretrained=weights, shots=1, **{**TINY, "fit.epochs": 1})
    b = PromptAD(pretrained=weights, shots=1, **{**TINY, "fit.epochs": 1, "memory_layers": (3, 8)})
    batch = torch.stack([a.transform(im) for im in images])
    for detector in (a, b):
        detector.set_reference(batch[:1], "bottle")
    assert not torch.allclose(a.score_grids(batch[2:], "bottle")[2], b.score_grids(batch[2:], "bottle")[2])


def test_listed_reference_protocol(tmp_path, weights) -> None:
    folder = tmp_path / "seeds_mvtec" / "bottle"
    folder.mkdir(parents=True)
    (folder / "selected_samples_per_run.txt").write_text("#1: 131\n#2: 101 048\n#4: 029 045 192 127\n")
    detector = PromptAD(pretrained=weights, shots=2, reference_protocol="list",
                        reference_list=str(tmp_path / "seeds_mvtec"), **TINY)
    assert detector.reference_indices(209, "bottle") == [101, 48]
    with pytest.raises(ValueError, match="0..99"):
        detector.reference_indices(100, "bottle")
    with pytest.raises(FileNotFoundError, match="'carpet'"):
        detector.reference_indices(209, "carpet")
    seeded = PromptAD(pretrained=weights, shots=2, **TINY)
    assert seeded.reference_indices(209, "bottle") == torch.randint(
        209, (2,), generator=torch.Generator().manual_seed(10)).tolist()
    with pytest.raises(ValueError, match="reference_protocol"):
        PromptAD(pretrained=weights, shots=2, reference_protocol="other", **TINY).reference_indices(9, "bottle")
