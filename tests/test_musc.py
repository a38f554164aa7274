"""MuSc: LNAMD, fast mutual scoring against a per-image cdist version, RsCIN, divisions, the transductive detector."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from zsadbench.methods.musc import MuSc, aggregate_neighbourhood, divide, layer_norm_grid, rscin, rscin_windows

from zsadbench.detector import ImageSet
from zsadbench.mutual_scoring import SetTooSmallError, interval_bounds, mutual_scoring
from zsadbench.types import Sample

TINY = {"model": "tiny-ViT-L-14-336", "pretrained": "random", "image_size": 56}  # real depth (24), width 64, 4x4


def unit_features(n: int, patches: int, dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, patches, dim, generator=generator)
    return z / z.norm(dim=-1, keepdim=True)


def msm_per_image_cdist(z: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The straightforward MSM: per image one cdist against all other images' patches, then the interval mean."""
    n, patches, dim = z.shape
    out = torch.empty(n, patches, dtype=torch.float64)
    for i in range(n):
        others = torch.cat([z[:i], z[i + 1:]]).reshape(-1, dim)
        per_image = torch.cdist(z[i], others).view(patches, n - 1, patches).amin(dim=2)
        ranked = per_image.sort(dim=1).values
        out[i] = ranked[:, lo:hi].mean(dim=1).double()
    return out


# ------------------------------------------------------------------------------------------------ LNAMD


def test_layer_norm_is_one_normalisation_per_image_over_the_whole_grid():
    tokens = torch.randn(3, 16, 8) * 3 + 1
    normed = layer_norm_grid(tokens, (4, 4))
    grid = tokens.transpose(1, 2).reshape(3, 8, 4, 4)
    expected = torch.nn.LayerNorm([8, 4, 4])(grid)
    assert normed.shape == (3, 8, 4, 4)
    assert torch.allclose(normed, expected, atol=1e-6)
    per_token = F.layer_norm(tokens, (8,)).transpose(1, 2).reshape(3, 8, 4, 4)
    assert not torch.allclose(normed, per_token, atol=1e-2)
    with pytest.raises(ValueError, match="4x5 grid"):
        layer_norm_grid(tokens, (4, 5))


@pytest.mark.parametrize("r", [1, 3, 5])
def test_neighbourhood_aggregation_is_the_zero_padded_window_mean(r):
    normed = torch.randn(2, 6, 5, 5)
    out = aggregate_neighbourhood(normed, r)
    windows = F.unfold(normed, r, padding=(r - 1) // 2).view(2, 6, r * r, 25)
    expected = windows.sum(dim=2).transpose(1, 2) / (r * r)  # border zeros count in the denominator
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert out.shape == (2, 25, 6)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 25), atol=1e-6)


def test_neighbourhood_aggregation_rejects_even_degrees():
    with pytest.raises(ValueError, match="odd"):
        aggregate_neighbourhood(torch.randn(1, 2, 3, 3), 2)


# ------------------------------------------------------------------------------------------ interval


def test_interval_bounds_follow_the_reference_floor_and_reject_small_sets():
    for others in range(1, 40):
        expected = int(others * 0.3)  # the reference: int(patch2image.shape[1] * 0.3)
        if expected == 0:
            with pytest.raises(SetTooSmallError, match="at least 5 images"):
                interval_bounds(others)
        else:
            assert interval_bounds(others) == (0, expected)
    assert interval_bounds(20, 0.1, 0.5) == (2, 10)
    assert interval_bounds(20, 0.5, 0.1) == (2, 10)  # swapped as in the reference
    assert interval_bounds(20, 2, 7) == (2, 7)  # counts from 1 on
    with pytest.raises(SetTooSmallError, match="beyond the set"):
        interval_bounds(5, 0, 9)


def test_interval_bounds_ceil_keeps_one_image_of_small_sets_and_is_exact_on_integers():
    assert interval_bounds(1, rounding="ceil") == (0, 1)
    assert interval_bounds(3, rounding="ceil") == (0, 1)
    assert interval_bounds(10, rounding="ceil") == (0, 3)  # 0.3 * 10 = 3.0000000000000004 in floating point
    assert interval_bounds(11, rounding="ceil") == (0, 4)
    with pytest.raises(ValueError, match="floor"):
        interval_bounds(10, rounding="round")


