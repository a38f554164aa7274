"""AdaptCLIP on the tiny ViT-L-14-336 config: adapters, zero-shot and k-shot fusion, training, checkpoints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from learning_signal import appearance_weights, assert_learned, train_and_evaluate
from scipy import ndimage
from zsadbench.methods.adaptclip import AdaptCLIP, harmonic_mean

import zsadbench
from zsadbench.checkpoints import CheckpointError
from zsadbench.cli import main
from zsadbench.clip.dual_path import forward_dual_path
from zsadbench.clip.testing import clip_like_state_dict, save_state_dict
from zsadbench.clip.text import compositional_prompts, encode_text, tokenize
from zsadbench.evaluation import evaluate

pytestmark = pytest.mark.filterwarnings("ignore:adaptclip. no checkpoint")

MODEL = "tiny-ViT-L-14-336-quickgelu"
TINY = {"model": MODEL, "pretrained": "random", "image_size": 56}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny clip-like weights file (non-trivial LayerNorms and biases, sharp attention)."""
    return str(save_state_dict(clip_like_state_dict(MODEL, seed=0), tmp_path_factory.mktemp("w") / "tiny.pt"))


def tiny(**overrides: object) -> AdaptCLIP:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = zsadbench.load_method("adaptclip", **{**TINY, **overrides})
    if "checkpoint" not in overrides:  # a loaded checkpoint brings its own statistics
        perturb_batchnorms(detector)
    return detector  # type: ignore[return-value]


def perturb_batchnorms(detector: AdaptCLIP) -> None:
    """Non-trivial BatchNorm statistics and affines, so that a BN used in the wrong place changes the numbers."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in detector.learnable_modules().values():
            for norm in (m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
                norm.running_mean.normal_(0, 0.02, generator=generator)
                norm.running_var.uniform_(0.5, 2.0, generator=generator)
                norm.weight.uniform_(0.6, 1.4, generator=generator)
                norm.bias.normal_(0, 0.1, generator=generator)


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def gaussian(maps: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.stack([ndimage.gaussian_filter(m, sigma=4) for m in maps.numpy()]))


def written_out_branches(detector: AdaptCLIP, x: torch.Tensor):
    """The visual (VA) and textual (TA) branch probabilities, written out independently of the detector's helpers."""
    clip, visual = detector.clip, detector.clip.visual
    out = forward_dual_path(visual, x, vv_taps=(6, 12, 18, 24))
    p24 = visual.ln_post(out.vv_taps[24]) @ visual.proj
    normal, abnormal = compositional_prompts("object")
    static = torch.stack([encode_text(clip, tokenize(MODEL, s)).mean(0) for s in (normal, abnormal)])
    assert len(normal) == 147 and len(abnormal) == 84
    learned = detector.textual_adapter(clip)

    def mlp(module, rows):
        return rows + module.fc(rows)

    def branch(g, p, text):
        t = F.normalize(text, dim=-1)
        score = ((F.normalize(g, dim=-1) @ t.T) / 0.07).softmax(-1)[:, 1]
        s = ((F.normalize(p, dim=-1)[:, 1:] @ t.T) / 0.07).softmax(-1)
        side = int(s.shape[1] ** 0.5)
        s = F.interpolate(s.reshape(len(x), side, side, 2).permute(0, 3, 1, 2), size=(56, 56), mode="bilinear")
        return score, s[:, 1]

    adapted_p = mlp(detector.visual_adapter.local_mlp, p24.reshape(-1, p24.shape[-1])).reshape(p24.shape)
    va = branch(mlp(detector.visual_adapter.global_mlp, out.global_feature), adapted_p, static)
    ta = branch(out.global_feature, p24, learned)
    return va, ta, [visual.ln_post(out.vv_taps[layer]) @ visual.proj for layer in (6, 12, 18, 24)]


# ---- zero-shot -------------------------------------------------------------------------------------------------------

def test_zero_shot_is_the_reference_fusion(weights: str) -> None:
    detector = tiny(pretrained=weights)
    x = images(3)
    prediction = detector.predict(x, "carpet")
    with torch.no_grad():
        (s_va, m_va), (s_ta, m_ta), _ = written_out_branches(detector, x)
    maps = gaussian((m_va + m_ta) / 2)
    scores = (s_va + s_ta + maps.flatten(1).amax(1)) / 3
    assert prediction.anomaly_maps.shape == (3, 56, 56)
    assert (prediction.anomaly_maps - maps).abs().max() < 1e-6 and prediction.anomaly_maps.std() > 1e-3
    assert (prediction.image_scores - scores).abs().max() < 1e-6
    assert detector.predict(x, "other").image_scores.equal(prediction.image_scores)  # the category is not used


