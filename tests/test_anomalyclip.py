"""AnomalyCLIP on the tiny ViT-L-14-336 config: V-V dual path, learnable prompts, scoring, training, checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from learning_signal import appearance_weights, assert_learned, train_and_evaluate
from scipy import ndimage
from zsadbench.methods.anomalyclip import AnomalyCLIP

import zsadbench
from zsadbench.checkpoints import CheckpointError
from zsadbench.clip.dual_path import forward_dual_path
from zsadbench.clip.testing import clip_like_state_dict, save_state_dict
from zsadbench.clip.text import encode_text_embeddings
from zsadbench.clip.vision import forward_vision

MODEL = "tiny-ViT-L-14-336-quickgelu"
TINY = {"model": MODEL, "pretrained": "random", "image_size": 56}


@pytest.fixture(scope="module")
def clip_like_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny clip-like weights file (non-trivial LayerNorms and biases, so dropped ones show)."""
    return save_state_dict(clip_like_state_dict(MODEL, seed=0), tmp_path_factory.mktemp("w") / "tiny.pt")


@pytest.fixture(scope="module")
def aux_data() -> zsadbench.Dataset:
    """Small auxiliary training data: two synthetic categories, test split with masks."""
    return zsadbench.load_dataset("synthetic", image_size=48, n_train=0, n_test_normal=2, n_test_anomalous=3,
                                  categories="carpet,tile")


def tiny(**overrides: object) -> AnomalyCLIP:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zsadbench.load_method("anomalyclip", **{**TINY, **overrides})  # type: ignore[return-value]


