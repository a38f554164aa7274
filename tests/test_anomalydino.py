"""AnomalyDINO: presets, zero-shot masking, scoring, maps, the blocked kNN, the shot draw and both detectors (tiny)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from sklearn.decomposition import PCA
from zsadbench.methods.anomalydino import (
    ROTATION_ANGLES,
    AnomalyDINO,
    AnomalyDINOBatched,
    background_mask,
    batched_distances,
    distance_maps,
    mean_top_percent,
    preprocessing_plan,
    rotate_image,
)

from zsadbench.detector import ImageSet
from zsadbench.patch_knn import largest_products

TINY = {"model": "tiny-dinov2_vits14", "pretrained": "random"}  # real depth (12), width 32


# ------------------------------------------------------------------------------------------- presets


def test_presets_follow_the_reference_tables() -> None:
    assert preprocessing_plan("agnostic", "capsule") == (True, True)
    assert preprocessing_plan("agnostic", "bottle") == (False, True)
    assert preprocessing_plan("informed", "hazelnut") == (True, True)
    assert preprocessing_plan("informed", "screw") == (True, True)
    assert preprocessing_plan("informed", "pill") == (True, False)
    assert preprocessing_plan("informed", "carpet") == (False, False)
    assert preprocessing_plan("masking_only", "toothbrush") == (True, False)
    assert preprocessing_plan("agnostic_no_mask", "capsule") == (False, True)
    assert preprocessing_plan("informed_no_mask", "screw") == (False, True)
    assert preprocessing_plan("agnostic", "candle") == (True, True)  # VisA: every category masked
    assert preprocessing_plan("informed", "pcb1") == (True, False)
    assert preprocessing_plan("agnostic", "my_part") == (False, True)  # not in the reference's tables
    assert preprocessing_plan("force_mask_no_rotation", "bottle") == (True, False)
    assert preprocessing_plan("force_no_mask_rotation", "capsule") == (False, True)
    with pytest.raises(ValueError, match="preprocess 'nope'"):
        preprocessing_plan("nope", "bottle")


# -------------------------------------------------------------------------------------------- masking


def reference_mask(tokens: np.ndarray, grid: tuple[int, int], threshold: float = 10.0) -> np.ndarray:
    """The reference's compute_background_mask re-stated with scikit-learn and OpenCV on a (P, 1) array."""
    first_pc = PCA(n_components=1, svd_solver="full").fit_transform(tokens.astype(np.float64))
    mask = first_pc > threshold
    crop = mask.reshape(grid)[int(grid[0] * 0.2):int(grid[0] * 0.8), int(grid[1] * 0.2):int(grid[1] * 0.8)]
    if crop.sum() <= crop.size * 0.35:
        mask = -first_pc > threshold
    kernel = np.ones((3, 3), np.uint8)
    mask = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    return mask.squeeze()