# ------------------------------------------------------------------------------------------------- MSM


@pytest.mark.parametrize("n, interval", [(5, (0.0, 0.3)), (9, (0.0, 0.3)), (11, (0.1, 0.6)), (7, (1, 4))])
@pytest.mark.parametrize("memory_mb", [64.0, 0.003, 0.0])
def test_fast_mutual_scoring_equals_per_image_cdist(n, interval, memory_mb):
    z = unit_features(n, 36, 24, seed=n)
    lo, hi = interval_bounds(n - 1, *interval)
    expected = msm_per_image_cdist(z, lo, hi)
    got = mutual_scoring(z, topmin_min=interval[0], topmin_max=interval[1], memory_mb=memory_mb)
    assert got.dtype == torch.float64 and got.shape == (n, 36)
    assert (got - expected).abs().max() < 1e-5


def test_mutual_scoring_budget_switches_to_bands(caplog):
    z = unit_features(8, 25, 16)
    with caplog.at_level(logging.INFO, logger="zsadbench.mutual_scoring"):
        banded = mutual_scoring(z, memory_mb=0.005)  # 8 rows of 8*25 floats + a 25x25 product do not fit
    assert "bands of 3 rows" in caplog.text
    assert torch.allclose(banded, mutual_scoring(z), atol=1e-6)


def test_mutual_scoring_finds_the_odd_patch():
    z = unit_features(6, 16, 32, seed=3)
    z[:, :, :] = z[0]  # six identical images ...
    z[2, 5] = -z[2, 5]  # ... except one patch of image 2
    scores = mutual_scoring(z)
    assert scores[2, 5] > 1.0
    others = scores.clone()
    others[2, 5] = 0
    assert others.max() < 0.05  # exact duplicates: distance ~0 up to the matmul formula's rounding


def test_bf16_mutual_scoring_is_close_but_not_exact():
    z = unit_features(6, 49, 64, seed=1)
    exact = mutual_scoring(z)
    fast = mutual_scoring(z, precision="bf16")
    difference = (fast - exact).abs().max()
    assert 0 < difference < 2e-2


def test_mutual_scoring_is_euclidean_for_any_features():
    z = torch.randn(6, 9, 8, generator=torch.Generator().manual_seed(5)) * 3 + 1  # not unit-norm
    assert (mutual_scoring(z) - msm_per_image_cdist(z, 0, 1)).abs().max() < 1e-5


def test_mutual_scoring_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, P, D\)"):
        mutual_scoring(torch.randn(6, 8))
    with pytest.raises(SetTooSmallError, match="at least 5 images"):
        mutual_scoring(unit_features(4, 4, 8))
    assert torch.isfinite(mutual_scoring(unit_features(3, 4, 8), rounding="ceil")).all()


# ----------------------------------------------------------------------------------------------- RsCIN


def rscin_loop(scores: torch.Tensor, embeddings: torch.Tensor, windows) -> torch.Tensor:
    """RsCIN written out row by row: zero the N - k least similar images, weighted mean of the others."""
    s = (scores - scores.min()) / (scores.max() - scores.min())
    w = embeddings.float() @ embeddings.float().T
    n = len(s)
    out = torch.zeros(n, dtype=torch.float64)
    for k in windows:
        for i in range(n):
            keep = w[i].argsort(descending=True)[:k]
            out[i] += float((w[i, keep] * s[keep].float()).sum() / w[i, keep].sum())
    return out / len(windows)


def test_rscin_equals_the_row_by_row_definition():
    generator = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(12, 16, generator=generator), dim=-1)
    scores = torch.rand(12, generator=generator, dtype=torch.float64)
    for windows in ([1, 2, 3], [1, 8, 9]):
        assert torch.allclose(rscin(scores, embeddings, windows), rscin_loop(scores, embeddings, windows), atol=1e-6)
    one = rscin(scores, embeddings, [1])  # k = 1 keeps only the image itself: the min-max scores
    assert torch.allclose(one, (scores - scores.min()) / (scores.max() - scores.min()), atol=1e-6)


