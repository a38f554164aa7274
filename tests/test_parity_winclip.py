"""Parity of zsadbench's WinCLIP with anomalib's ``WinClipModel`` on identical weights and inputs (optional).

Skipped unless anomalib is importable (``nox -s parity`` in an environment with anomalib and zsadbench). Both sides
get the same state-dict file and the same preprocessed tensor; image scores and anomaly maps must agree to 1e-4.

anomalib's window forward permutes tokens to (L, N, D) for open_clip < 2.26; with today's batch-first open_clip the
windows would attend across each other and all window embeddings come out identical (anomalib#2571, spec §4.1). The
test therefore sets ``clip.visual.transformer.batch_first = False`` for the duration of each
``_get_window_embeddings`` call (the residual blocks keep their own batch-first attention, so the transformer just
transposes back), which reproduces anomalib under open_clip 2.24. Without it the comparison would be against a bug.

The full-size check (ViT-B-16-plus-240, 240 px, ~830 MB of random weights, a few minutes on 2 CPU cores) runs when
``ZSADBENCH_PARITY_FULL=1``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.parity

torch_model = pytest.importorskip("anomalib.models.image.winclip.torch_model")
prompting = pytest.importorskip("anomalib.models.image.winclip.prompting")

from zsadbench.methods.winclip import WinClip  # noqa: E402

from zsadbench.clip.testing import clip_like_state_dict, save_state_dict, synthetic_images  # noqa: E402
from zsadbench.clip.text import compositional_prompts  # noqa: E402

CASES = {
    "tiny": ("tiny-ViT-B-16-plus-240", 80),
    "full": ("ViT-B-16-plus-240", 240),
}
CLASS_NAME = "metal_nut"  # the underscore becomes its own BPE token


def anomalib_winclip(monkeypatch: pytest.MonkeyPatch, arch: str, state: dict, class_name: str):
    """Returns anomalib's WinClipModel on ``arch`` with ``state`` loaded and the batch-first window fix applied."""
    monkeypatch.setattr(torch_model, "BACKBONE", arch)
    monkeypatch.setattr(torch_model, "PRETRAINED", None)  # build only; the weights come from ``state``
    model = torch_model.WinClipModel()  # no class name yet: text embeddings are computed after loading
    model.clip.load_state_dict(state, strict=True)
    transformer = model.clip.visual.transformer
    window_embeddings = model._get_window_embeddings

    def fixed_window_embeddings(feature_map, masks):
        if not getattr(transformer, "batch_first", False):  # open_clip < 2.26: anomalib is right as is
            return window_embeddings(feature_map, masks)
        transformer.batch_first = False
        try:
            return window_embeddings(feature_map, masks)
        finally:
            transformer.batch_first = True

    model._get_window_embeddings = fixed_window_embeddings
    model.setup(class_name)
    return model.eval()


@pytest.mark.parametrize("case", ["tiny", "full"])
def test_winclip_matches_anomalib(case: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case == "full" and os.environ.get("ZSADBENCH_PARITY_FULL") != "1":
        pytest.skip("full-size parity runs with ZSADBENCH_PARITY_FULL=1 (~830 MB weights, minutes on CPU)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    arch, size = CASES[case]
    state = clip_like_state_dict(arch, seed=0)
    weights = save_state_dict(state, tmp_path / f"{arch}.pt")

    ours = WinClip(model=arch, pretrained=str(weights), image_size=size)
    theirs = anomalib_winclip(monkeypatch, arch, state, CLASS_NAME)

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
