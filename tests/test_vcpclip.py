"""VCP-CLIP on the tiny ViT-L-14-336 config: class-token splicing, inserted text prompts, post-VCP, scores, training."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from learning_signal import appearance_weights, assert_learned, train_and_evaluate
from scipy import ndimage
from zsadbench.methods.vcpclip import VCPCLIP

import zsadbench
from zsadbench.checkpoints import CheckpointError
from zsadbench.cli import main
from zsadbench.clip.qu_clip import placeholder_tokens, splice_context
from zsadbench.clip.testing import clip_like_state_dict, save_state_dict
from zsadbench.clip.text import TextTower
from zsadbench.clip.visual_context import (
    InsertedTextPrompts,
    PromptGuidedAttention,
    encode_text_with_inserted_prompts,
)
from zsadbench.testing import MethodConformance

pytestmark = pytest.mark.filterwarnings("ignore:vcpclip. no checkpoint")

MODEL = "tiny-ViT-L-14-336"
SIZE = 56  # 4 x 4 patches
TINY = {"model": MODEL, "pretrained": "random", "image_size": SIZE}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny clip-like weights file (non-trivial LayerNorms and biases, sharp attention)."""
    return str(save_state_dict(clip_like_state_dict(MODEL, seed=0), tmp_path_factory.mktemp("w") / "tiny.pt"))


def tiny(**overrides: object) -> VCPCLIP:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = zsadbench.load_method("vcpclip", **{**TINY, **overrides})
    if "checkpoint" not in overrides:  # non-default values, so that a dropped piece changes the numbers
        with torch.no_grad():
            parts = detector.text_prompts
            parts.prompt_norm.weight.copy_(1 + 0.2 * torch.randn(parts.prompt_norm.weight.shape))
            parts.prompt_norm.bias.normal_(0, 0.1)
            detector.pre_vcp.prompt_temp.fill_(math.log(1 / 0.05))
            detector.post_vcp.prompt_temp_l1.fill_(math.log(1 / 0.09))
            detector.post_vcp.q_proj_pre.weight.mul_(30)  # sharp attention: the two states' refined text differ
    return detector  # type: ignore[return-value]


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---- the shared pieces (zsadbench/clip/qu_clip.py, zsadbench/clip/visual_context.py) ---------------------------------

def test_placeholder_tokens_are_the_reference_tokenizers() -> None:
    ids, positions = placeholder_tokens(MODEL, ["a photo of a good <|class|>", "a photo of a damaged <|class|>"])
    # the reference's tokenize() of the same templates (49408 = its <|class|> token, here 0)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 886, 0, 49407]
    assert ids[1, :8].tolist() == [49406, 320, 1125, 539, 320, 13568, 0, 49407]
    assert positions.tolist() == [6, 6] and ids.shape == (2, 77) and int(ids[:, 8:].abs().sum()) == 0
    with pytest.raises(ValueError, match="exactly once"):
        placeholder_tokens(MODEL, ["a photo of a good thing"])


def test_splice_context_shifts_the_rest_of_the_sequence() -> None:
    embeddings = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    context = -torch.ones(4, 2, 3)  # 4 images, r = 2
    out = splice_context(embeddings, torch.tensor([3, 5]), context)
    assert out.shape == (4, 2, 10, 3)
    assert torch.equal(out[1, 0, :3], embeddings[0, :3]) and torch.equal(out[1, 0, 3:5], context[1])
    assert torch.equal(out[1, 0, 5:], embeddings[0, 4:9])  # shifted by r - 1 = 1, the last row dropped
    assert torch.equal(out[2, 1, 5:7], context[2]) and torch.equal(out[2, 1, 7:], embeddings[1, 6:9])


def test_inserted_text_prompts_written_out(weights: str) -> None:
    clip = zsadbench.clip.load_clip(MODEL, weights).model
    tower = TextTower(clip)
    n, count = 2, 3
    embeddings = torch.randn(count, 77, 32, generator=torch.Generator().manual_seed(1))
    eot = torch.tensor([6, 9, 4])
    prompts = [torch.randn(count, n, 32, generator=torch.Generator().manual_seed(10 + k)) for k in range(12)]
    norm = torch.nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.1)
        ours = encode_text_with_inserted_prompts(clip, embeddings, eot, prompts, norm)
        # the reference's encode_text, full length 77, with open_clip's own blocks (sequence-first attention)
        x = embeddings + tower.positional_embedding
        x = torch.cat([x[:, :1], prompts[0], x[:, 1:-n]], dim=1)
        for i, block in enumerate(tower.transformer.resblocks):
            if i > 0:
                x = torch.cat([x[:, :1], prompts[i], x[:, 1 + n:]], dim=1)
            x = block(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(norm(torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)))
        theirs = x[torch.arange(count), eot] @ tower.text_projection
        without_norm = encode_text_with_inserted_prompts(clip, embeddings, eot, prompts, torch.nn.Identity())
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()
    assert (without_norm - theirs).abs().max() > 1e-2 * theirs.abs().max()
    with pytest.raises(ValueError, match="12 text blocks"):
        encode_text_with_inserted_prompts(clip, embeddings, eot, prompts[:11], norm)