def test_adapter_sizes_and_shared_heads() -> None:
    detector = tiny()
    assert sum(p.numel() for p in detector.textual_adapter.parameters()) == 2 * 12 * 32
    assert sum(p.numel() for p in detector.visual_adapter.parameters()) == 2 * (2 * 32 * 8 + 2 * 8)
    # one fusion BatchNorm per layer, one local and one global head for all four layers
    assert len(detector.pq_adapter.fusion_norms) == 4
    assert detector.textual_adapter.token_ids.argmax(-1).tolist() == [14, 14]  # 12 "X" + "." then EOT
    # the VA's local BatchNorm normalises every token, the CLS row included (training statistics)
    detector.set_train_mode(True)
    tokens = torch.randn(2, 17, 32)
    norm = detector.visual_adapter.local_mlp.fc[1]
    before = norm.running_mean.clone()
    detector.visual_adapter.local_mlp(tokens)
    hidden = detector.visual_adapter.local_mlp.fc[0](tokens.reshape(-1, 32))
    assert torch.allclose(norm.running_mean, 0.9 * before + 0.1 * hidden.mean(0), atol=1e-6)


# ---- few-shot --------------------------------------------------------------------------------------------------------

def test_few_shot_is_the_reference_fusion(weights: str) -> None:
    detector = tiny(pretrained=weights, shots=2)
    x, prompts = images(2), images(2, seed=5)
    with pytest.raises(RuntimeError, match="no prompt images"):
        detector.predict(x, "carpet")
    detector.set_reference(prompts, "carpet")
    prediction = detector.predict(x, "carpet")
    with torch.no_grad():
        (s_va, m_va), (s_ta, m_ta), queries = written_out_branches(detector, x)
        *_, prompt_tokens = written_out_branches(detector, prompts)
        pq_maps, pq_scores, alignments = [], [], []
        for layer, (q, r) in enumerate(zip(queries, prompt_tokens)):
            q = F.normalize(q, dim=-1)[:, 1:]  # (B, P, E)
            r = F.normalize(r, dim=-1)[:, 1:].reshape(-1, q.shape[-1])  # both prompts' patches pooled
            distance = 1 - q @ r.T
            d, nearest = distance.min(-1)
            fused = q + (q - r[nearest]).abs()
            grid = fused.transpose(1, 2).reshape(2, -1, 4, 4)
            grid = detector.pq_adapter.fusion_norms[layer](grid)
            local = detector.pq_adapter.local_head(grid).softmax(1)
            assert local.shape[-1] == 16  # two 2x transposed convolutions: 4x the patch grid
            pq_maps.append(F.interpolate(local, size=(56, 56), mode="bilinear")[:, 1])
            flat = grid.flatten(2)
            pooled = (flat.mean(-1) + flat.topk(10, dim=-1).values.mean(-1)) / 2
            pq_scores.append(detector.pq_adapter.global_head(pooled).softmax(-1)[:, 1])
            alignments.append(F.interpolate(d.reshape(2, 1, 4, 4), size=(56, 56), mode="bilinear")[:, 0])
    alignment = 4 / sum(1 / a for a in alignments)
    m = (m_va + m_ta + torch.stack(pq_maps).mean(0)) / 3
    maps = gaussian(2 / (1 / m + 1 / alignment))
    mean_score = (s_va + s_ta + torch.stack(pq_scores).mean(0)) / 3
    scores = 2 / (1 / mean_score + 1 / maps.flatten(1).amax(1))
    assert (prediction.anomaly_maps - maps).abs().max() < 1e-6 and prediction.anomaly_maps.std() > 1e-3
    assert (prediction.image_scores - scores).abs().max() < 1e-6
    # a query identical to a prompt image has zero alignment distance: the harmonic mean makes its map 0
    same = detector.predict(prompts[:1], "carpet")
    assert same.anomaly_maps.max() < 0.5 * prediction.anomaly_maps.max()


