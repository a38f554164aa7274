"""Bayes-PFL on the tiny ViT-L-14-336 config: prompt flows, RCA, prompts, sampling, training, checkpoints, CLI."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from learning_signal import appearance_weights, assert_learned, train_and_evaluate, train_and_evaluate_one_category
from scipy import ndimage
from zsadbench.methods.bayes_pfl import BayesPFL, orthogonality_loss

import zsadbench
import zsadbench.testing
from zsadbench.checkpoints import CheckpointError
from zsadbench.cli import main
from zsadbench.clip.cross_modal_attention import ResidualCrossModalAttention
from zsadbench.clip.prompt_flows import flow_kl_divergence, planar_flow
from zsadbench.clip.testing import clip_like_state_dict, save_state_dict
from zsadbench.clip.text import TextTower, tokenize
from zsadbench.losses import balanced_focal_loss, foreground_dice_loss

pytestmark = pytest.mark.filterwarnings("ignore:bayes_pfl. no checkpoint")

MODEL = "tiny-ViT-L-14-336"
SIZE = 56  # 4 x 4 patches
TINY = {"model": MODEL, "pretrained": "random", "image_size": SIZE}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny clip-like weights file (non-trivial LayerNorms and biases, sharp attention)."""
    return str(save_state_dict(clip_like_state_dict(MODEL, seed=0), tmp_path_factory.mktemp("w") / "tiny.pt"))


def tiny(**overrides: object) -> BayesPFL:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zsadbench.load_method("bayes_pfl", **{**TINY, **overrides})  # type: ignore[return-value]


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---- the composable pieces (zsadbench/clip/prompt_flows.py, cross_modal_attention.py, losses.py) -------------------

def test_planar_flow_log_det_is_the_jacobian_determinant() -> None:
    generator = torch.Generator().manual_seed(0)
    z, u = torch.randn(1, 6, generator=generator, dtype=torch.float64), torch.randn(1, 6, 1, generator=generator,
                                                                                      dtype=torch.float64)
    w, b = torch.randn(1, 1, 6, generator=generator, dtype=torch.float64), torch.randn(1, 1, 1, generator=generator,
                                                                                       dtype=torch.float64)
    moved, log_det = planar_flow(z, u, w, b)
    assert torch.allclose(moved, z + u[..., 0] * torch.tanh(z @ w[0].T + b[0]))
    jacobian = torch.autograd.functional.jacobian(lambda x: planar_flow(x, u, w, b)[0], z)[0, :, 0, :]
    assert abs(log_det.item() - math.log(abs(torch.linalg.det(jacobian).item()) + 1e-5)) < 1e-9


def test_prompt_flow_samples_and_kl_term() -> None:
    detector = tiny()
    flow = detector.pfl.PFL_context
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        flow.amor_u.weight.normal_(0, 0.1)  # non-trivial flows
        sample = flow.sample(x, eps)
        mu, log_var = flow.encoder.weight_mean(x), flow.encoder.weight_log_variance(x)
    variance = torch.exp(0.5 * log_var)  # the reference's "var": its square root is the sampling std
    assert torch.allclose(sample.z0, mu + eps * variance.sqrt(), atol=1e-6)
    z, log_det = sample.z0, torch.zeros(3)
    u = flow.amor_u(x).view(3, 10, 32, 1)
    w, b = flow.amor_w(x).view(3, 10, 1, 32), flow.amor_b(x).view(3, 10, 1, 1)
    for k in range(10):
        z, step = planar_flow(z, u[:, k], w[:, k], b[:, k])
        log_det = log_det + step
    assert torch.allclose(sample.zk, z, atol=1e-6) and (sample.zk - sample.z0).abs().max() > 1e-3
    log_q = (-0.5 * (variance.log() + (sample.z0 - mu) ** 2 / variance)).sum(1)
    log_p = (-0.5 * sample.zk ** 2).sum(1)
    assert abs(flow_kl_divergence(sample, 3).item() - ((log_q - log_p).sum() - log_det.sum()).item() / 3) < 1e-4
    # the image-agnostic flow ignores the image: its input is the learned state
    agnostic = detector.pfl.PFL_normal
    one = torch.randn(1, 32)
    assert torch.equal(agnostic.sample(x[:1], one).zk, agnostic.sample(x[1:2], one).zk)
    # its single draw is broadcast over the image batch in the density terms, not in the log-det (the reference's)
    single = agnostic.sample(x, one)
    log_q = (-0.5 * (single.variance.log() + (single.z0 - single.mu) ** 2 / single.variance)).sum()
    log_p = (-0.5 * single.zk ** 2).sum()
    expected = (log_q - log_p) - single.log_det.sum() / 3
    assert abs(flow_kl_divergence(single, 3).item() - expected.item()) < 1e-3 * abs(expected.item())