def test_rscin_switches_and_edge_cases():
    embeddings = F.normalize(torch.randn(4, 8), dim=-1)
    scores = torch.tensor([0.1, 0.5, 0.2, 0.9], dtype=torch.float64)
    assert torch.equal(rscin(scores, embeddings, [0]), scores)  # the reference's "off" switch
    assert torch.allclose(rscin(scores, embeddings, [9]), rscin(scores, embeddings, [4]))  # window capped at N
    assert torch.equal(rscin(torch.full((4,), 0.3, dtype=torch.float64), embeddings, [1, 2]), torch.zeros(4,
                       dtype=torch.float64))
    assert rscin_windows("visa") == (1, 8, 9) and rscin_windows("mvtec") == rscin_windows("synthetic") == (1, 2, 3)


# --------------------------------------------------------------------------------------------- divisions


def test_divisions_are_disjoint_stratified_and_follow_the_reference_shuffle():
    groups = ["broken"] * 5 + ["good"] * 7 + ["scratch"] * 3
    subsets = divide(groups, 3, seed=42)
    assert sorted(i for s in subsets for i in s) == list(range(15))
    for subset in subsets:
        assert [groups[i] for i in subset].count("good") in (2, 3)
    assert divide(groups, 3, seed=42) == subsets
    assert divide(groups, 3, seed=7) != subsets
    assert divide(groups, 1) == [list(range(15))]
    # the reference (datasets/mvtec.py sub_datasets, seed 42) on the same group layout
    assert subsets == [[3, 4, 9, 5, 6, 12], [1, 0, 8, 10, 13], [2, 7, 11, 14]]


# ---------------------------------------------------------------------------------------------- detector


@pytest.fixture(scope="module")
def tiny_musc():
    return MuSc(**TINY, seed=0)