def test_inserted_text_prompts_dropout_only_while_training() -> None:
    parts = InsertedTextPrompts(8, 8, length=1, blocks=4, dropout=0.5)
    assert len(parts.block_prompts(3)) == 4 and parts.block_prompts(3)[0].shape == (3, 1, 8)
    parts.eval()
    assert torch.equal(parts.block_prompts(2)[1][0], parts.block_prompts(2)[1][1])
    parts.train()
    assert any((p == 0).any() for p in parts.block_prompts(4))


def test_prompt_guided_attention_written_out() -> None:
    torch.manual_seed(0)
    attention = PromptGuidedAttention(text_width=6, patch_width=16, out_width=16, num_heads=4)
    text, patches = torch.randn(2, 2, 6), F.normalize(torch.randn(2, 9, 16), dim=-1)

    def project(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        return x @ conv.weight[:, :, 0].T + conv.bias

    q = project(attention.q_proj_pre, text).reshape(2, 2, 4, 4).transpose(1, 2)
    k = project(attention.k_proj_pre_1, patches).reshape(2, 9, 4, 4).transpose(1, 2)
    v = project(attention.v_proj_pre_1, patches).reshape(2, 9, 4, 4).transpose(1, 2)
    heads = (q @ k.transpose(-1, -2)).softmax(-1) @ v  # unscaled logits (beta_t = 1)
    expected = F.normalize(project(attention.proj_post_t, heads.transpose(1, 2).reshape(2, 2, 16)), dim=-1)
    assert torch.allclose(attention(text, patches), expected, atol=1e-6)


# ---- the method ------------------------------------------------------------------------------------------------------

def test_prediction_is_the_reference_aggregation(weights: str) -> None:
    detector = tiny(pretrained=weights)
    x = images(2)
    prediction = detector.predict(x, "anything")
    assert prediction.image_scores.shape == (2,) and prediction.anomaly_maps.shape == (2, SIZE, SIZE)
    assert torch.isfinite(prediction.anomaly_maps).all() and torch.isfinite(prediction.image_scores).all()
    with torch.no_grad():
        out = detector.forward(x)
    assert len(out.raw) == len(out.new) == 4 and out.raw[0].shape == (2, 2, SIZE, SIZE)
    raw = np.mean([p[:, 1].numpy() for p in out.raw], axis=0)  # test.py: np.mean over the layers
    new = np.mean([p[:, 1].numpy() for p in out.new], axis=0)
    smoothed = ndimage.gaussian_filter(0.2 * raw + 0.8 * new, sigma=8, axes=(1, 2))
    top = 2000
    score = (np.partition(raw.reshape(2, -1), -top)[:, -top:].mean(1)
             + np.partition(new.reshape(2, -1), -top)[:, -top:].mean(1))
    assert np.abs(prediction.anomaly_maps.numpy() - smoothed).max() < 1e-5
    assert np.abs(prediction.image_scores.numpy() - score).max() < 1e-5
    assert raw.std() > 1e-3 and new.std() > 1e-3 and np.abs(raw - new).max() > 1e-3  # two different maps


def test_each_map_is_its_branch_written_out(weights: str) -> None:
    detector = tiny(pretrained=weights)
    x = images(1)
    with torch.no_grad():
        out = detector.forward(x)
        vision = zsadbench.clip.forward_vision(detector.clip.visual, x, (6, 12, 18, 24))
        text = detector.text_features(vision.pooled)
        tokens = vision.taps[12][:, 1:]
        dense = F.normalize(tokens, dim=-1)
        refined = detector.post_vcp(text, dense)
        logits_new = math.exp(math.log(1 / 0.09)) * dense @ refined.transpose(1, 2)
        projected = F.normalize(detector.patch_projections.fc[1](tokens), dim=-1)
        logits_raw = math.exp(math.log(1 / 0.05)) * projected @ text.transpose(1, 2)
    for logits, probabilities in ((logits_new, out.new[1]), (logits_raw, out.raw[1])):
        grid = logits.transpose(1, 2).reshape(1, 2, 4, 4)
        expected = F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear", align_corners=True).softmax(1)
        assert (probabilities - expected).abs().max() < 1e-5
    assert text.shape == (1, 2, 32) and torch.allclose(text.norm(dim=-1), torch.ones(1, 2))


def test_the_text_depends_on_the_image(weights: str) -> None:
    detector = tiny(pretrained=weights)
    with torch.no_grad():
        pooled = zsadbench.clip.forward_vision(detector.clip.visual, images(2)).pooled
        with_context = detector.text_features(pooled)
        detector.config.use_global = False
        without = detector.text_features(pooled)
    assert (with_context[0] - with_context[1]).abs().max() > 1e-4  # pre-VCP: each image its own prompts
    assert torch.equal(without[0], without[1])


def test_a_batch_equals_its_images_one_by_one(weights: str) -> None:
    detector = tiny(pretrained=weights)
    x = images(3)
    batch = detector.predict(x, "c")
    for i in range(3):
        single = detector.predict(x[i:i + 1], "c")
        assert (single.anomaly_maps[0] - batch.anomaly_maps[i]).abs().max() < 1e-5
        assert (single.image_scores[0] - batch.image_scores[i]).abs().max() < 1e-5


def test_parts_sizes_and_bad_options() -> None:
    detector = tiny()
    sizes = {k: tuple(v.shape) for k, v in detector.state_dict().items()}
    assert sizes["patch_projections.fc.3.weight"] == (32, 64)  # vision width -> embedding
    assert sizes["pre_vcp.prompt_query"] == (1, 2, 32) and sizes["pre_vcp.prompt_linear1.fc.weight"] == (2, 1, 3)
    assert sizes["post_vcp.q_proj_pre.weight"] == (64, 32, 1) and sizes["post_vcp.k_proj_pre_1.weight"] == (64, 64, 1)
    assert sizes["text_prompts.deep_prompt_embeddings"] == (11, 1, 32)  # text blocks 2..12
    assert sizes["text_prompts.prompt_embeddings"] == (1, 1, 32)
    with pytest.raises(ValueError, match="feature_layers"):
        tiny(feature_layers=(25,))
    with pytest.raises(ValueError, match="prompt_len"):
        tiny(prompt_len=0)
    with pytest.raises(ValueError, match="text width 32"):
        detector.pre_vcp(torch.zeros(1, 48))  # the global embedding must have the text width
    config = VCPCLIP.Config()
    assert (config.train.lr, config.train.batch_size, config.train.epochs, config.train.seed) == (4e-5, 32, 10, 333)
    assert config.pos_embed_mode == "bicubic-antialias" and config.activation == "gelu"
    assert not detector.backbone.quick_gelu


# ---- training --------------------------------------------------------------------------------------------------------

def test_training_loss_is_the_reference_recipe(weights: str) -> None:
    detector = tiny(pretrained=weights, prompt_dropout=0.0)
    detector.set_train_mode(True)
    x, mask = images(2), torch.zeros(2, SIZE, SIZE)
    mask[0, 10:30, 20:40] = 1
    losses = detector.training_step(x, mask, torch.tensor([1, 0]))
    out = detector.forward(x)
    smooth = 1e-5

    def focal_dice(p: torch.Tensor) -> torch.Tensor:  # utils/loss.py FocalLoss + BinaryDiceLoss, written out
        p_true = torch.where(mask > 0, p[:, 1] * (1 - smooth) + p[:, 0] * smooth,
                             p[:, 0] * (1 - smooth) + p[:, 1] * smooth) + smooth
        focal = (-(1 - p_true) ** 2 * p_true.log()).mean()
        dice = (2 * (p[:, 1] * mask).flatten(1).sum(1) + 1) / (p[:, 1].flatten(1).sum(1) + mask.flatten(1).sum(1) + 1)
        return focal + 1 - dice.mean()

    raw = sum(focal_dice(p) for p in out.raw)
    new = sum(focal_dice(p) for p in out.new)
    assert abs(losses["loss_raw"].item() - float(raw)) < 1e-4 and abs(losses["loss_new"].item() - float(new)) < 1e-4
    assert abs(losses["loss"].item() - float(raw + new)) < 1e-4
    losses["loss"].backward()
    grads = {k: p.grad for k, p in zip(detector.state_dict(), detector.trainable_parameters())}
    assert grads.pop("text_prompts.prompt_text_projection") is None  # saved by the reference, never used
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [k for k, g in grads.items() if g is None]
    optimizer = detector.make_optimizer()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["betas"] == (0.5, 0.999)
    assert [g["lr"] for g in optimizer.param_groups] == [4e-5, 0.01]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(detector.pre_vcp.prompt_temp),
                                                                    id(detector.post_vcp.prompt_temp_l1)}