def test_residual_cross_modal_attention_written_out() -> None:
    torch.manual_seed(0)
    rca = ResidualCrossModalAttention(vision_width=12, text_width=8, num_layers=2, num_heads=2)
    text, patches = torch.randn(2, 3, 8), torch.randn(2, 5, 12)
    refined, keys = rca(text, patches, 1)
    k = F.normalize(patches @ rca.linear_proj[1].weight.T, dim=-1)
    q = text @ rca.q_proj_pre.weight[..., 0].T + rca.q_proj_pre.bias
    out = torch.zeros(2, 3, 8)
    for h in range(2):  # per head: 4 channels, scale 8 ** -0.5 (the full width)
        channels = slice(4 * h, 4 * h + 4)
        weights = (q[..., channels] @ k[..., channels].transpose(1, 2) * 8 ** -0.5).softmax(-1)
        out[..., channels] = weights @ k[..., channels]
    assert torch.allclose(keys, k, atol=1e-6)
    assert torch.allclose(refined, F.normalize(out + text, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        ResidualCrossModalAttention(12, 8, 1, num_heads=3)


def test_balanced_focal_and_foreground_dice_losses() -> None:
    p_abnormal = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    probabilities = torch.stack([1 - p_abnormal, p_abnormal], 1)
    gt = torch.zeros(2, 4, 4)
    gt[0, :2, :2] = 1
    p_true = torch.where(gt > 0, p_abnormal, 1 - p_abnormal)
    focal = -(1 - p_true) ** 2 * torch.log(p_true + 1e-8)
    expected = focal[gt > 0].mean() + focal[gt == 0].mean()
    assert abs(balanced_focal_loss(probabilities, gt).item() - expected.item()) < 1e-6
    dice = 1 - (2 * (p_abnormal * gt).sum() + 1e-5) / (p_abnormal.sum() + gt.sum() + 1e-5)
    assert abs(foreground_dice_loss(probabilities, gt).item() - dice.item()) < 1e-6
    assert balanced_focal_loss(probabilities, torch.zeros(2, 4, 4)).item() == pytest.approx(
        (-(p_abnormal ** 2) * torch.log(1 - p_abnormal + 1e-8)).mean().item(), abs=1e-6)  # no foreground: 0 for it


# ---- prompts, forward, scoring ---------------------------------------------------------------------------------------

def test_learned_tokens_replace_the_placeholder(weights: str) -> None:
    detector = tiny(pretrained=weights, sample_num=2)
    pfl, clip = detector.pfl, detector.clip
    generator = torch.Generator().manual_seed(5)
    image_samples, normal, abnormal = (torch.randn(2, n, 32, generator=generator) for n in (1, 1, 1))
    with torch.no_grad():
        text = detector.text_features(["pcb1"], image_samples, normal, abnormal)
    assert text.shape == (1, 12, 32)
    # written out as the reference does it: full 77-token sequence, "X" replaced by the 10 learned tokens
    tower = TextTower(clip)
    ids = tokenize(MODEL, ["X printed circuit board"])[0]
    eot = int(ids.argmax())
    tokens = tower.token_embedding(ids)
    for state, states, draws in ((0, pfl.prompt_state_normal, normal), (1, pfl.prompt_state_abnormal, abnormal)):
        for r in range(2):
            for b in range(3):
                learned = torch.cat([pfl.prompt_context[b] + image_samples[r, 0], states[b] + draws[r, 0]])
                x = torch.cat([tokens[:1], learned, tokens[2:77 - 10 + 1]])[None] + tower.positional_embedding
                with torch.no_grad():
                    for block in tower.transformer.resblocks:
                        x = block(x, attn_mask=tower.attn_mask)
                    feature = tower.ln_final(x)[0, eot + 9] @ tower.text_projection
                index = state * 6 + r * 3 + b
                assert (text[0, index] - F.normalize(feature, dim=-1)).abs().max() < 1e-5, (state, r, b)
    with pytest.raises(ValueError, match="do not fit the text context"):
        detector.text_features([" ".join(["word"] * 70)], image_samples, normal, abnormal)


def test_prediction_is_the_reference_aggregation(weights: str) -> None:
    detector = tiny(pretrained=weights, image_score="classifier")
    x = images(2)
    with torch.no_grad():
        out = detector.forward(x, ["carpet"] * 2, detector.inference_draws(2), stage=2)
    prediction = detector.predict(x, "carpet")
    m = 30  # 3 prompts x 10 samples per state
    assert out.image_logits.shape == (2, 60) and out.layer_logits[0].shape == (2, 60, 4, 4)
    expected_scores = torch.stack([torch.stack([out.image_logits[:, i], out.image_logits[:, i + m]], 1).softmax(1)[:, 1]
                                   for i in range(m)]).mean(0)
    assert (prediction.image_scores - expected_scores).abs().max() < 1e-6
    maps = []
    for logits in out.layer_logits:
        up = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
        maps += [torch.stack([up[:, i], up[:, i + m]], 1).softmax(1)[:, 1] for i in range(m)]
    mean = torch.stack(maps).mean(0)
    smoothed = np.stack([ndimage.gaussian_filter(a, sigma=8) for a in mean.numpy()])
    assert np.abs(prediction.anomaly_maps.numpy() - smoothed).max() < 1e-6 and prediction.anomaly_maps.std() > 1e-5
    # stage 1 scores the plain CLIP embedding: other image scores, the same maps
    stage1 = tiny(pretrained=weights, image_score="classifier", stage=1).predict(x, "carpet")
    assert not torch.allclose(stage1.image_scores, prediction.image_scores)
    assert torch.equal(stage1.anomaly_maps, prediction.anomaly_maps)


def test_fusion_min_max_normalises_over_the_set(weights: str) -> None:
    x = images(4, seed=3)
    classifier = tiny(pretrained=weights, image_score="classifier")
    with torch.no_grad():
        scores, maps = classifier.score_batch(x, "capsules")
    fused = tiny(pretrained=weights).predict(x, "capsules")
    top = maps.flatten(1).topk(20, dim=1).values.mean(1)  # capsules: k = 20

    def minmax(v: torch.Tensor) -> torch.Tensor:
        return (v - v.min()) / (v.max() - v.min() + 1e-8)

    assert (fused.image_scores - (0.5 * minmax(scores) + 0.5 * minmax(top))).abs().max() < 1e-6
    assert tiny().transductive and not classifier.transductive
    assert classifier.topk_for("bottle") == 2000


def test_sampling_is_seeded_and_recorded(weights: str) -> None:
    x = images(2, seed=1)
    first, second = tiny(pretrained=weights).predict(x, "tile"), tiny(pretrained=weights).predict(x, "tile")
    assert torch.equal(first.image_scores, second.image_scores) and torch.equal(first.anomaly_maps,
                                                                                second.anomaly_maps)
    other = tiny(pretrained=weights, sampling_seed=7)
    assert not torch.allclose(other.predict(x, "tile").anomaly_maps, first.anomaly_maps)
    assert other.resolved_config()["sampling_seed"] == 7
    draws = tiny().inference_draws(3)
    assert draws.context.shape == (10, 3, 32) and draws.normal.shape == (10, 1, 32)
    assert torch.equal(draws.context[:, 0], draws.context[:, 2])  # the same eps for every image (see deviations)
    assert not torch.equal(draws.normal, draws.abnormal)


# ---- training --------------------------------------------------------------------------------------------------------

def test_training_losses_are_the_reference_recipe(weights: str) -> None:
    detector = tiny(pretrained=weights)
    detector.set_train_mode(True)
    x, mask = images(2), torch.zeros(2, SIZE, SIZE)
    mask[1, 10:30, 20:40] = 1
    draws = detector.training_draws(2)
    losses = detector.losses(x, mask, torch.tensor([0, 1]), ["carpet", "tile"], draws, pair=2)
    out = detector.forward(x, ["carpet", "tile"], draws, stage=1, with_kl=True)
    assert out.text.shape == (2, 6, 32) and out.kl is not None
    image = F.cross_entropy(out.image_logits[:, [2, 5]], torch.tensor([0, 1]))
    focal = dice = 0.0
    for logits in out.layer_logits:
        p = F.interpolate(logits[:, [2, 5]], size=(SIZE, SIZE), mode="bilinear", align_corners=True).softmax(1)
        focal = focal + balanced_focal_loss(p, mask)
        dice = dice + foreground_dice_loss(p, mask)
    orthogonal = orthogonality_loss(out.text[:, :3]) + orthogonality_loss(out.text[:, 3:])
    kl = 0.01 * sum(out.kl)
    assert abs(losses["image"].item() - image.item()) < 1e-5
    assert abs(losses["focal"].item() - focal.item()) < 1e-4 and abs(losses["dice"].item() - dice.item()) < 1e-5
    assert abs(losses["kl"].item() - kl.item()) < 1e-4 and abs(losses["orthogonal"].item() - orthogonal.item()) < 1e-6
    assert abs(losses["loss"].item() - (image + focal + dice + kl + orthogonal).item()) < 1e-4
    losses["loss"].backward()
    grads = {n: p.grad for n, p in detector.pfl.named_parameters()}
    for name in ("prompt_context", "prompt_state_abnormal", "temperature_pixel", "temperature_image",
                 "PFL_context.amor_u.weight", "PFL_normal.state", "PFL_abnormal.amor_w", "state_encoder.weight_mean."
                 "module.0.weight", "RCA.linear_proj.3.weight", "RCA.q_proj_pre.weight", "class_mapping.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    for name in ("image_mapping.weight", "fuse.compress.weight", "context_decoder.weight_mean.module.0.weight"):
        assert grads[name] is None, name  # stage 2 parts and the discarded decoder
    stage2 = detector.losses(x, mask, torch.tensor([0, 1]), ["carpet", "tile"], draws, pair=0, stage=2)
    assert set(stage2) == {"loss", "image"}


def test_schedule_groups_and_stages() -> None:
    detector = tiny(stage2_epochs=1)
    aux = zsadbench.load_dataset("synthetic", image_size=48, n_train=0, n_test_normal=1, n_test_anomalous=2,
                                 categories="carpet")
    optimizer = detector.make_optimizer()
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == {"prompts": 1e-3, "temperatures": 0.01, "flows": 1e-3, "linear": 1e-4, "classifier": 1e-4}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(detector.pfl.parameters()))
    seen: list[tuple[int, dict[str, float]]] = []
    before = {n: p.detach().clone() for n, p in detector.pfl.named_parameters()}
    original = detector.training_stage

    def record() -> int:
        stage = original()
        assert detector._optimizer is not None
        seen.append((stage, {g["name"]: g["lr"] for g in detector._optimizer.param_groups}))
        return stage

    detector.training_stage = record  # type: ignore[method-assign]
    detector.fit(aux, epochs=3, batch_size=1, progress=False)  # 3 steps per epoch: warm-up int(0.9) = 0 steps
    assert [s for s, _ in seen] == [1] * 6 + [2] * 3
    assert seen[0][1]["prompts"] == pytest.approx(1e-3)  # no warm-up steps: cosine from the base rate
    assert seen[3][1]["prompts"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 9)))
    assert seen[6][1] == {"prompts": 0.0, "temperatures": 0.0, "flows": 0.0, "linear": 0.0, "classifier": 1e-4}
    after = dict(detector.pfl.named_parameters())
    assert not torch.equal(before["prompt_context"], after["prompt_context"])
    assert not torch.equal(before["image_mapping.weight"], after["image_mapping.weight"])  # stage 2 trained it


