"""Parity of zsadbench's WinCLIP with anomalib's ``WinClipModel`` on identical weights and inputs (optional).

Two ways, both through the project's driver ``tests/parity/ref_winclip.py`` (anomalib 2.7.0 from PyPI, never
vendored), which builds anomalib's model on a weights file and applies the batch-first window fix described there
(anomalib permutes tokens for open_clip < 2.26; with today's batch-first open_clip the windows would attend across
each other and all window embeddings come out identical, anomalib#2571):

- in-process, when anomalib is importable next to zsadbench: a tiny model, and with ``ZSADBENCH_PARITY_FULL=1`` the
  full-size ViT-B-16-plus-240 at 240 px (~830 MB of random weights, a few minutes on 2 CPU cores);
- from a recording, when anomalib lives in another environment::

    python tests/parity/make_weights.py --arch ViT-B-16-plus-240 --seed 0 --out W/winclip_s0.pt
    python tests/parity/ref_winclip.py --weights W/winclip_s0.pt --images 2 --shots 1 --out W/winclip_ref.pt
    ZSADBENCH_PARITY_WINCLIP=W/winclip_ref.pt ZSADBENCH_PARITY_WINCLIP_WEIGHTS=W/winclip_s0.pt \\
        nox -s parity -- -k winclip

Both sides get the same state-dict file and the same preprocessed tensors; text embeddings, image scores and anomaly
maps (zero-shot and WinCLIP+) must agree to 1e-4.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.parity

sys.path.insert(0, str(Path(__file__).resolve().parent / "parity"))
from ref_winclip import anomalib_winclip  # noqa: E402
from zsadbench.methods.winclip import WinClip  # noqa: E402

from zsadbench.clip.testing import clip_like_state_dict, save_state_dict, synthetic_images  # noqa: E402
from zsadbench.clip.text import compositional_prompts  # noqa: E402

RECORDING = os.environ.get("ZSADBENCH_PARITY_WINCLIP")
RECORDING_WEIGHTS = os.environ.get("ZSADBENCH_PARITY_WINCLIP_WEIGHTS")

CASES = {
    "tiny": ("tiny-ViT-B-16-plus-240", 80),
    "full": ("ViT-B-16-plus-240", 240),
}
CLASS_NAME = "metal_nut"  # the underscore becomes its own BPE token


@pytest.mark.parametrize("case", ["tiny", "full"])
def test_winclip_matches_anomalib(case: str, tmp_path) -> None:
    prompting = pytest.importorskip("anomalib.models.image.winclip.prompting")
    if case == "full" and os.environ.get("ZSADBENCH_PARITY_FULL") != "1":
        pytest.skip("full-size parity runs with ZSADBENCH_PARITY_FULL=1 (~830 MB weights, minutes on CPU)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    arch, size = CASES[case]
    state = clip_like_state_dict(arch, seed=0)
    weights = save_state_dict(state, tmp_path / f"{arch}.pt")

    ours = WinClip(model=arch, pretrained=str(weights), image_size=size)
    theirs = anomalib_winclip(arch, state, CLASS_NAME)

    images = torch.stack([ours.transform(im) for im in synthetic_images(4, seed=0, anomalous=(1, 3))])
    references = torch.stack([ours.transform(im) for im in synthetic_images(2, seed=7)])

    # prompts and text embeddings
    assert compositional_prompts(CLASS_NAME) == prompting.create_prompt_ensemble(CLASS_NAME)
    text_diff = (ours.text_features(CLASS_NAME) - theirs.text_embeddings).abs().max().item()
    assert text_diff < 1e-4

    with torch.no_grad():
        zero_ref = theirs(images)
    zero = ours.predict(images, CLASS_NAME)
    window_std = theirs.encode_image(images)[1][0].std(dim=1).mean().item()
    assert window_std > 0, "anomalib's window embeddings are identical: the batch-first fix did not apply"

    theirs.setup(reference_images=references)
    with torch.no_grad():
        few_ref = theirs(images)
    ours.set_reference(references, CLASS_NAME)
    few = ours.predict(images, CLASS_NAME)

    figures = {
        "case": case, "arch": arch, "image_size": size,
        "text_max_abs": text_diff,
        "zero_shot_score_max_abs": (zero.image_scores - zero_ref.pred_score).abs().max().item(),
        "zero_shot_map_max_abs": (zero.anomaly_maps - zero_ref.anomaly_map).abs().max().item(),
        "few_shot_score_max_abs": (few.image_scores - few_ref.pred_score).abs().max().item(),
        "few_shot_map_max_abs": (few.anomaly_maps - few_ref.anomaly_map).abs().max().item(),
        "map_spread": (zero_ref.anomaly_map.max() - zero_ref.anomaly_map.min()).item(),
    }
    print("\nwinclip parity " + json.dumps(figures))
    assert zero.anomaly_maps.shape == zero_ref.anomaly_map.shape
    for key in ("zero_shot_score_max_abs", "zero_shot_map_max_abs", "few_shot_score_max_abs", "few_shot_map_max_abs"):
        assert figures[key] < 1e-4, (key, figures)
    # the maps must actually vary, or the comparison says little
    assert figures["map_spread"] > 10 * figures["zero_shot_map_max_abs"]


def test_winclip_matches_a_recorded_anomalib_run() -> None:
    if not (RECORDING and RECORDING_WEIGHTS):
        pytest.skip("set ZSADBENCH_PARITY_WINCLIP (tests/parity/ref_winclip.py output) and "
                    "ZSADBENCH_PARITY_WINCLIP_WEIGHTS (its weights file)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = torch.load(RECORDING, weights_only=True)
    meta = ref["meta"]
    ours = WinClip(model=meta["arch"], pretrained=RECORDING_WEIGHTS, image_size=meta["image_size"])
    figures = {"arch": meta["arch"], "image_size": meta["image_size"],
               "window_embedding_std": ref["window_embedding_std"],
               "text_max_abs": (ours.text_features(meta["class_name"]) - ref["text_embeddings"]).abs().max().item()}
    zero = ours.predict(ref["images"], meta["class_name"])
    figures["zero_shot_score_max_abs"] = (zero.image_scores - ref["zero_shot_scores"]).abs().max().item()
    figures["zero_shot_map_max_abs"] = (zero.anomaly_maps - ref["zero_shot_maps"]).abs().max().item()
    if "reference_images" in ref:
        ours.set_reference(ref["reference_images"], meta["class_name"])
        few = ours.predict(ref["images"], meta["class_name"])
        figures["few_shot_score_max_abs"] = (few.image_scores - ref["few_shot_scores"]).abs().max().item()
        figures["few_shot_map_max_abs"] = (few.anomaly_maps - ref["few_shot_maps"]).abs().max().item()
    figures["map_spread"] = (ref["zero_shot_maps"].max() - ref["zero_shot_maps"].min()).item()
    print("\nwinclip parity (recording) " + json.dumps(figures))
    assert ref["window_embedding_std"] > 0, "the recording's window embeddings are identical: no window fix"
    assert zero.anomaly_maps.shape == ref["zero_shot_maps"].shape
    for key, value in figures.items():
        if key.endswith("_max_abs"):
            assert value < 1e-4, (key, figures)
    assert figures["map_spread"] > 10 * figures["zero_shot_map_max_abs"]
