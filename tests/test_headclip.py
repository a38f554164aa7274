"""HeadCLIP (reconstruction) on the tiny ViT-L-14-336 config: head weights, joint score, training, checkpoints."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
from learning_signal import appearance_weights, assert_learned, train_and_evaluate
from zsadbench.methods.anomalyclip import AnomalyCLIP
from zsadbench.methods.headclip import HeadCLIP, joint_anomaly_score

import zsadbench
from zsadbench.checkpoints import CheckpointError
from zsadbench.cli import main
from zsadbench.clip.dual_path import forward_dual_path
from zsadbench.clip.head_weights import HeadWeights, select_layers
from zsadbench.clip.testing import clip_like_state_dict, save_state_dict
from zsadbench.config import ConfigError

MODEL = "tiny-ViT-L-14-336-quickgelu"
TINY = {"model": MODEL, "pretrained": "random", "image_size": 56}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny clip-like weights file (non-trivial LayerNorms and biases, sharp attention)."""
    return str(save_state_dict(clip_like_state_dict(MODEL, seed=0), tmp_path_factory.mktemp("w") / "tiny.pt"))


def tiny(method: str = "headclip", **overrides: object):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zsadbench.load_method(method, **{**TINY, **overrides})


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def predict(detector, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return detector.predict(x, "carpet")


def fold_into_out_projection(detector: AnomalyCLIP, weights: dict[int, torch.Tensor]) -> None:
    """Multiplies the input columns of each layer's out_proj weight by its head weights (HeadCLIP's identity)."""
    with torch.no_grad():
        for layer, w in weights.items():
            attn = detector.clip.visual.transformer.resblocks[layer - 1].attn
            attn.out_proj.weight.mul_(w.repeat_interleave(attn.head_dim)[None])


# ---- parity anchors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["static", "conditioned"])
def test_identity_head_weights_and_alpha_one_are_exactly_anomalyclip(weights: str, mode: str) -> None:
    x = images(3)
    headclip = tiny(pretrained=weights, **{"lhw.mode": mode, "jas.alpha": 1.0})
    anomalyclip = tiny("anomalyclip", pretrained=weights)
    assert torch.equal(headclip.text_features(), anomalyclip.text_features())
    ours, theirs = predict(headclip, x), predict(anomalyclip, x)
    assert torch.equal(ours.image_scores, theirs.image_scores)
    assert torch.equal(ours.anomaly_maps, theirs.anomaly_maps)
    # the default joint score (alpha 0.5) is not the global probability
    assert not torch.allclose(predict(tiny(pretrained=weights), x).image_scores, theirs.image_scores, atol=1e-4)


def test_static_head_weights_equal_scaled_out_projection_columns(weights: str) -> None:
    headclip = tiny(pretrained=weights, **{"jas.alpha": 1.0})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        headclip.head_weights.weight.copy_(0.5 + torch.rand(headclip.head_weights.weight.shape, generator=generator))
        headclip.head_weights.weight[[3, 10, 20], [0, 2, 1]] = 0.0  # switched-off heads
    folded = tiny("anomalyclip", pretrained=weights)
    fold_into_out_projection(folded, {layer: headclip.head_weights.weight[layer - 1] for layer in range(1, 25)})
    x = images(3)
    ours, theirs = predict(headclip, x), predict(folded, x)
    assert (ours.image_scores - theirs.image_scores).abs().max() < 1e-5
    assert (ours.anomaly_maps - theirs.anomaly_maps).abs().max() < 1e-5
    unweighted = predict(tiny("anomalyclip", pretrained=weights), x)
    assert (ours.anomaly_maps - unweighted.anomaly_maps).abs().max() > 1e-3  # the weights matter


def test_conditioned_head_weights_fold_per_image(weights: str) -> None:
    headclip = tiny(pretrained=weights, **{"lhw.mode": "conditioned", "lhw.layers": "last_4", "jas.alpha": 1.0})
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for linear in headclip.head_weights.generators:
            linear.weight.copy_(0.3 * torch.randn(linear.weight.shape, generator=generator))
            linear.bias.copy_(0.3 * torch.randn(linear.bias.shape, generator=generator))
    x = images(1)
    seen: dict[int, torch.Tensor] = {}

    def recording(layer: int, u: torch.Tensor) -> torch.Tensor | None:
        w = headclip.head_weights(layer, u)
        if w is not None:
            assert w.shape == (1, 4)
            seen[layer] = w[0].detach()
        return w

    with torch.no_grad():
        global_features, _ = headclip.encode_images(x, recording)
    assert sorted(seen) == [21, 22, 23, 24]
    folded = tiny("anomalyclip", pretrained=weights)
    fold_into_out_projection(folded, seen)
    ours, theirs = predict(headclip, x), predict(folded, x)
    assert (ours.anomaly_maps - theirs.anomaly_maps).abs().max() < 1e-5
    assert (ours.image_scores - theirs.image_scores).abs().max() < 1e-5
    # per-image weights: a second image gets other weights
    with torch.no_grad():
        other = headclip.head_weights(24, torch.randn(2, 5, 64, generator=generator))
    assert other.shape == (2, 4) and not torch.allclose(other[0], other[1])


def test_head_weight_gradients_pass_gradcheck() -> None:
    """float64 gradcheck of the static weights and of a generator through the frozen tiny tower."""
    visual = tiny(image_size=28).clip.visual.double()
    x = torch.randn(1, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    static = HeadWeights((2, 7, 24), num_heads=4, width=64).double()
    conditioned = HeadWeights((12,), num_heads=4, width=64, mode="conditioned").double()

    def features(head_weights) -> torch.Tensor:
        out = forward_dual_path(visual, x, vv_taps=(24,), head_weights=head_weights)
        return torch.cat([out.global_feature.flatten(), out.patch_features(visual, [24])[0].flatten()])

    def through_static(w: torch.Tensor) -> torch.Tensor:
        return features(lambda layer, u: w[(2, 7, 24).index(layer)] if layer in (2, 7, 24) else None)

    w = (0.5 + torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))).requires_grad_()
    assert torch.autograd.gradcheck(through_static, (w,), atol=1e-6)

    def through_generator(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return features(lambda layer, u: 1 + u[:, 0] @ weight.T + bias if layer == 12 else None)

    weight = (0.1 * torch.randn(4, 64, dtype=torch.float64)).requires_grad_()
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(through_generator, (weight, bias), atol=1e-6)
    # the module computes the same weights as the closed form above
    u = torch.randn(2, 5, 64, dtype=torch.float64)
    assert torch.equal(conditioned(12, u), torch.ones(2, 4, dtype=torch.float64))
    assert static(5, u) is None and torch.equal(static(7, u), torch.ones(4, dtype=torch.float64))


# ---- joint anomaly score --------------------------------------------------------------------------------------------

def test_joint_anomaly_score() -> None:
    p = torch.tensor([0.2, 0.9])
    maps = torch.rand(2, 10, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(joint_anomaly_score(p, maps, alpha=1.0), p)
    assert torch.equal(joint_anomaly_score(p, maps, alpha=0.0), maps.flatten(1).amax(1))
    one_pixel = joint_anomaly_score(p, maps, alpha=0.0, aggregate="topk_mean", topk_percent=1.0)  # ceil(1) = 1 pixel
    assert torch.equal(one_pixel, maps.flatten(1).amax(1))
    top3 = maps.flatten(1).sort(dim=1, descending=True).values[:, :3].mean(1)  # ceil(2.5 % of 100) = 3 pixels
    mixed = joint_anomaly_score(p, maps, alpha=0.25, aggregate="topk_mean", topk_percent=2.5)
    assert torch.allclose(mixed, 0.25 * p + 0.75 * top3, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="jas.aggregate"):
        joint_anomaly_score(p, maps, 0.5, aggregate="median")


def test_predict_uses_the_joint_score(weights: str) -> None:
    x = images(2)
    detector = tiny(pretrained=weights, **{"jas.aggregate": "topk_mean", "jas.topk_percent": 5.0})
    ours = predict(detector, x)
    base = predict(tiny("anomalyclip", pretrained=weights), x)  # identity head weights: same maps, p_global
    assert torch.equal(ours.anomaly_maps, base.anomaly_maps)
    k = math.ceil(0.05 * 56 * 56)
    top = base.anomaly_maps.flatten(1).topk(k, dim=1).values.mean(1)
    assert torch.allclose(ours.image_scores, 0.5 * base.image_scores + 0.5 * top, atol=1e-7, rtol=0)


# ---- configuration ---------------------------------------------------------------------------------------------------

def test_layer_selection_and_config_errors() -> None:
    assert select_layers("all", 24, 6) == tuple(range(1, 25))
    assert select_layers("dpam", 24, 6) == tuple(range(6, 25))
    assert select_layers("last_3", 24, 6) == (22, 23, 24)
    assert select_layers("12, 6,12", 24, 6) == (6, 12)
    for bad in ("0", "25", "last_0", "first_3", ""):
        with pytest.raises(ValueError, match="lhw.layers"):
            select_layers(bad, 24, 6)
    assert tiny(**{"lhw.layers": "dpam"}).head_weights.weight.shape == (19, 4)
    assert sum(p.numel() for p in tiny(**{"lhw.mode": "conditioned"}).head_weights.parameters()) == 24 * (64 * 4 + 4)
    assert tiny(**{"lhw.enabled": False}).head_weights(24, torch.zeros(1, 5, 64)) is None
    with pytest.raises(ConfigError, match="lhw.mode"):
        tiny(**{"lhw.mode": "softmax"})
    with pytest.raises(ValueError, match="jas.alpha"):
        tiny(**{"jas.alpha": 1.5})
    assert HeadCLIP.display_name() == "HeadCLIP (reconstruction)"


# ---- training, checkpoints -------------------------------------------------------------------------------------------

def test_training_moves_the_head_weights_and_segments_held_out_categories(tmp_path: Path) -> None:
    """Prompts and head weights trained on carpet and tile segment held-out bottle and skin better than untrained
    ones (tests/learning_signal.py); with ``lr=0`` it fails."""
    detector = tiny(pretrained=appearance_weights(tmp_path), image_size=112)
    assert_learned(*train_and_evaluate(detector, epochs=4))
    moved = (detector.head_weights.weight - 1).abs()
    assert moved.max() > 1e-3 and (moved > 1e-4).float().mean() > 0.5  # most head weights learned something


def test_checkpoint_round_trip_and_layouts(tmp_path: Path) -> None:
    aux = zsadbench.load_dataset("synthetic", image_size=48, n_train=0, n_test_normal=2, n_test_anomalous=2,
                                 categories="carpet")
    trained = tiny(**{"lhw.mode": "conditioned"})
    result = trained.fit(aux, epochs=1, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    assert any(k.startswith("head_weights.generators.23.") for k in trained.state_dict())
    x = images(2)
    loaded = tiny(checkpoint=str(result.last_checkpoint), **{"lhw.mode": "conditioned"})
    for before, after in zip(predict(trained, x), predict(loaded, x)):
        assert torch.equal(before, after)
    assert not torch.equal(predict(tiny(**{"lhw.mode": "conditioned"}), x).anomaly_maps,
                           predict(loaded, x).anomaly_maps)
    # a static-weights detector names the keys the conditioned checkpoint has and it lacks
    with pytest.raises(CheckpointError, match="missing keys: head_weights.weight") as info:
        tiny(checkpoint=str(result.last_checkpoint))
    assert "unexpected keys: head_weights.generators.0.bias" in str(info.value)

    # the spec's layout {"prompt_learner": <AnomalyCLIP reference keys>, "head_weights": {...}}
    source = tiny()
    with torch.no_grad():
        source.head_weights.weight.mul_(torch.linspace(0.5, 1.5, 96).reshape(24, 4))
    spec_file = tmp_path / "headclip.pth"
    torch.save({"prompt_learner": source.prompt_learner.reference_state_dict(),
                "head_weights": source.head_weights.state_dict()}, spec_file)
    assert torch.equal(predict(tiny(checkpoint=str(spec_file)), x).anomaly_maps, predict(source, x).anomaly_maps)
    # AnomalyCLIP's released layout: the prompts load, the head weights stay at 1
    anomalyclip_file = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": source.prompt_learner.reference_state_dict()}, anomalyclip_file)
    plain = tiny(checkpoint=str(anomalyclip_file))
    assert torch.equal(plain.head_weights.weight, torch.ones(24, 4))
    assert torch.equal(plain.text_features(), source.text_features())
    torch.save({"prompt_learner": source.prompt_learner.reference_state_dict(),
                "head_weights": {"weight": torch.ones(19, 4)}}, spec_file)
    with pytest.raises(CheckpointError, match=r"wrong shapes: weight: \(19, 4\) != \(24, 4\)"):
        tiny(checkpoint=str(spec_file))


def test_train_then_run_records_the_reconstruction(isolated_results: Path, mlflow_store: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--dataset", "synthetic", "--dataset-option", "image_size=48", "--dataset-option", "n_train=1",
            "--dataset-option", "n_test_normal=2", "--dataset-option", "n_test_anomalous=2"]
    options = ["--set", f"model={MODEL}", "--pretrained", "random", "--set", "image_size=56"]
    assert main(["train", "--method", "headclip", *data, "--categories", "carpet", *options, "--epochs", "1",
                 "--batch-size", "4"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{isolated_results / 'mlflow.db'}")
    training = mlflow.search_runs(experiment_names=["zsadbench"]).iloc[0]
    checkpoint = Path(training["tags.zsadbench.checkpoint"])
    assert training["params.config.lhw.mode"] == "static" and training["params.detector.trainable_parameters"] == "1888"
    assert main(["run", "--method", "headclip", "--checkpoint", str(checkpoint), *data, "--categories", "bottle",
                 *options, "--set", "jas.aggregate=topk_mean"]) == 0
    assert "HeadCLIP (reconstruction)" in capsys.readouterr().out
    runs = mlflow.search_runs(experiment_names=["zsadbench"])
    run = runs[runs["tags.zsadbench.kind"] == "evaluation"].iloc[0]
    assert run["params.method_label"] == "HeadCLIP (reconstruction)"
    assert run["params.config.jas.alpha"] == "0.5" and run["params.config.jas.aggregate"] == "topk_mean"
    assert run["params.mad_recipe.image"] == "mean(image_auroc, image_ap, image_f1max)"
    assert run["params.mad_recipe.pixel"] == "mean(pixel_auroc, pixel_ap, pixel_f1max, pixel_aupro)"
    assert run["params.metric.pixel_aupro"] == "aupro.exact@0.3"
    parts = [run[f"metrics.{m}"] for m in ("image_auroc", "image_ap", "image_f1max")]
    assert run["metrics.mad_image"] == pytest.approx(sum(parts) / 3)