def image_set(n: int, seed: int = 0, defect_types=None, dataset: str = "synthetic") -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    texture = torch.randn(1, 3, 56, 56, generator=generator)
    images = texture + 0.05 * torch.randn(n, 3, 56, 56, generator=generator)  # one surface, slight noise
    images[-1, :, 14:28, 28:42] += 3  # one anomaly, in the last image only
    types = defect_types or ["good"] * (n // 2) + ["blob"] * (n - n // 2)
    samples = [Sample(Path(f"img{i}.png"), "cat", int(t != "good"), None, t, dataset) for i, t in enumerate(types)]
    return ImageSet(samples, None, batch_size=3, tensor=images)


def reorder(images: ImageSet, order: list[int]) -> ImageSet:
    return ImageSet([images.samples[i] for i in order], None, images.batch_size, tensor=images._tensor[order])


def test_predict_set_scores_every_image_at_input_resolution_in_set_order(tiny_musc):
    images = image_set(7)
    scores, maps = tiny_musc.predict_set(images, "cat")
    assert scores.shape == (7,) and maps.shape == (7, 56, 56) and maps.dtype == torch.float64
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    assert maps[-1, 14:28, 28:42].amax() > 2 * maps[:-1].amax()  # the unique blob stands out among the set
    assert scores.argmax() == 6
    order = [4, 0, 6, 2, 5, 1, 3]
    scores_p, maps_p = tiny_musc.predict_set(reorder(images, order), "cat")
    assert torch.allclose(maps_p, maps[order], atol=1e-6)
    assert torch.allclose(scores_p, scores[order], atol=1e-6)


def test_maps_are_the_align_corners_upsampling_of_layer_and_degree_means(tiny_musc):
    images = image_set(6)
    batch = images._tensor
    with torch.no_grad():
        taps, _ = tiny_musc.features(batch, list(tiny_musc.config.feature_layers))
    per_degree = []
    for r in tiny_musc.config.r_list:
        per_layer = [mutual_scoring(aggregate_neighbourhood(layer_norm_grid(t, (4, 4)), r)) for t in taps]
        per_degree.append(torch.stack(per_layer).mean(dim=0))
    patch_scores = torch.stack(per_degree).mean(dim=0).view(6, 4, 4)
    _, maps = tiny_musc.predict_set(images, "cat")
    assert torch.allclose(maps[:, 0, 0], patch_scores[:, 0, 0], atol=1e-9)  # align_corners=True: corners coincide
    assert torch.allclose(maps[:, -1, -1], patch_scores[:, -1, -1], atol=1e-9)
    expected = F.interpolate(patch_scores[:, None], size=(56, 56), mode="bilinear", align_corners=True)[:, 0]
    assert torch.allclose(maps, expected, atol=1e-9)


def test_clip_taps_are_the_residual_stream_after_the_configured_blocks(tiny_musc):
    visual = tiny_musc.features.backbone.visual
    seen = {}
    hooks = [visual.transformer.resblocks[b].register_forward_hook(
        lambda _m, _i, out, b=b: seen.__setitem__(b, out)) for b in (0, 11)]
    x = torch.randn(2, 3, 56, 56)
    try:
        with torch.no_grad():
            visual(x)
            taps, embedding = tiny_musc.features(x, [0, 11])
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.allclose(taps[0], seen[0][:, 1:], atol=1e-5)  # 0-based block 0 = first residual block, CLS dropped
    assert torch.allclose(taps[1], seen[11][:, 1:], atol=1e-5)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_clip_activation_and_positional_embedding_follow_the_reference(tmp_path):
    from zsadbench.clip.backbone import resize_pos_embed, uses_quick_gelu
    from zsadbench.clip.testing import clip_like_state_dict

    state = clip_like_state_dict("tiny-ViT-L-14-336", seed=1)
    openai = {**state, "input_resolution": torch.tensor(56), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}  # an OpenAI-format checkpoint (trained with QuickGELU)
    torch.save(openai, tmp_path / "openai.pt")
    native = MuSc(model="tiny-ViT-L-14-336", pretrained=str(tmp_path / "openai.pt"), image_size=56)
    larger = MuSc(model="tiny-ViT-L-14-336", pretrained=str(tmp_path / "openai.pt"), image_size=84)
    assert uses_quick_gelu(native.features.backbone.model)  # the released OpenAI model at its own size
    assert not uses_quick_gelu(larger.features.backbone.model)  # a fresh CLIP(**config) at another size: GELU
    table = larger.features.backbone.visual.positional_embedding
    assert torch.equal(table, resize_pos_embed(state["visual.positional_embedding"], (6, 6), "bicubic"))
    assert not torch.allclose(table, resize_pos_embed(state["visual.positional_embedding"], (6, 6),
                                                      "bicubic-antialias"), atol=1e-4)


def test_rscin_on_off_and_dataset_windows(tiny_musc):
    images = image_set(10, seed=2, dataset="visa")
    off = MuSc(**TINY, rscin=False)
    raw_scores, maps = off.predict_set(images, "cat")
    assert torch.equal(raw_scores, maps.flatten(1).amax(dim=1))
    with torch.no_grad():
        _, embeddings = tiny_musc.features(images._tensor, [0])
    scores, maps_on = tiny_musc.predict_set(images, "cat")
    assert torch.allclose(maps_on, maps, atol=1e-9)  # RsCIN leaves the maps alone
    assert torch.allclose(scores, rscin(raw_scores, embeddings, (1, 8, 9)), atol=1e-6)  # VisA windows
    assert not torch.allclose(scores, rscin(raw_scores, embeddings, (1, 2, 3)), atol=1e-4)
    custom = MuSc(**TINY, rscin_k=(1, 2))
    assert torch.allclose(custom.predict_set(images, "cat").image_scores, rscin(raw_scores, embeddings, (1, 2)),
                          atol=1e-6)


def test_divisions_score_each_subset_on_its_own_and_return_set_order():
    types = ["good", "blob", "good", "good", "blob", "scratch", "good", "blob", "scratch", "good", "blob", "good"]
    images = image_set(12, seed=4, defect_types=types)
    divided = MuSc(**TINY, divide_num=2, rscin=False)
    scores, maps = divided.predict_set(images, "cat")
    whole = MuSc(**TINY, rscin=False)
    for subset in divide(types, 2, seed=42):
        sub_scores, sub_maps = whole.predict_set(reorder(images, subset), "cat")
        assert torch.allclose(maps[subset], sub_maps, atol=1e-6)
        assert torch.allclose(scores[subset], sub_scores, atol=1e-6)
    assert not torch.allclose(maps, whole.predict_set(images, "cat").anomaly_maps, atol=1e-4)


def test_small_sets_raise_unless_ceil_rounding(tiny_musc):
    with pytest.raises(SetTooSmallError, match=r"category 'cat'.*4 image\(s\).*at least 5 images"):
        tiny_musc.predict_set(image_set(4), "cat")
    with pytest.raises(SetTooSmallError, match="division 2/2"):
        MuSc(**TINY, divide_num=2).predict_set(image_set(9), "cat")
    scores, maps = MuSc(**TINY, topmin_rounding="ceil").predict_set(image_set(3), "cat")
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match=r"feature_layers \[17, 23\].*12 blocks.*\(2, 5, 8, 11\)"):
        MuSc(model="tiny-dino_vitbase16", pretrained="random", image_size=64)  # ViT-L layers on a 12-block model
    with pytest.raises(ValueError, match="r_list"):
        MuSc(**TINY, r_list=(2,))
    with pytest.raises(ValueError, match="unknown backbone"):
        MuSc(model="no-such-model", pretrained="random")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        MuSc(**TINY, precision="fp16").predict_set(image_set(5), "cat")