def structured_tokens(seed: int, grid: tuple[int, int] = (10, 10), dim: int = 16, centre_high: bool = True
                      ) -> torch.Tensor:
    """Tokens whose first principal component separates a central blob (plus speckles) from the rest."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = grid
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    blob = ((y - rows / 2) ** 2 + (x - cols / 2) ** 2 < (rows / 3) ** 2).flatten().float()
    blob = torch.where(torch.rand(rows * cols, generator=generator) < 0.1, 1 - blob, blob)  # holes and speckles
    direction = torch.randn(dim, generator=generator)
    strength = 30.0 if centre_high else -30.0
    return blob[:, None] * strength * direction / direction.norm() + torch.randn(rows * cols, dim,
                                                                                   generator=generator)


@pytest.mark.parametrize("seed", range(6))
def test_background_mask_matches_the_reference_algorithm(seed: int) -> None:
    grid = (10, 10)
    tokens = torch.stack([structured_tokens(seed, grid, centre_high=seed % 2 == 0),
                          structured_tokens(seed + 10, grid, centre_high=seed % 2 == 1)])
    ours = background_mask(tokens, grid)
    for b in range(2):
        expected = reference_mask(tokens[b].numpy(), grid)
        assert torch.equal(ours[b], torch.from_numpy(expected)), f"image {b}"
        assert 0 < int(ours[b].sum()) < grid[0] * grid[1]  # a real split, not a trivial mask


def test_background_mask_morphology_runs_along_the_flattened_index() -> None:
    # foreground = the central 3 x 3 of a 5 x 5 grid; the reference's (P, 1) dilation and closing extend each row run
    # by one patch along the flattened index (5..19), where a 2-D dilation would cover the whole grid
    grid = (5, 5)
    foreground = torch.zeros(5, 5, dtype=torch.float64)
    foreground[1:4, 1:4] = 1
    generator = torch.Generator().manual_seed(0)
    tokens = torch.cat([50 * foreground.flatten()[:, None],
                        0.01 * torch.randn(25, 3, generator=generator, dtype=torch.float64)], dim=1)
    mask = background_mask(tokens[None], grid, threshold=10.0)[0]
    assert torch.equal(mask, torch.from_numpy(reference_mask(tokens.numpy(), grid)))
    assert torch.nonzero(mask).flatten().tolist() == list(range(5, 20))


# -------------------------------------------------------------------------------------- scores and maps


def test_image_score_is_the_mean_of_the_top_percent() -> None:
    distances = torch.arange(1024, dtype=torch.float32).flip(0)[None]  # 1023 ... 0
    assert mean_top_percent(distances).item() == pytest.approx(np.mean(np.arange(1014, 1024)))
    small = torch.tensor([[0.1, 0.7, 0.3]])
    assert mean_top_percent(small).item() == pytest.approx(0.7)  # int(3 * 0.01) == 0: the maximum


def test_maps_match_cv2_resize_and_scipy_gaussian() -> None:
    generator = torch.Generator().manual_seed(1)
    distances = torch.rand(2, 49, generator=generator, dtype=torch.float64)
    maps = distance_maps(distances, (7, 7), (56, 56), sigma=4.0)
    for b in range(2):
        grid = distances[b].view(7, 7).numpy()
        expected = gaussian_filter(cv2.resize(grid, (56, 56), interpolation=cv2.INTER_LINEAR), sigma=4)
        np.testing.assert_allclose(maps[b].numpy(), expected, atol=1e-12)


def test_rotation_is_opencvs_about_the_centre() -> None:
    image = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    assert np.array_equal(rotate_image(image, 0), image)
    matrix = cv2.getRotationMatrix2D((12.0, 10.0), 90, 1.0)
    expected = cv2.warpAffine(image, matrix, (24, 20), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    assert np.array_equal(rotate_image(image, 90), expected)


# ------------------------------------------------------------------------------------------ blocked kNN


@pytest.mark.parametrize("k", [1, 5])
def test_largest_products_match_the_full_product(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    queries, bank = torch.randn(300, 8, generator=generator), torch.randn(1000, 8, generator=generator)
    bias = torch.randn(1000, generator=generator)
    full = queries @ bank.T + bias
    expected = full.topk(k, dim=1).values
    got = largest_products(queries, bank, k, bank_bias=bias, memory_mb=0.05)  # forces row and column blocks
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_largest_products_exclude_equal_groups() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4 * 30, 6, generator=generator)
    groups = torch.arange(4).repeat_interleave(30)
    got = largest_products(x, x, 3, query_groups=groups, bank_groups=groups, memory_mb=0.01)
    full = (x @ x.T).masked_fill(groups[:, None] == groups[None, :], float("-inf"))
    torch.testing.assert_close(got, full.topk(3, dim=1).values, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="k=200"):
        largest_products(x, x, 200)


def reference_batched(tokens: torch.Tensor, quantile: float = 0.001) -> torch.Tensor:
    """run_anomalydino_batched.calculate_cosine_distances re-stated: kthvalue, strict mask, masked mean."""
    out = []
    for i in range(len(tokens)):
        others = torch.cat([t for j, t in enumerate(tokens) if j != i])
        distance = 1 - F.normalize(tokens[i], dim=1) @ F.normalize(others, dim=1).T
        kth = torch.kthvalue(distance, int(quantile * distance.shape[1]), dim=1).values[:, None]
        lowest = distance < kth
        out.append((distance * lowest).sum(dim=1) / lowest.sum(dim=1))
    return torch.stack(out)


def test_batched_distances_match_the_reference_rule() -> None:
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randn(3, 1000, 8, generator=generator)  # 2000 other patches: k = 2
    torch.testing.assert_close(batched_distances(tokens, memory_mb=4), reference_batched(tokens),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        batched_distances(tokens[:1])


# ----------------------------------------------------------------------------------------- shot draw


def test_sorted_block_shot_draw() -> None:
    detector = AnomalyDINO(**TINY, image_size=28, shots=2, reference_seed=1)
    assert detector.reference_indices(10, "c") == [2, 3]
    with pytest.warns(UserWarning, match="only 1 of 2"):
        assert detector.reference_indices(3, "c") == [2]
    with pytest.raises(ValueError, match="only 2 normal training images"):
        detector.reference_indices(2, "c")
    random_draw = AnomalyDINO(**TINY, image_size=28, shots=2, reference_protocol="seeded", reference_seed=10)
    expected = torch.randint(10, (2,), generator=torch.Generator().manual_seed(10)).tolist()
    assert random_draw.reference_indices(10, "c") == expected
    with pytest.raises(ValueError, match="reference_protocol 'nope'"):
        AnomalyDINO(**TINY, image_size=28, reference_protocol="nope").reference_indices(10, "c")


# ----------------------------------------------------------------------------------------- detectors


def images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def test_fewshot_scores_are_cosine_nearest_neighbours_of_the_rotated_bank() -> None:
    detector = AnomalyDINO(**TINY, image_size=56, preprocess="force_no_mask_rotation", top_percent=20.0)
    references = images(1, 80, 0)  # rotated at 80 px, then resized to 56
    detector.set_reference_images(references, "c")
    assert detector.bank is not None and detector.bank.shape == (8 * 16, 32)
    rotated = torch.stack([detector.transform(Image.fromarray(rotate_image(np.asarray(references[0]), a)))
                           for a in ROTATION_ANGLES])
    bank = F.normalize(detector.features(rotated, 8).reshape(-1, 32), dim=1)
    tests = torch.stack([detector.transform(i) for i in images(2, 56, 1)])
    prediction = detector.predict(tests, "c")
    tokens = F.normalize(detector.features(tests, 8), dim=-1)
    expected = (1 - (tokens @ bank.T).amax(dim=-1)).clamp(min=0).double()  # (2, 16)
    top3 = expected.topk(3, dim=1).values.mean(dim=1)  # int(16 * 0.2) = 3 patches
    torch.testing.assert_close(prediction.image_scores, top3, rtol=0, atol=1e-6)
    torch.testing.assert_close(prediction.anomaly_maps, distance_maps(expected, (4, 4), (56, 56), 4.0),
                               rtol=0, atol=1e-6)


def test_fewshot_masking_zeroes_the_background_and_k_neighbours_average() -> None:
    detector = AnomalyDINO(**TINY, image_size=56, preprocess="force_mask_no_rotation", mask_threshold=0.0,
                           k_neighbors=2)
    detector.set_reference(torch.stack([detector.transform(i) for i in images(2, 56, 2)]), "c")
    assert detector.bank is not None and detector.bank.shape == (2 * 16, 32)  # references are not masked
    tests = torch.stack([detector.transform(i) for i in images(3, 56, 3)])
    prediction = detector.predict(tests, "c")
    tokens = detector.features(tests, 8)
    keep = background_mask(tokens, (4, 4), 0.0)
    assert 0 < int(keep.sum()) < keep.numel()
    similarities = F.normalize(tokens, dim=-1) @ detector.bank.T
    expected = (1 - similarities.topk(2, dim=-1).values).clamp(min=0).mean(dim=-1).double() * keep
    torch.testing.assert_close(prediction.image_scores, expected.amax(dim=1), rtol=0, atol=1e-6)


def test_tensor_references_rotate_after_the_resize() -> None:
    detector = AnomalyDINO(**TINY, image_size=56, preprocess="force_no_mask_rotation")
    reference = torch.stack([detector.transform(i) for i in images(1, 56, 5)])
    detector.set_reference(reference, "c")
    assert detector.bank is not None and detector.bank.shape == (8 * 16, 32)
    unrotated = F.normalize(detector.features(reference, 8)[0], dim=1)
    torch.testing.assert_close(detector.bank[:16], unrotated)  # angle 0 first, image-major


def test_fewshot_needs_the_categorys_references() -> None:
    detector = AnomalyDINO(**TINY, image_size=28)
    tests = torch.zeros(1, 3, 28, 28)
    with pytest.raises(RuntimeError, match="reference images of category 'c'"):
        detector.predict(tests, "c")
    detector.set_reference(tests, "other")
    with pytest.raises(RuntimeError, match="anomalydino-batched"):
        detector.predict(tests, "c")


def test_bad_configurations_are_named() -> None:
    with pytest.raises(ValueError, match="not a DINOv2 backbone"):
        AnomalyDINO(model="dino_vitbase16", pretrained="random")
    with pytest.raises(ValueError, match="knn_metric"):
        AnomalyDINO(**TINY, image_size=28, knn_metric="cosine")
    with pytest.raises(ValueError, match="multiple of"):
        AnomalyDINO(**TINY, image_size=30)
    with pytest.raises(ValueError, match="quantile"):
        AnomalyDINOBatched(**TINY, image_size=28, quantile=0.0)


def test_batched_detector_scores_each_image_against_the_others() -> None:
    detector = AnomalyDINOBatched(**TINY, image_size=56, preprocess="force_no_mask_no_rotation")
    tests = torch.stack([detector.transform(i) for i in images(4, 56, 6)])
    prediction = detector.predict_set(ImageSet.from_tensor(tests, batch_size=3), "c")
    tokens = detector.features(tests, 8)
    expected = batched_distances(tokens).double()  # 48 other patches: k = 2, the nearest distance
    torch.testing.assert_close(prediction.image_scores, expected.amax(dim=1), rtol=0, atol=1e-6)
    assert prediction.anomaly_maps.shape == (4, 56, 56)
    # an image duplicated in the set finds itself in its twin: distance ~0 everywhere
    twin = detector.predict(torch.cat([tests[:1], tests[:1], tests[1:]]), "c")
    assert twin.image_scores[:2].max().item() < 1e-5 < twin.image_scores[2:].min().item()
