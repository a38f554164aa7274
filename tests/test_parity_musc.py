"""Parity of zsadbench's MuSc with the reference (xrli-U/MuSc @ b76b93d) on identical random weights and inputs.

The reference needs its own environment (vendored open_clip 2.16 fork, import-path tricks), so it is not run here:
the project's driver ``tests/parity/ref_musc.py`` imports it from a MuSc work tree named on its command line, runs its
``make_category_data`` on a weights file and records every intermediate. This test reads that recording and
recomputes each stage with zsadbench from the recorded inputs; it is skipped unless ``ZSADBENCH_MUSC_REF`` (a
recording at the default 518 px) or ``ZSADBENCH_MUSC_REF_336`` (at the native 336 px, where the reference loads the
weights as the OpenAI model and runs QuickGELU, while at 518 px it builds a fresh CLIP with exact GELU) names a
recording, and ``ZSADBENCH_MUSC_WEIGHTS`` the weights file given to the driver. The activation the reference ran is
compared too. The DINO / DINOv2 backbones are compared with the reference's own ViT code (``models/backbone`` of a
MuSc work tree named by ``ZSADBENCH_MUSC_REF_ROOT``; it needs only torch) on random weights.

    python tests/parity/make_weights.py --arch ViT-L-14-336 --seed 0 --out W/clip_s0.pt           # here
    python tests/parity/ref_musc.py --ref-root MuSc --weights W/clip_s0.pt --images 5 --image-size 518 \\
        --out W/musc_ref_518.pt                                                        # reference venv
    python tests/parity/ref_musc.py --ref-root MuSc --weights W/clip_s0.pt --images 5 --image-size 336 \\
        --out W/musc_ref_336.pt
    ZSADBENCH_MUSC_REF=W/musc_ref_518.pt ZSADBENCH_MUSC_REF_336=W/musc_ref_336.pt ZSADBENCH_MUSC_WEIGHTS=W/clip_s0.pt \\
        nox -s parity -- -k musc                                                        # here
    python tests/test_parity_musc.py W/musc_ref_336.pt W/clip_s0.pt                    # prints the differences

Stages and tolerances: positional embedding 1e-6; tokens after blocks 6/12/18/24 relative 1e-5;
image embedding 1e-5; LNAMD 1e-5 (the reference's LayerNorm of 1.4M values per image in float32 carries ~1e-6);
per-layer MSM scores 1e-5; combined patch scores, maps, raw image scores and RsCIN scores 1e-5; divisions exact.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.parity


def parity_report(reference_file: str, weights_file: str) -> dict[str, float | bool | str]:
    """Returns the max abs (or relative) differences of every stage between the recording and zsadbench."""
    from zsadbench.methods.musc import (
        MuSc,
        aggregate_neighbourhood,
        divide,
        layer_norm_grid,
        mutual_scoring,
        rscin,
    )

    from zsadbench.detector import ImageSet
    from zsadbench.types import Sample

    ref = torch.load(reference_file, map_location="cpu", weights_only=False)
    meta = ref["meta"]
    size = int(meta["img_size"])
    layers = tuple(meta["feature_layers_0based"])
    detector = MuSc(model=meta["arch"], pretrained=weights_file, image_size=size, feature_layers=layers,
                    r_list=tuple(meta["r_list"]), batch_size=int(meta["batch_size"]))
    report: dict[str, float | bool | str] = {"images": int(ref["inputs"].shape[0]), "image_size": size}

    visual = detector.features.backbone.visual
    ours_activation = type(visual.transformer.resblocks[0].mlp.gelu).__name__
    report["activation_equal"] = ours_activation == meta["activation"]
    report["activation"] = f"ours {ours_activation}, reference {meta['activation']}"
    report["pos_embed_max_abs"] = float((visual.positional_embedding - ref["pos_embed_resized"]).abs().max())
    from PIL import Image

    ours_inputs = torch.stack([detector.transform(Image.fromarray(ref["src_images"][g].numpy()))
                               for g in ref["order"].tolist()])
    report["preprocessing_max_abs"] = float((ours_inputs - ref["inputs"]).abs().max())

    inputs = ref["inputs"]
    with torch.no_grad():
        taps, embeddings = detector.features(inputs, list(layers))
    tokens = torch.stack(taps, 1)  # (N, 4, P, D), CLS dropped
    ref_tokens = ref["tokens"][:, :, 1:]
    report["tokens_max_abs"] = float((tokens - ref_tokens).abs().max())
    report["tokens_max_rel"] = float((tokens - ref_tokens).abs().max() / ref_tokens.abs().max())
    report["image_embedding_max_abs"] = float((embeddings - ref["image_features"]).abs().max())

    grid = detector.features.grid
    lnamd_diff, msm_diff, msm_on_ref_z = 0.0, 0.0, 0.0
    per_degree = []
    for r in meta["r_list"]:
        per_layer = []
        for layer in range(len(layers)):
            z = aggregate_neighbourhood(layer_norm_grid(tokens[:, layer], grid), r)
            ref_z = ref["lnamd"][r][:, layer]
            lnamd_diff = max(lnamd_diff, float((z - ref_z).abs().max()))
            scores = mutual_scoring(z)
            per_layer.append(scores)
            msm_diff = max(msm_diff, float((scores - ref["msm"][r][:, layer]).abs().max()))
            msm_on_ref_z = max(msm_on_ref_z, float((mutual_scoring(ref_z) - ref["msm"][r][:, layer]).abs().max()))
        per_degree.append(torch.stack(per_layer).mean(0))
    report["lnamd_max_abs"] = lnamd_diff
    report["msm_per_layer_max_abs"] = msm_diff
    report["msm_kernel_on_reference_lnamd_max_abs"] = msm_on_ref_z
    combined = torch.stack(per_degree).mean(0)
    report["patch_scores_stagewise_max_abs"] = float((combined - ref["patch_scores"]).abs().max())

    # the detector end to end on the recorded inputs (reference order, the reference's MVTec dataset name)
    defect = ["good" if int(label) == 0 else "defect" for label in ref["labels"]]
    samples = [Sample(Path(f"img{i}.png"), "synthetic", int(label), None, d, "mvtec")
               for i, (label, d) in enumerate(zip(ref["labels"].tolist(), defect))]
    scores, maps = detector.predict_set(ImageSet(samples, None, 4, tensor=inputs), "synthetic")
    report["anomaly_maps_max_abs"] = float((maps - ref["anomaly_maps"]).abs().max())
    report["image_scores_raw_max_abs"] = float((maps.flatten(1).amax(1) - ref["image_scores_raw"]).abs().max())
    report["image_scores_rscin_max_abs"] = float((scores - ref["image_scores"]).abs().max())
    report["rscin_on_reference_inputs_max_abs"] = float(
        (rscin(ref["image_scores_raw"], ref["image_features"], ref["rscin_k_list"]) - ref["image_scores"]).abs().max())
    if ref.get("image_scores_k189") is not None:
        report["rscin_k189_on_reference_inputs_max_abs"] = float(
            (rscin(ref["image_scores_raw"], ref["image_features"], (1, 8, 9)) - ref["image_scores_k189"]).abs().max())

    order = ref["order"].tolist()  # reference position -> generation index
    same = True
    for d, expected in ref["divisions"].items():
        ours = [[order[i] for i in subset] for subset in divide(defect, int(d), seed=42)]
        same = same and ours == [list(s) for s in expected]
    report["divisions_equal"] = same
    return report


TOLERANCES = {
    "pos_embed_max_abs": 1e-6, "preprocessing_max_abs": 1e-6, "tokens_max_rel": 1e-5, "image_embedding_max_abs": 1e-5,
    "lnamd_max_abs": 1e-5, "msm_per_layer_max_abs": 1e-5, "msm_kernel_on_reference_lnamd_max_abs": 1e-5,
    "patch_scores_stagewise_max_abs": 1e-5, "anomaly_maps_max_abs": 1e-5, "image_scores_raw_max_abs": 1e-5,
    "image_scores_rscin_max_abs": 1e-5, "rscin_on_reference_inputs_max_abs": 1e-6,
    "rscin_k189_on_reference_inputs_max_abs": 1e-6,
}


@pytest.mark.parametrize("variable, size", [("ZSADBENCH_MUSC_REF", 518), ("ZSADBENCH_MUSC_REF_336", 336)])
def test_musc_matches_the_reference_recording(variable: str, size: int) -> None:
    reference, weights = os.environ.get(variable), os.environ.get("ZSADBENCH_MUSC_WEIGHTS")
    if not reference or not weights:
        pytest.skip(f"set {variable} (tests/parity/ref_musc.py output at {size} px) and ZSADBENCH_MUSC_WEIGHTS")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    report = parity_report(reference, weights)
    print(json.dumps(report, indent=1))
    assert report["image_size"] == size, f"{variable} holds a recording at {report['image_size']} px"
    assert report["activation_equal"], report["activation"]
    assert report["divisions_equal"]
    for key, tolerance in TOLERANCES.items():
        if key in report:
            assert report[key] <= tolerance, f"{key} = {report[key]:.3g} > {tolerance:g}"


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps(parity_report(sys.argv[1], sys.argv[2]), indent=1))


@pytest.mark.parametrize("alias, patch, sizes", [("dino_vitbase16", 16, (224, 256)), ("dinov2_vitb14", 14, (518, 336))])
def test_dino_backbones_match_the_reference_code(alias, patch, sizes, tmp_path):
    root = os.environ.get("ZSADBENCH_MUSC_REF_ROOT")
    if not root:
        pytest.skip("set ZSADBENCH_MUSC_REF_ROOT to a xrli-U/MuSc work tree")
    from zsadbench.dino import load_dino

    sys.path[:0] = [root, os.path.join(root, "models", "backbone")]
    try:
        import dino_vision_transformer
        import vision_transformer
    finally:
        del sys.path[:2]
    torch.manual_seed(0)
    if alias.startswith("dinov2"):  # the torch.hub configuration: 518 px, layer scale, no block chunks
        reference = dino_vision_transformer.vit_base(patch_size=patch, img_size=518, init_values=1.0, block_chunks=0)
    else:
        reference = vision_transformer.vit_base(patch_size=patch, num_classes=0)
    reference.eval()
    with torch.no_grad():
        for parameter in reference.parameters():  # non-trivial LayerNorm affines, biases and layer scales
            parameter.add_(0.02 * torch.randn_like(parameter))
    weights = tmp_path / f"{alias}.pth"
    torch.save(reference.state_dict(), weights)
    layers = [2, 5, 8, 11]
    for size in sizes:
        ours = load_dino(alias, str(weights), size)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            if alias.startswith("dinov2"):
                expected = reference.get_intermediate_layers(x, n=layers)  # normed, CLS removed
            else:
                last = reference.get_intermediate_layers(x, n=12)  # normed outputs of the last 12 blocks, CLS first
                expected = [last[layer][:, 1:] for layer in layers]
            tokens, embedding = ours.forward(x, layers)
            assert max(float((a - b).abs().max()) for a, b in zip(tokens, expected)) < 2e-5
            assert float((embedding - reference(x)).abs().max()) < 2e-5