@pytest.mark.slow
@pytest.mark.xfail(reason="not seen to learn on the tiny model: the tiny random text tower gives the 3 prompts of a "
                          "state the same features (the orthogonality term stays at its maximum 1.33) and the epoch "
                          "loss does not fall by 20 %; held-out pixel AUROC moved 0.60 -> 0.76-0.80 (bottle 0.21 -> "
                          "0.52-0.61, near chance; skin stays 0.99) in runs of 6-12 epochs at lr 0.01-0.05",
                   strict=False)
def test_training_learns_to_segment_held_out_categories(tmp_path: Path) -> None:
    """Flows and prompts trained on carpet and tile segment held-out bottle and skin better than untrained ones
    (tests/learning_signal.py)."""
    detector = zsadbench.load_method("bayes_pfl", model="tiny-ViT-L-14-336-quickgelu", activation="quick_gelu",
                                     pretrained=appearance_weights(tmp_path), image_size=112, stage2_epochs=0,
                                     sample_num=3, image_score="classifier", lr_prompts=0.05, lr_flows=0.05,
                                     **{"train.lr": 0.05})
    before, after, result = train_and_evaluate(detector, epochs=6)
    assert_learned(before, after, result)


def test_training_learns_to_segment_new_images_of_its_category(tmp_path: Path) -> None:
    """Flows and prompts trained on carpet segment new carpet images better than untrained ones (the in-category
    setting of tests/learning_signal.py; measured 0.38 -> 0.96 pixel AUROC at lr 0.01, and 0.38 -> 0.38 at lr 0). The
    epoch loss is not asserted: over these 4 epochs it does not fall (12.3 -> 14.9 measured)."""
    detector = zsadbench.load_method("bayes_pfl", model="tiny-ViT-L-14-336-quickgelu", activation="quick_gelu",
                                     pretrained=appearance_weights(tmp_path), image_size=112, stage2_epochs=0,
                                     sample_num=3, image_score="classifier", lr_prompts=0.01, lr_flows=0.01,
                                     **{"train.lr": 0.01})
    before, after, _ = train_and_evaluate_one_category(detector, "carpet", epochs=4)
    assert after.loc["mean", "pixel_auroc"] - before.loc["mean", "pixel_auroc"] > 0.3, (before, after)
    assert after.loc["mean", "pixel_auroc"] > 0.8, after