def test_training_lowers_the_loss_on_the_auxiliary_data(tmp_path: Path) -> None:
    """The learning signal that the tiny model shows: 40 Adam steps on carpet and tile lower the reference loss by
    more than 15 % (measured 9.88 -> 7.88). With ``lr=0`` (and ``temperature_lr=0``) it fails."""
    detector = zsadbench.load_method("vcpclip", model="tiny-ViT-L-14-336", pretrained=appearance_weights(tmp_path),
                                     image_size=112, **{"train.lr": 1e-2})
    aux = zsadbench.load_dataset("synthetic", image_size=64, n_train=0, n_test_normal=3, n_test_anomalous=5,
                                 categories="carpet,tile")
    result = detector.fit(aux, epochs=10, batch_size=4, progress=False)
    losses = [epoch["loss"] for epoch in result.epoch_losses]
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.xfail(reason="not seen on the tiny model: the untrained parts already reach 0.996 pixel AUROC on skin "
                          "and training on carpet + tile lowers the held-out mean (0.776 -> 0.661 at lr 1e-2, 10 "
                          "epochs); the reference's lr is 4e-5 over thousands of images", strict=False)
def test_training_learns_to_segment_held_out_categories(tmp_path: Path) -> None:
    """Parts trained on carpet and tile segment held-out bottle and skin better than untrained ones
    (tests/learning_signal.py)."""
    detector = zsadbench.load_method("vcpclip", model="tiny-ViT-L-14-336", pretrained=appearance_weights(tmp_path),
                                     image_size=112, **{"train.lr": 1e-2})
    before, after, result = train_and_evaluate(detector, epochs=3)
    assert_learned(before, after, result)