def images(count: int = 2, size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- V-V dual path ---------------------------------------------------------------------------------------------------

def naive_vv_attention(block: torch.nn.Module, u: torch.Tensor) -> torch.Tensor:
    """softmax(v vᵀ / sqrt(d)) v per head through out_proj, written out independently of zsadbench.clip."""
    attn = block.attn
    heads, width = attn.num_heads, u.shape[-1]
    v = u @ attn.in_proj_weight[2 * width:].T + attn.in_proj_bias[2 * width:]
    v = v.reshape(u.shape[0], u.shape[1], heads, width // heads).transpose(1, 2)
    weights = (v @ v.transpose(-1, -2) * (width // heads) ** -0.5).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(u.shape)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def test_dual_path_matches_its_definition(clip_like_weights: Path) -> None:
    detector = tiny(pretrained=str(clip_like_weights))
    visual = detector.clip.visual
    x = images()
    with torch.no_grad():
        out = forward_dual_path(visual, x, start_layer=6, vv_taps=(6, 12, 24), original_taps=(5, 6, 24))
        plain = forward_vision(visual, x, taps=(5, 6, 24))
        # the original path is plain CLIP
        for layer in (5, 6, 24):
            assert torch.allclose(out.original_taps[layer], plain.taps[layer], atol=1e-5)
        # global feature: final CLS @ proj without ln_post (zqhang/AnomalyCLIP#14)
        assert torch.allclose(out.global_feature, plain.tokens[:, 0] @ visual.proj, atol=1e-5)
        assert not torch.allclose(out.global_feature, plain.pooled, atol=1e-3)
        # V-V stream: v_5 = o_5, v_l = v_{l-1} + VV_l(ln_1(o_{l-1})), no MLP, no LayerNorm of its own
        blocks = visual.transformer.resblocks
        o = plain.taps[5]
        v = o.clone()
        for layer in range(6, 25):
            v = v + naive_vv_attention(blocks[layer - 1], blocks[layer - 1].ln_1(o))
            o = blocks[layer - 1](o)
            if layer in (6, 12, 24):
                assert torch.allclose(out.vv_taps[layer], v, atol=1e-4), layer
        patch = out.patch_features(visual, [24])[0]
        assert torch.allclose(patch, visual.ln_post(v) @ visual.proj, atol=1e-4)


def test_dual_path_head_weights_equal_scaled_out_projection(clip_like_weights: Path) -> None:
    """HeadCLIP's parity handle: static head weights == out_proj input columns scaled per head, in both paths."""
    detector = tiny(pretrained=str(clip_like_weights))
    visual = detector.clip.visual
    heads = visual.transformer.resblocks[0].attn.num_heads
    weights = {layer: torch.rand(heads, generator=torch.Generator().manual_seed(layer)) + 0.5
               for layer in range(1, 25)}
    x = images()
    with torch.no_grad():
        weighted = forward_dual_path(visual, x, vv_taps=(24,), head_weights=lambda layer, u: weights[layer])
        for layer, block in enumerate(visual.transformer.resblocks, start=1):
            width = block.attn.out_proj.weight.shape[1]
            block.attn.out_proj.weight.mul_(weights[layer].repeat_interleave(width // heads)[None])
        folded = forward_dual_path(visual, x, vv_taps=(24,))
    assert torch.allclose(weighted.global_feature, folded.global_feature, atol=1e-4)
    assert torch.allclose(weighted.vv_taps[24], folded.vv_taps[24], atol=1e-4)


def test_dual_path_rejects_taps_outside_the_vv_layers() -> None:
    detector = tiny()
    with pytest.raises(ValueError, match="outside"):
        forward_dual_path(detector.clip.visual, images(), start_layer=6, vv_taps=(5,))


# ---- learnable prompts -----------------------------------------------------------------------------------------------

def test_prompts_overwrite_positions_in_blocks_2_to_9_with_fp16_rounding(clip_like_weights: Path) -> None:
    detector = tiny(pretrained=str(clip_like_weights))
    learner, clip = detector.prompt_learner, detector.clip
    assert learner.token_ids.argmax(-1).tolist() == [15, 16]  # "X"×12 object. / "X"×12 damaged object.
    assert sorted(learner.deep_prompts()) == list(range(2, 10))
    with torch.no_grad():
        for prompt in learner.compound_prompts_text:  # values that fp16 rounding visibly changes
            prompt.add_(1e-3 * torch.rand(prompt.shape, generator=torch.Generator().manual_seed(3)))
        features = learner(clip)
        # written out: blocks run one by one on the 77-token sequence, positions 1..4 replaced before blocks 2..9
        x = learner.input_embeddings() + clip.positional_embedding
        for number, block in enumerate(clip.transformer.resblocks, start=1):
            if 2 <= number <= 9:
                prompt = learner.compound_prompts_text[number - 2].half().float()
                x = torch.cat([x[:, :1], prompt.expand(2, -1, -1), x[:, 5:]], dim=1)
            x = block(x, attn_mask=clip.attn_mask)
        expected = clip.ln_final(x)[torch.arange(2), learner.token_ids.argmax(-1)] @ clip.text_projection
        assert torch.allclose(features, expected, atol=1e-5)
        # without the rounding the features differ (the reference's fp16 cast matters)
        learner.fp16_deep_prompts = False
        assert not torch.allclose(learner(clip), features, atol=1e-7)
        learner.fp16_deep_prompts = True
        # depth 1 = input-layer prompts only (AdaptCLIP's textual adapter)
        plain = encode_text_embeddings(clip, learner.input_embeddings(), learner.token_ids.argmax(-1))
        assert not torch.allclose(plain, features, atol=1e-5)


def test_prompt_gradients_reach_every_learnable_tensor() -> None:
    detector = tiny()
    detector.set_train_mode(True)
    features = detector.prompt_learner(detector.clip)
    features.sum().backward()
    for name, parameter in detector.prompt_learner.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # the frozen CLIP text tower gets none
    assert all(p.grad is None for p in detector.clip.parameters())


# ---- scoring ---------------------------------------------------------------------------------------------------------

def test_predict_is_the_reference_scoring(clip_like_weights: Path) -> None:
    detector = tiny(pretrained=str(clip_like_weights))
    x = images(3)
    with pytest.warns(UserWarning, match="untrained"):
        prediction = detector.predict(x, "carpet")
    with torch.no_grad():
        text = F.normalize(detector.prompt_learner(detector.clip), dim=-1)
        out = forward_dual_path(detector.clip.visual, x, vv_taps=(24,))
        g = F.normalize(out.global_feature, dim=-1)
        expected_scores = ((g @ text.T) / 0.07).softmax(-1)[:, 1]
        p = F.normalize(detector.clip.visual.ln_post(out.vv_taps[24]) @ detector.clip.visual.proj, dim=-1)
        s = ((p[:, 1:] @ text.T) / 0.07).softmax(-1).reshape(3, 4, 4, 2).permute(0, 3, 1, 2)
        s = F.interpolate(s, size=(56, 56), mode="bilinear", align_corners=False)
        raw = ((s[:, 1] + 1 - s[:, 0]) / 2).numpy()
    expected_maps = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in raw])
    assert prediction.anomaly_maps.shape == (3, 56, 56)
    assert torch.allclose(prediction.image_scores, expected_scores, atol=1e-6)
    assert np.abs(prediction.anomaly_maps.numpy() - expected_maps).max() < 1e-6
    assert prediction.anomaly_maps.std() > 1e-4  # the comparison is not between constants


def test_config_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="feature_layers"):
        tiny(feature_layers=(3,))
    with pytest.raises(ValueError, match="depth"):
        tiny(deep_prompt_depth=13)


# ---- training, checkpoints -------------------------------------------------------------------------------------------

def test_fit_checkpoints_each_epoch_and_resumes_exactly(aux_data: zsadbench.Dataset, tmp_path: Path) -> None:
    straight = tiny()
    result = straight.fit(aux_data, epochs=2, batch_size=4, checkpoint_dir=tmp_path / "a", progress=False)
    assert [p.name for p in result.checkpoints] == ["epoch_1.pth", "epoch_2.pth"] and result.steps == 6
    assert result.epoch_losses[1]["loss"] < result.epoch_losses[0]["loss"]

    interrupted = tiny()

    def stop(step: int, losses: dict[str, float]) -> None:
        if step == 5:  # in the middle of epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(aux_data, epochs=2, batch_size=4, checkpoint_dir=tmp_path / "b", progress=False, on_step=stop)
    assert not (tmp_path / "b" / "epoch_2.pth").exists()
    resumed = tiny()
    rest = resumed.fit(aux_data, epochs=2, batch_size=4, checkpoint_dir=tmp_path / "b",
                       resume_from=tmp_path / "b" / "epoch_1.pth", progress=False)
    assert rest.first_epoch == 2 and rest.steps == 6
    assert rest.epoch_losses[0] == result.epoch_losses[1]  # same batches, same optimiser state
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_checkpoint_round_trip_is_exact(aux_data: zsadbench.Dataset, tmp_path: Path) -> None:
    trained = tiny()
    result = trained.fit(aux_data, epochs=1, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    x = images(2)
    before = trained.predict(x, "tile")
    loaded = tiny(checkpoint=str(result.last_checkpoint))
    after = loaded.predict(x, "tile")
    assert torch.equal(before.image_scores, after.image_scores)
    assert torch.equal(before.anomaly_maps, after.anomaly_maps)
    assert loaded.describe()["prompts"].startswith("sha256:")
    untrained = tiny().predict(x, "tile")
    assert not torch.equal(untrained.anomaly_maps, after.anomaly_maps)


def test_authors_checkpoint_layout_loads(tmp_path: Path) -> None:
    source = tiny()
    with torch.no_grad():
        for parameter in source.prompt_learner.parameters():
            parameter.add_(0.05)
    state = source.prompt_learner.reference_state_dict()
    expected_keys = {"ctx_pos", "ctx_neg", "token_prefix_pos", "token_suffix_pos", "token_prefix_neg",
                     "token_suffix_neg", "tokenized_prompts_pos", "tokenized_prompts_neg",
                     *(f"compound_prompts_text.{i}" for i in range(8)),
                     *(f"compound_prompt_projections.{i}.{p}" for i in range(8) for p in ("weight", "bias"))}
    assert set(state) == expected_keys
    assert state["ctx_pos"].shape == (1, 1, 12, 32) and state["token_suffix_neg"].shape == (1, 1, 64, 32)
    assert state["tokenized_prompts_pos"].dtype == torch.int32
    path = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": state}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same backbone: the stored token embeddings match exactly, no warning
        loaded = tiny(checkpoint=str(path))
    x = images(2)
    assert torch.equal(loaded.predict(x, "a").anomaly_maps, source.predict(x, "a").anomaly_maps)
    # a checkpoint trained on other CLIP weights loads, with a warning about its stored token embeddings
    with pytest.warns(UserWarning, match="other CLIP weights"):
        AnomalyCLIP(**{**TINY, "checkpoint": str(path)}, seed=1)


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path: Path) -> None:
    state = tiny().prompt_learner.reference_state_dict()
    broken = {k: v for k, v in state.items() if k != "compound_prompts_text.7"}
    broken["ctx_mid"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save({"prompt_learner": broken}, path)
    with pytest.raises(CheckpointError, match="compound_prompts_text.7") as info:
        tiny(checkpoint=str(path))
    assert "ctx_mid" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="wrong shapes:.*ctx_pos"):
        tiny(n_ctx=8).load_checkpoint(_saved(tmp_path / "ok.pth", {"prompt_learner": state}))
    ours = {"format": "zsadbench-checkpoint", "method": "adaptclip", "state_dict": {}}
    with pytest.raises(CheckpointError, match="adaptclip"):
        tiny().load_checkpoint(_saved(tmp_path / "other.pth", ours))
    plain = tiny().state_dict()
    plain.pop("prompt_learner.ctx_neg")
    with pytest.raises(CheckpointError, match="missing keys: prompt_learner.ctx_neg"):
        tiny().load_checkpoint(_saved(tmp_path / "plain.pth", plain))


def _saved(path: Path, obj: dict) -> Path:
    torch.save(obj, path)
    return path


# ---- learning signal -------------------------------------------------------------------------------------------------

def test_training_learns_to_segment_held_out_categories(tmp_path: Path) -> None:
    """Prompts trained on carpet and tile segment held-out bottle and skin better than untrained ones (see
    tests/learning_signal.py). With ``lr=0`` the test fails."""
    detector = tiny(pretrained=appearance_weights(tmp_path), image_size=112)
    assert_learned(*train_and_evaluate(detector, epochs=4))