# ---- checkpoints -----------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_the_authors_layout(tmp_path: Path) -> None:
    aux = zsadbench.load_dataset("synthetic", image_size=48, n_train=0, n_test_normal=2, n_test_anomalous=2,
                                 categories="carpet,bottle")
    trained = tiny()
    result = trained.fit(aux, epochs=1, batch_size=3, checkpoint_dir=tmp_path, progress=False)
    assert result.steps == 3
    x = images(3)
    loaded = tiny(checkpoint=str(result.last_checkpoint))
    for a, b in zip(trained.predict(x, "c"), loaded.predict(x, "c")):
        assert torch.equal(a, b)
    assert loaded.describe()["prompt flows"].startswith("sha256:")
    official = trained.reference_state_dict()  # what train.py saves: {"MyModel": Context_Prompting.state_dict()}
    keys = official["MyModel"]
    assert {"prompt_context", "PFL_context.encoder.weight_mean.module.0.weight", "context_encoder.weight_mean.module."
            "0.weight", "PFL_normal.state", "PFL_abnormal.amor_b", "RCA.linear_proj.3.weight", "fuse.compress.bias",
            "PFL_context.p_mu.0.weight", "state_decoder.weight_mean.module.4.bias"} <= set(keys)
    assert len(keys) == 131
    torch.save(official, tmp_path / "train_visa.pth")
    from_official = tiny(checkpoint=str(tmp_path / "train_visa.pth"))
    for a, b in zip(trained.predict(x, "c"), from_official.predict(x, "c")):
        assert torch.equal(a, b)
    broken = {k: v for k, v in keys.items() if k != "RCA.q_proj_pre.bias"}
    broken["RCA.extra"] = torch.zeros(1)
    torch.save({"MyModel": broken}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing keys: RCA.q_proj_pre.bias") as info:
        tiny(checkpoint=str(tmp_path / "broken.pth"))
    assert "unexpected keys: RCA.extra" in str(info.value) and "broken.pth" in str(info.value)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        tiny(prompt_context_len=4, checkpoint=str(tmp_path / "train_visa.pth"))


def test_train_then_run(isolated_results: Path, mlflow_store: Path) -> None:
    data = ["--dataset", "synthetic", "--dataset-option", "image_size=48", "--dataset-option", "n_train=0",
            "--dataset-option", "n_test_normal=1", "--dataset-option", "n_test_anomalous=2"]
    options = ["--set", f"model={MODEL}", "--pretrained", "random", "--set", f"image_size={SIZE}",
               "--set", "sample_num=2"]
    assert main(["train", "--method", "bayes_pfl", *data, "--categories", "carpet", *options, "--epochs", "1",
                 "--set", "train.batch_size=2"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{isolated_results / 'mlflow.db'}")
    training = mlflow.search_runs(experiment_names=["zsadbench"]).iloc[0]
    assert training["params.config.train.seed"] == "333" and training["params.config.lr_prompts"] == "0.001"
    checkpoint = training["tags.zsadbench.checkpoint"]
    assert main(["run", "--method", "bayes_pfl", "--checkpoint", checkpoint, *data, "--categories", "bottle",
                 *options]) == 0
    runs = mlflow.search_runs(experiment_names=["zsadbench"])
    evaluation = runs[runs["tags.zsadbench.kind"] == "evaluation"].iloc[0]
    assert evaluation["params.detector.prompt flows"].startswith("sha256:")
    assert evaluation["params.config.sampling_seed"] == "333"


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="image_score"):
        tiny(image_score="max")
    with pytest.raises(ValueError, match="stage"):
        tiny(stage=3)
    with pytest.raises(ValueError, match="feature_layers"):
        tiny(feature_layers=(6, 30))


class TestBayesPFLConformance(zsadbench.testing.MethodConformance):
    """The conformance suite on the fusion (transductive) default."""

    method = "bayes_pfl"


class TestBayesPFLClassifierConformance(zsadbench.testing.MethodConformance):
    """The conformance suite on the inductive classifier scores (batch-size invariance is checked here)."""

    method = "bayes_pfl"
    overrides = {**TINY, "image_score": "classifier"}