def test_harmonic_mean_and_nan_cleanup(weights: str) -> None:
    a, b = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 2.0, 4.0])
    assert torch.allclose(harmonic_mean(a, b), torch.tensor([1.5, 2.0, 0.0]))
    detector = tiny(pretrained=weights, shots=1)
    detector.set_reference(images(1), "c")
    # an exact match everywhere: alignment 0 -> harmonic mean 0 or NaN; the prediction holds no NaN
    prediction = detector.predict(images(1), "c")
    assert torch.isfinite(prediction.anomaly_maps).all() and torch.isfinite(prediction.image_scores).all()


def test_evaluator_draws_and_records_the_prompt_images(tmp_path: Path) -> None:
    dataset = zsadbench.load_dataset("synthetic", image_size=48, n_train=5, n_test_normal=2, n_test_anomalous=2,
                                     categories="carpet,bottle")
    detector = tiny(shots=2, reference_seed=20)
    result = evaluate(detector, dataset, progress=False)
    for category in ("carpet", "bottle"):
        normals = [s for s in dataset.split(category, "train") if s.label == 0]
        expected = torch.randint(len(normals), (2,), generator=torch.Generator().manual_seed(20)).tolist()
        assert result.categories[category].references == [str(normals[i].image_path) for i in expected]
        assert detector.references[category][0].shape == (2, 17, 32)


# ---- training --------------------------------------------------------------------------------------------------------

def test_training_learns_to_segment_held_out_categories(tmp_path: Path) -> None:
    """Adapters co-trained on carpet and tile segment held-out bottle and skin better than untrained ones
    (tests/learning_signal.py). With ``lr=0`` it fails."""
    detector = zsadbench.load_method("adaptclip", **{**TINY, "pretrained": appearance_weights(tmp_path),
                                                     "image_size": 112})
    before, after, result = train_and_evaluate(detector, epochs=6, n_train=2)
    assert_learned(before, after, result)
    assert {"va_image", "va_local", "ta_image", "ta_local", "pq_image", "pq_local"} <= set(result.epoch_losses[0])


def test_training_pairs_each_query_with_a_normal_train_image(tmp_path: Path) -> None:
    aux = zsadbench.load_dataset("synthetic", image_size=48, n_train=3, n_test_normal=2, n_test_anomalous=3,
                                 categories="carpet,bottle")
    detector = tiny()
    drawn: list[str] = []
    original = detector.training_prompt_images

    def recording(samples):
        out = original(samples)
        drawn.extend(s.category for s in samples)
        return out

    detector.training_prompt_images = recording  # type: ignore[method-assign]
    result = detector.fit(aux, epochs=1, batch_size=9, progress=False)  # batches of 9 and 1 (BatchNorm1d of one)
    assert result.steps == 2 and sorted(drawn) == sorted(s.category for s in aux.samples if s.split == "test")
    assert all(p.category == c and p.split == "train" and p.label == 0
               for c, normals in detector.training_prompts.items() for p in normals)
    no_train = zsadbench.load_dataset("synthetic", image_size=48, n_train=0, n_test_normal=1, n_test_anomalous=1,
                                      categories="carpet")
    with pytest.raises(ValueError, match="categories 'carpet' of 'synthetic' have no normal 'train' images"):
        tiny().fit(no_train, epochs=1, progress=False)


