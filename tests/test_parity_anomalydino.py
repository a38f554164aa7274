"""Parity of zsadbench's AnomalyDINO with dammsi/AnomalyDINO and with anomalib 2.7's AnomalyDINO (optional).

Both anchors run outside the project: ``tests/parity/ref_anomalydino.py`` (in the reference's own environment) runs
dammsi/AnomalyDINO on a full-size random DINOv2 ViT-S/14 state dict and a small synthetic MVTec-layout benchmark, and
anomalib's ``AnomalyDINOModel`` on the same weights and preprocessed tensors, and records every stage. This test
feeds zsadbench the same weights file and the same raw images and compares::

    python tests/parity/ref_anomalydino.py --ref-root AnomalyDINO --dinov2-root dinov2 \\
        --weights dinov2_vits14_rand_s0.pth --out ad_ref.pt                                   # reference venv
    ZSADBENCH_PARITY_ANOMALYDINO=ad_ref.pt ZSADBENCH_PARITY_ANOMALYDINO_WEIGHTS=dinov2_vits14_rand_s0.pth \\
        nox -s parity -- -k anomalydino                                                      # here
    python tests/test_parity_anomalydino.py ad_ref.pt dinov2_vits14_rand_s0.pth             # prints the figures

Reference (tolerance 1e-4): the memory bank (rotated references, exact raw-image path), the test tokens, the
zero-shot masks (equal), the patch distances, image scores and maps of the few-shot and batched zero-shot modes; the
preprocessed-tensor rotation path is reported, not asserted (``ZSADBENCH_PARITY_ANOMALYDINO_TENSOR_PATH=0`` skips
it; ``ZSADBENCH_PARITY_ANOMALYDINO_CATEGORIES=capsule`` limits the few-shot comparison to the named categories: both
save forwards at 672 px on a CPU). The reference's batched distances are defined only with
at least 2000 patches in the other images (its k = int(0.001 (N - 1) P) >= 2: 2 images at 672 px, 3 at 448 px);
a category where they are NaN is reported (``batched_<category>_reference_nan_patches``) and not compared.

anomalib (when the recording has it): end to end and stage-wise (tokens; our scoring on anomalib's tokens, with its
masks rebuilt by 2-D filtering when masking; its map generator, nearest upsampling and a reflect-101 blur, applied
to our distances). Its tokens differ from the reference's wherever the positional embedding is resized
(timm's size-based bicubic instead of DINOv2's scale-factor rule); at 518 px (the checkpoint's 37 x 37 grid) they
are the same and the end-to-end scores are asserted too.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytestmark = pytest.mark.parity

REF = os.environ.get("ZSADBENCH_PARITY_ANOMALYDINO")
WEIGHTS = os.environ.get("ZSADBENCH_PARITY_ANOMALYDINO_WEIGHTS")
TENSOR_PATH = os.environ.get("ZSADBENCH_PARITY_ANOMALYDINO_TENSOR_PATH", "1") != "0"  # 0: skip the report-only path
CATEGORIES = os.environ.get("ZSADBENCH_PARITY_ANOMALYDINO_CATEGORIES")  # comma-separated: compare only these


def _max(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float((torch.as_tensor(np.asarray(a), dtype=torch.float64)
                  - torch.as_tensor(np.asarray(b), dtype=torch.float64)).abs().max())


def _worse(old: float, new: float) -> float:
    """Returns the larger difference; NaN (one side undefined) wins, so that it fails the tolerance."""
    return new if math.isnan(new) or new > old else old


def reference_report(reference_file: str, weights_file: str) -> dict[str, float | int]:
    """Returns the max abs differences of every stage between dammsi/AnomalyDINO's recording and zsadbench."""
    from zsadbench.methods.anomalydino import AnomalyDINO, AnomalyDINOBatched, background_mask

    from zsadbench.detector import ImageSet

    ref = torch.load(reference_file, map_location="cpu", weights_only=False)
    meta = ref["meta"]
    same_size = meta["image_px"] == meta["resolution"]
    report: dict[str, float | int] = {"resolution": meta["resolution"], "image_px": meta["image_px"]}
    detector = AnomalyDINO(model=meta["model"], pretrained=weights_file, image_size=meta["resolution"],
                           shots=meta["shots"], reference_seed=meta["shot_seed"], preprocess="agnostic")
    stats: dict[str, float] = {}
    mask_mismatch = 0

    def worst(key: str, value: float) -> None:
        stats[key] = _worse(stats.get(key, 0.0), value)

    for category, rec in ref["fewshot"].items():
        if CATEGORIES and category not in CATEGORIES.split(","):
            continue
        assert detector.plan(category) == (rec["masking"], rec["rotation"]), category
        detector.set_reference_images([Image.fromarray(a) for a in rec["reference_images"]], category)
        assert detector.bank is not None
        bank = F.normalize(torch.from_numpy(rec["reference_features"]).reshape(-1, detector.bank.shape[1]), dim=1)
        worst("fewshot_bank_max_abs", _max(detector.bank, bank))
        tests = torch.stack([detector.transform(Image.fromarray(a)) for a in rec["test_images"]])
        with torch.no_grad():
            tokens = detector.features(tests, 8)
        worst("fewshot_test_tokens_max_abs", _max(tokens, rec["test_features"]))
        if rec["test_masks"] is not None:
            ours = background_mask(tokens, detector.features.grid)
            mask_mismatch += int((ours != torch.from_numpy(rec["test_masks"])).sum())
            report[f"fewshot_{category}_foreground_patches"] = int(ours.sum())
        distances = detector.patch_distances(tests, category)
        worst("fewshot_patch_distances_max_abs", _max(distances, rec["patch_distances"].reshape(len(tests), -1)))
        prediction = detector.predict(tests, category)
        worst("fewshot_image_scores_max_abs", _max(prediction.image_scores, rec["scores"]))
        if same_size:
            worst("fewshot_maps_max_abs", _max(prediction.anomaly_maps, rec["maps"]))
        if TENSOR_PATH:  # reported only; costs 8 more forwards per shot and 2 per test image
            references = torch.stack([detector.transform(Image.fromarray(a)) for a in rec["reference_images"]])
            detector.set_reference(references, category)  # the evaluator's path: rotation after the resize
            tensor_path = detector.predict(tests, category)
            worst("fewshot_tensor_rotation_image_scores_max_abs", _max(tensor_path.image_scores, rec["scores"]))
    report["fewshot_mask_mismatches"] = mask_mismatch

    batched = AnomalyDINOBatched(model=meta["model"], pretrained=weights_file, image_size=meta["resolution"])
    for category, rec in ref["batched"].items():
        undefined = int(np.isnan(rec["patch_distances"]).sum())
        if undefined:  # its k = int(0.001 (N - 1) P) is 1 below 2000 other patches: nothing lies below the 1st
            report[f"batched_{category}_reference_nan_patches"] = undefined  # not compared (ours: k >= 2)
            continue
        tests = torch.stack([batched.transform(Image.fromarray(a)) for a in rec["test_images"]])
        image_set = ImageSet.from_tensor(tests, batch_size=4)
        distances = batched.patch_distances(image_set, category)
        worst("batched_patch_distances_max_abs", _max(distances, rec["patch_distances"]))
        prediction = batched.predict_set(image_set, category)
        worst("batched_image_scores_max_abs", _max(prediction.image_scores, rec["scores"]))
        if same_size:
            worst("batched_maps_max_abs", _max(prediction.anomaly_maps, rec["maps"]))
    report.update(stats)
    return report


