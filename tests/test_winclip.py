"""WinCLIP / WinCLIP+ on a tiny CLIP (12-layer vision tower, 80 px, 5×5 grid): shapes, semantics, few-shot path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from zsadbench.methods.winclip import WinClip, WinClipConfig, class_probability

import zsadbench
from zsadbench.clip.testing import clip_like_state_dict, save_state_dict, synthetic_images
from zsadbench.clip.text import compositional_prompts, tokenize
from zsadbench.clip.windows import harmonic_aggregation

TINY = {"model": "tiny-ViT-B-16-plus-240", "image_size": 80}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Returns a clip-like random weights file for the tiny WinCLIP backbone."""
    return str(save_state_dict(clip_like_state_dict(TINY["model"], seed=0),
                               tmp_path_factory.mktemp("w") / "tiny_b16p.pt"))


@pytest.fixture(scope="module")
def detector(weights):
    """Returns a tiny zero-shot WinCLIP."""
    return WinClip(pretrained=weights, **TINY)


@pytest.fixture(scope="module")
def images(detector):
    """Returns four preprocessed synthetic images (two with a red defect blob)."""
    return torch.stack([detector.transform(im) for im in synthetic_images(4, seed=0, anomalous=(1, 3))])


def test_registered_with_reference_defaults() -> None:
    assert zsadbench.get_method("winclip") is WinClip
    cfg = WinClipConfig()
    assert (cfg.model, cfg.pretrained, cfg.image_size) == ("ViT-B-16-plus-240", "laion400m_e31", 240)
    assert cfg.scales == (2, 3) and cfg.temperature == 0.07 and cfg.shots == 0


def test_predict_shapes_and_ranges(detector, images) -> None:
    prediction = detector.predict(images, "metal_nut")
    assert prediction.image_scores.shape == (4,)
    assert prediction.anomaly_maps.shape == (4, 80, 80) and detector.input_size == (80, 80)
    assert ((prediction.anomaly_maps > 0) & (prediction.anomaly_maps < 1)).all()
    assert prediction.anomaly_maps.std(dim=(1, 2)).min() > 0  # window scores vary across the grid


def test_predict_is_deterministic_and_seeded(detector, images) -> None:
    a = WinClip(pretrained="random", seed=1, **TINY).predict(images, "bottle")
    b = WinClip(pretrained="random", seed=1, **TINY).predict(images, "bottle")
    c = WinClip(pretrained="random", seed=2, **TINY).predict(images, "bottle")
    assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps)
    assert not torch.allclose(a.anomaly_maps, c.anomaly_maps)
    together = detector.predict(images, "bottle")
    alone = detector.predict(images[2:3], "bottle")  # an image's result does not depend on its batch
    assert torch.allclose(together.anomaly_maps[2:3], alone.anomaly_maps, atol=1e-6)


def test_text_features_are_raw_means_computed_once_per_category(detector) -> None:
    before = detector.text_cache.computed
    features = detector.text_features("pipe_fryum")
    detector.text_features("pipe_fryum")
    assert detector.text_cache.computed == before + 1
    detector.text_features("candle")
    assert detector.text_cache.computed == before + 2
    normal, anomalous = compositional_prompts("pipe_fryum")
    with torch.no_grad():
        expected = torch.stack([detector.clip.encode_text(tokenize(TINY["model"], p)).mean(0)
                                for p in (normal, anomalous)])
    assert torch.allclose(features, expected, atol=1e-5)


def test_scores_follow_the_spec_formulas(detector, images) -> None:
    prediction = detector.predict(images, "metal_nut")
    text = detector.text_features("metal_nut")
    emb = detector.encode(images)
    image = (F.normalize(emb.image, dim=-1) @ F.normalize(text, dim=-1).T / 0.07).softmax(-1)[:, 1]
    assert torch.allclose(prediction.image_scores, image, atol=1e-6)
    maps = [image[:, None].expand(4, 25)]
    for windows, incidence in zip(emb.windows, detector.incidence):
        maps.append(harmonic_aggregation(class_probability(windows, text, 0.07), incidence))
    fused = 3 / sum(1 / m for m in maps)
    expected = F.interpolate(fused.reshape(4, 1, 5, 5), size=(80, 80), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(prediction.anomaly_maps, expected, atol=1e-6)
    hotter = dataclasses.replace(detector.config, temperature=0.01)
    detector.config, saved = hotter, detector.config
    try:
        assert not torch.allclose(detector.predict(images, "metal_nut").image_scores, image, atol=1e-4)
    finally:
        detector.config = saved


def test_class_name_override_changes_the_prompts(weights, images) -> None:
    named = WinClip(pretrained=weights, class_name="object", **TINY)
    assert named.class_word("metal_nut") == "object"
    default = WinClip(pretrained=weights, **TINY)
    assert not torch.allclose(named.predict(images, "metal_nut").image_scores,
                              default.predict(images, "metal_nut").image_scores)


def test_few_shot_uses_the_reference_memory(weights, images) -> None:
    detector = WinClip(pretrained=weights, shots=2, **TINY)
    with pytest.raises(RuntimeError, match="'bottle'"):
        detector.predict(images, "bottle")
    zero_shot = WinClip(pretrained=weights, **TINY).predict(images, "bottle")

    # a query identical to a reference has association 0 everywhere: map = zero-shot / 2, score = zero-shot / 2
    detector.set_reference(images[:2], "bottle")
    memory = detector.references["bottle"]
    assert memory.shots == 2 and memory.patch_tokens.shape == (2 * 25, 64)
    assert [w.shape for w in memory.windows] == [(2 * 16, 32), (2 * 9, 32)]
    few = detector.predict(images, "bottle")
    assert torch.allclose(few.anomaly_maps[:2], zero_shot.anomaly_maps[:2] / 2, atol=1e-5)
    assert torch.allclose(few.image_scores[:2], zero_shot.image_scores[:2] / 2, atol=1e-5)
    # other images are farther from the memory than the references themselves
    assert (few.anomaly_maps[2:] - zero_shot.anomaly_maps[2:] / 2).amin() > 0
    with pytest.raises(ValueError, match="non-empty"):
        detector.set_reference(torch.empty(0, 3, 80, 80), "bottle")


def test_transform_squashes_and_normalises(detector) -> None:
    from PIL import Image

    image = Image.new("RGB", (300, 200), (123, 117, 104))  # ≈ OpenAI mean colour
    tensor = detector.transform(image)
    assert tensor.shape == (3, 80, 80)
    assert tensor.abs().max() < 0.02