def test_resumed_training_draws_the_same_prompts_and_ends_equal(tmp_path: Path) -> None:
    """The prompt draws use Python's RNG, whose state the loop checkpoints: a resumed training ends bit-identical."""
    aux = zsadbench.load_dataset("synthetic", image_size=48, n_train=3, n_test_normal=2, n_test_anomalous=2,
                                 categories="carpet,bottle")
    straight = tiny()
    straight.fit(aux, epochs=2, batch_size=3, checkpoint_dir=tmp_path / "a", progress=False)

    def stop(step: int, losses: dict[str, float]) -> None:
        if step == 4:  # in the middle of epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny().fit(aux, epochs=2, batch_size=3, checkpoint_dir=tmp_path / "b", progress=False, on_step=stop)
    resumed = tiny()
    resumed.fit(aux, epochs=2, batch_size=3, checkpoint_dir=tmp_path / "b", resume_from=tmp_path / "b" / "epoch_1.pth",
                progress=False)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_checkpoint_round_trip_and_the_authors_layout(tmp_path: Path) -> None:
    aux = zsadbench.load_dataset("synthetic", image_size=48, n_train=1, n_test_normal=2, n_test_anomalous=2,
                                 categories="carpet")
    trained = tiny(shots=1)
    result = trained.fit(aux, epochs=1, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    x, prompt = images(2), images(1, seed=3)
    loaded = tiny(shots=1, checkpoint=str(result.last_checkpoint))
    for detector in (trained, loaded):
        detector.set_reference(prompt, "c")
    for a, b in zip(trained.predict(x, "c"), loaded.predict(x, "c")):
        assert torch.equal(a, b)
    assert loaded.describe()["adapters"].startswith("sha256:")

    # the released layout: {"textual_learner", "visual_learner", "pq_learner"}, PQ heads aliased per layer
    state = trained.reference_state_dict()
    assert set(state["visual_learner"]) == {f"{m}.fc.{i}.{p}" for m in ("global_adapter", "local_adater")
                                            for i, ps in ((0, ["weight"]), (3, ["weight"]),
                                                          (1, ["weight", "bias", "running_mean", "running_var",
                                                               "num_batches_tracked"])) for p in ps}
    assert {k.split(".")[0] for k in state["pq_learner"]} == {"sharebn", "local_adapter", "global_adapter"}
    assert {k.split(".")[2] for k in state["pq_learner"] if k.startswith("local_adapter.")} == set("0134578")
    assert {k.split(".")[2] for k in state["pq_learner"] if k.startswith("global_adapter.")} == set("01346")
    assert state["textual_learner"]["ctx_pos"].shape == (1, 1, 12, 32)
    official = tmp_path / "epoch_15.pth"
    torch.save(state, official)
    from_official = tiny(shots=1, checkpoint=str(official))
    from_official.set_reference(prompt, "c")
    for a, b in zip(trained.predict(x, "c"), from_official.predict(x, "c")):
        assert torch.equal(a, b)

    broken = {part: dict(values) for part, values in state.items()}
    broken["pq_learner"]["local_adapter.2.0.weight"] = broken["pq_learner"]["local_adapter.2.0.weight"] + 1
    torch.save(broken, tmp_path / "unshared.pth")
    with pytest.raises(CheckpointError, match="local_adapter.2.0.weight differs"):
        tiny(checkpoint=str(tmp_path / "unshared.pth"))
    del broken["visual_learner"]["local_adater.fc.0.weight"]
    broken["visual_learner"]["local_adapter.fc.0.weight"] = torch.zeros(8, 32)
    torch.save(broken, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match="missing keys: local_adater.fc.0.weight") as info:
        tiny(checkpoint=str(tmp_path / "renamed.pth"))
    assert "unexpected keys: local_adapter.fc.0.weight" in str(info.value) and "renamed.pth" in str(info.value)
    with pytest.raises(CheckpointError, match="wrong shapes: .*pq_adapter"):
        tiny(pq_hidden=64, checkpoint=str(result.last_checkpoint))


def test_train_then_run_zero_and_one_shot(isolated_results: Path, mlflow_store: Path) -> None:
    data = ["--dataset", "synthetic", "--dataset-option", "image_size=48", "--dataset-option", "n_train=2",
            "--dataset-option", "n_test_normal=2", "--dataset-option", "n_test_anomalous=2"]
    options = ["--set", f"model={MODEL}", "--pretrained", "random", "--set", "image_size=56"]
    assert main(["train", "--method", "adaptclip", *data, "--categories", "carpet", *options, "--epochs", "1"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{isolated_results / 'mlflow.db'}")
    training = mlflow.search_runs(experiment_names=["zsadbench"]).iloc[0]
    assert training["params.config.train.seed"] == "10"
    checkpoint = training["tags.zsadbench.checkpoint"]
    for shots in ("0", "1"):
        assert main(["run", "--method", "adaptclip", "--checkpoint", checkpoint, "--shots", shots, *data,
                     "--categories", "bottle", *options]) == 0
    runs = mlflow.search_runs(experiment_names=["zsadbench"])
    runs = runs[runs["tags.zsadbench.kind"] == "evaluation"].sort_values("params.config.shots")
    assert runs["params.config.shots"].tolist() == ["0", "1"]
    one_shot = runs.iloc[1]
    stored = json.loads((isolated_results / "runs" / one_shot.run_id / "categories" / "bottle.json").read_text())
    assert len(stored["references"]) == 1 and "/train/good/" in stored["references"][0]
    assert one_shot["params.detector.adapters"].startswith("sha256:")