def test_checkpoint_round_trip_and_the_authors_layout(tmp_path: Path) -> None:
    aux = zsadbench.load_dataset("synthetic", image_size=48, n_train=0, n_test_normal=1, n_test_anomalous=2,
                                 categories="carpet")
    trained = tiny()
    result = trained.fit(aux, epochs=1, batch_size=2, checkpoint_dir=tmp_path, progress=False, lr=1e-3)
    assert result.steps == 2
    x = images(2)
    loaded = tiny(checkpoint=str(result.last_checkpoint))
    for a, b in zip(trained.predict(x, "c"), loaded.predict(x, "c")):
        assert torch.equal(a, b)
    assert loaded.describe()["parts"].startswith("sha256:")
    official = trained.reference_state_dict()  # what train.py's save_dict holds
    assert set(official) == {"trainable_linearlayer", "New_Lan_Embed", "Zero_try", "prompt_embeddings",
                             "deep_prompt_embeddings", "prompt_proj.weight", "prompt_proj.bias", "prompt_norm.weight",
                             "prompt_norm.bias", "prompt_text_projection"}
    assert set(official["Zero_try"]) >= {"prompt_temp_l1", "q_proj_pre.weight", "proj_post_t.bias"}
    torch.save(official, tmp_path / "train_visa.pth")
    from_official = tiny(checkpoint=str(tmp_path / "train_visa.pth"))
    for a, b in zip(trained.predict(x, "c"), from_official.predict(x, "c")):
        assert torch.equal(a, b)
    broken = {k: dict(v) if isinstance(v, dict) else v for k, v in official.items()}
    del broken["Zero_try"]["prompt_temp_l1"]
    del broken["prompt_norm.bias"]
    broken["trainable_linearlayer"]["fc.4.bias"] = torch.zeros(32)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing keys: Zero_try.prompt_temp_l1, prompt_norm.bias") as info:
        tiny(checkpoint=str(tmp_path / "broken.pth"))
    assert "unexpected keys: trainable_linearlayer.fc.4.bias" in str(info.value)
    assert "broken.pth" in str(info.value)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        tiny(prompt_len=3, checkpoint=str(tmp_path / "train_visa.pth"))


def test_train_then_run(isolated_results: Path, mlflow_store: Path) -> None:
    data = ["--dataset", "synthetic", "--dataset-option", "image_size=48", "--dataset-option", "n_train=0",
            "--dataset-option", "n_test_normal=1", "--dataset-option", "n_test_anomalous=2"]
    options = ["--set", f"model={MODEL}", "--pretrained", "random", "--set", f"image_size={SIZE}"]
    assert main(["train", "--method", "vcpclip", *data, "--categories", "carpet", *options, "--epochs", "1"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{isolated_results / 'mlflow.db'}")
    training = mlflow.search_runs(experiment_names=["zsadbench"]).iloc[0]
    assert training["params.config.train.seed"] == "333" and training["params.config.train.lr"] == "4e-05"
    checkpoint = training["tags.zsadbench.checkpoint"]
    assert main(["run", "--method", "vcpclip", "--checkpoint", checkpoint, *data, "--categories", "bottle",
                 *options]) == 0
    runs = mlflow.search_runs(experiment_names=["zsadbench"])
    evaluation = runs[runs["tags.zsadbench.kind"] == "evaluation"].iloc[0]
    assert evaluation["params.detector.parts"].startswith("sha256:")


class TestVCPCLIPConformance(MethodConformance):
    """The conformance suite (zsadbench.testing) on the smoke preset."""

    method = "vcpclip"