def anomalib_style_maps(distances: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """anomalib's PatchCore map generator on (B, P) distances: nearest upsampling, 33-tap sigma-4 blur, reflect-101."""
    from zsadbench.filters import gaussian_kernel1d

    x = F.interpolate(distances.float().view(-1, 1, *grid), size=size, mode="nearest")
    kernel = gaussian_kernel1d(4.0, dtype=torch.float32)
    radius = (len(kernel) - 1) // 2
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return x[:, 0].double()


def grid_masks(tokens: torch.Tensor, grid: tuple[int, int], kernel_size: int = 3) -> torch.Tensor:
    """Foreground masks as anomalib computes them: our PCA threshold, then dilation and closing on the 2-D grid.

    (The reference, and :func:`background_mask`, filter the flattened patch index instead.) OpenCV's default borders:
    nothing outside the grid dilates in or erodes.
    """
    from zsadbench.methods.anomalydino import background_mask

    raw = background_mask(tokens, grid, kernel_size=1)  # window 1: the thresholded projection, unfiltered
    x = raw.float().view(-1, 1, *grid)
    pad = kernel_size // 2
    dilated = F.max_pool2d(F.max_pool2d(x, kernel_size, 1, pad), kernel_size, 1, pad)  # dilate, then close's dilate
    closed = -F.max_pool2d(-dilated, kernel_size, 1, pad)  # close's erosion
    return closed.flatten(1) > 0


def anomalib_report(reference_file: str, weights_file: str) -> dict[str, float | int | str]:
    """Returns the differences between anomalib's recorded AnomalyDINOModel outputs and zsadbench's.

    End to end (our detector configured as anomalib runs: no rotation; with masking, the references masked too), and
    stage-wise: the patch tokens, then our scoring (:func:`largest_products`, :func:`mean_top_percent`) applied to
    anomalib's own tokens, with our bilinear + scipy map and with anomalib's nearest + reflect-101 map; with masking,
    anomalib's masks on its tokens rebuilt by :func:`grid_masks` (2-D filtering), and how many patches differ from
    our masks (flattened-index filtering, the dammsi reference's) on our tokens.
    """
    from zsadbench.methods.anomalydino import AnomalyDINO, background_mask, mean_top_percent

    from zsadbench.patch_knn import largest_products

    ref = torch.load(reference_file, map_location="cpu", weights_only=False)
    meta, recorded = ref["meta"], ref["anomalib"]
    report: dict[str, float | int | str] = {"anomalib": recorded["version"], "resolution": meta["resolution"]}
    for masking in (False, True):
        detector = AnomalyDINO(model=meta["model"], pretrained=weights_file, image_size=meta["resolution"],
                               preprocess="force_mask_no_rotation" if masking else "force_no_mask_no_rotation",
                               mask_reference_images=masking)
        tag = "masked" if masking else "unmasked"
        stats: dict[str, float] = {}
        counts = dict.fromkeys(("mask_mismatches_1d_vs_2d_filter_on_anomalib_tokens",
                                "mask_mismatches_ours_vs_anomalib", "test_patches"), 0)
        for key, rec in recorded.items():
            if not isinstance(key, tuple) or key[1] is not masking:
                continue
            category, tests = key[0], rec["inputs_tests"]
            detector.set_reference(rec["inputs_references"], category)
            prediction = detector.predict(tests, category)
            distances = detector.patch_distances(tests, category)
            with torch.no_grad():
                tokens = detector.features(tests, 8)
            grid, size = detector.features.grid, detector.input_size
            values = {
                "image_scores": _max(prediction.image_scores, rec["scores"]),
                "maps": _max(prediction.anomaly_maps, rec["maps"]),
                "maps_anomalib_style": _max(anomalib_style_maps(distances, grid, size), rec["maps"]),
                "tokens": _max(tokens, rec["tokens_tests"]),
            }
            # our scoring on anomalib's tokens (with masking: its 2-D masks, on bank and test images)
            dim = tokens.shape[-1]
            bank_tokens, test_tokens = rec["tokens_references"].float(), rec["tokens_tests"].float()
            bank, queries = bank_tokens.reshape(-1, dim), test_tokens.reshape(-1, dim)
            keep = torch.ones(len(queries), dtype=torch.bool)
            if masking:
                bank = bank[grid_masks(bank_tokens, grid).flatten()]
                keep = grid_masks(test_tokens, grid).flatten()
                counts["mask_mismatches_1d_vs_2d_filter_on_anomalib_tokens"] += int(
                    (background_mask(test_tokens, grid).flatten() != keep).sum())
                counts["mask_mismatches_ours_vs_anomalib"] += int(
                    (background_mask(tokens, grid).flatten() != keep).sum())
                counts["test_patches"] += len(keep)
            nearest = largest_products(F.normalize(queries, dim=1), F.normalize(bank, dim=1), 1)[:, 0]
            theirs = ((1 - nearest).clamp(min=0) * keep).view(len(tests), -1).double()
            values["scores_on_anomalib_tokens"] = _max(mean_top_percent(theirs), rec["scores"])
            values["maps_anomalib_style_on_anomalib_tokens"] = _max(anomalib_style_maps(theirs, grid, size),
                                                                    rec["maps"])
            for name, value in values.items():
                stats[f"{tag}_{name}_max_abs"] = _worse(stats.get(f"{tag}_{name}_max_abs", 0.0), value)
        report.update(stats)
        if masking:
            report.update({f"masked_{name}": count for name, count in counts.items()})
    return report


@pytest.mark.skipif(not (REF and WEIGHTS), reason="set ZSADBENCH_PARITY_ANOMALYDINO (recording of "
                    "tests/parity/ref_anomalydino.py) and ZSADBENCH_PARITY_ANOMALYDINO_WEIGHTS (its weights file)")
def test_anomalydino_matches_the_reference() -> None:
    assert REF and WEIGHTS
    report = reference_report(REF, WEIGHTS)
    print(json.dumps(report, indent=1))
    assert report["fewshot_mask_mismatches"] == 0
    for key, value in report.items():
        if key.endswith("_max_abs") and "tensor_rotation" not in key:
            assert value <= 1e-4, f"{key} = {value:.3g}"


@pytest.mark.skipif(not (REF and WEIGHTS), reason="set ZSADBENCH_PARITY_ANOMALYDINO and "
                    "ZSADBENCH_PARITY_ANOMALYDINO_WEIGHTS (a recording made with anomalib importable)")
def test_anomalydino_matches_anomalib() -> None:
    assert REF and WEIGHTS
    ref = torch.load(REF, map_location="cpu", weights_only=False)
    if ref.get("anomalib") is None:
        pytest.skip("the recording has no anomalib part (anomalib was not importable in the driver's environment)")
    report = anomalib_report(REF, WEIGHTS)
    print(json.dumps(report, indent=1))
    # the scoring is the same: on anomalib's own tokens, our kNN and top-1 % give its scores, and its map generator
    # applied to our distances gives its maps
    # with masking too, once its masks are rebuilt with 2-D filtering on its tokens
    for tag in ("unmasked", "masked"):
        assert report[f"{tag}_scores_on_anomalib_tokens_max_abs"] <= 1e-4
        assert report[f"{tag}_maps_anomalib_style_on_anomalib_tokens_max_abs"] <= 1e-4
    if report["resolution"] == 518:  # no positional-embedding resize: the same tokens on both sides
        assert report["unmasked_tokens_max_abs"] <= 1e-3
        assert report["unmasked_image_scores_max_abs"] <= 1e-4
        assert report["unmasked_maps_anomalib_style_max_abs"] <= 1e-4


if __name__ == "__main__":
    print(json.dumps(reference_report(sys.argv[1], sys.argv[2]), indent=1))
    if torch.load(sys.argv[1], map_location="cpu", weights_only=False).get("anomalib") is not None:
        print(json.dumps(anomalib_report(sys.argv[1], sys.argv[2]), indent=1))