def test_bf16_mutual_scoring_option_moves_maps_only_slightly(tiny_musc):
    images = image_set(6, seed=3)
    exact = tiny_musc.predict_set(images, "cat").anomaly_maps
    approximate = MuSc(**TINY, msm_precision="bf16").predict_set(images, "cat").anomaly_maps
    assert 0 < (approximate - exact).abs().max() < 2e-2


@pytest.mark.parametrize("name, size, layers", [("tiny-dinov2_vitl14", 56, (5, 11, 17, 23)),
                                                ("tiny-dino_vitbase16", 64, (2, 5, 8, 11))])
def test_dino_backbones_through_timm(name, size, layers):
    detector = MuSc(model=name, pretrained="random", image_size=size, feature_layers=layers)
    generator = torch.Generator().manual_seed(0)
    images = ImageSet.from_tensor(torch.randn(5, 3, size, size, generator=generator))
    scores, maps = detector.predict_set(images, "cat")
    assert scores.shape == (5,) and maps.shape == (5, size, size) and torch.isfinite(maps).all()
    with torch.no_grad():
        taps, embedding = detector.features(images._tensor, [layers[-1]])
    final = detector.features.backbone.model.forward_features(images._tensor)
    assert torch.allclose(taps[0], final[:, 1:], atol=1e-5)  # the last block's normed tokens, CLS dropped
    assert torch.allclose(embedding, final[:, 0], atol=1e-5)  # the normed CLS, not L2-normalised
    assert not math.isclose(float(embedding.norm(dim=-1)[0]), 1.0, abs_tol=1e-3)


def test_zsadbench_run_musc_on_the_synthetic_benchmark(isolated_results: Path, capsys) -> None:
    from conftest import SMALL_SYNTHETIC

    from zsadbench.cli import main

    status = main(["run", "--method", "musc", "--dataset", "synthetic", *SMALL_SYNTHETIC, "--pretrained", "random",
                   "--set", "model=tiny-ViT-L-14-336", "--set", "image_size=56", "--categories", "carpet,tile"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "carpet" in printed and "I-AUROC" in printed
    (run_dir,) = (isolated_results / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["categories"]) == {"carpet", "tile"}
    for metrics in results["categories"].values():
        assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
