"""Parity of zsadbench's PromptAD with FuNz-0/PromptAD on identical full-size random weights, shots and contexts.

The reference runs outside the project (never vendored): ``tests/parity/ref_promptad.py`` runs its ``train_cls.fit``
and ``train_seg.fit`` in a separate process on the same ViT-B-16-plus-240 state dict, the same shots and test images
and the same initial prompt contexts (ours, seeded), for the same number of epochs (one SGD step each), and saves its
tensors. Set the reference checkout and, if the reference needs another environment, its Python::

    ZSADBENCH_PARITY_PROMPTAD=/path/to/PromptAD ZSADBENCH_PARITY_PROMPTAD_PYTHON=/path/to/venv/bin/python \\
        nox -s parity -- -k promptad          # ZSADBENCH_PARITY_PROMPTAD_EPOCHS (default 3), a few minutes on CPU

``ZSADBENCH_PARITY_PROMPTAD_SHOTS`` (default 1) and ``ZSADBENCH_PARITY_PROMPTAD_IMAGES`` (test images, default 2,
the second one anomalous) size the check.

Compared (max abs difference, printed as JSON): the preprocessed images (equal), the four image features, the learned
contexts and text classifiers of both prompt sets after the fit, the visual and textual grids, the 400 px maps and
the image scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.parity

REF = os.environ.get("ZSADBENCH_PARITY_PROMPTAD")
if not REF:
    pytest.skip("set ZSADBENCH_PARITY_PROMPTAD to a checkout of FuNz-0/PromptAD (and ZSADBENCH_PARITY_PROMPTAD_PYTHON "
                "to the Python that imports it)", allow_module_level=True)
PYTHON = os.environ.get("ZSADBENCH_PARITY_PROMPTAD_PYTHON", sys.executable)
EPOCHS = int(os.environ.get("ZSADBENCH_PARITY_PROMPTAD_EPOCHS", "3"))
DRIVER = Path(__file__).parent / "parity" / "ref_promptad.py"

from zsadbench.methods.promptad import PromptAD  # noqa: E402

from zsadbench.clip.testing import clip_like_state_dict, save_state_dict, synthetic_images  # noqa: E402

CATEGORY = "metal_nut"  # class word "metal nut", a category-specific state with a trailing space
SHOTS = int(os.environ.get("ZSADBENCH_PARITY_PROMPTAD_SHOTS", "1"))
TEST_IMAGES = int(os.environ.get("ZSADBENCH_PARITY_PROMPTAD_IMAGES", "2"))  # >= 2: both classes for its AUROCs
TOLERANCE = 1e-4


def test_promptad_matches_the_reference(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    weights = save_state_dict(clip_like_state_dict("ViT-B-16-plus-240", seed=0), tmp_path / "clip.pt")
    detector = PromptAD(pretrained=str(weights), shots=SHOTS, **{"fit.epochs": EPOCHS, "fit.progress": False})
    pictures = synthetic_images(SHOTS + TEST_IMAGES, seed=3, anomalous=(SHOTS + 1,))
    arrays = torch.from_numpy(np.stack([np.asarray(p) for p in pictures]))
    labels = [0] * SHOTS + [int(i == 1) for i in range(TEST_IMAGES)]
    masks = torch.zeros(len(pictures), *arrays.shape[1:3], dtype=torch.uint8)
    masks[SHOTS + 1, 100:140, 120:170] = 255  # the reference's per-epoch pixel AUROC needs both classes
    initial = {}
    for task, n_prompts in (("cls", detector.config.n_prompts_image), ("seg", detector.config.n_prompts_map)):
        prompts = detector.make_prompts(CATEGORY, n_prompts)  # seeded: the same contexts set_reference starts from
        initial[f"{task}_normal_ctx"] = prompts.normal_ctx.detach().clone()
        initial[f"{task}_abnormal_ctx"] = prompts.abnormal_ctx.detach().clone()
    inputs = {"category": CATEGORY, "epochs": EPOCHS, "shots_uint8": arrays[:SHOTS], "test_uint8": arrays[SHOTS:],
              "labels": labels[SHOTS:], "masks_uint8": masks[SHOTS:], **initial}
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([PYTHON, str(DRIVER), "--ref-root", REF, "--weights", str(weights), "--inputs",
                    str(tmp_path / "inputs.pt"), "--out", str(tmp_path / "ref.pt")], check=True)
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)

    shots = torch.stack([detector.transform(p) for p in pictures[:SHOTS]])
    images = torch.stack([detector.transform(p) for p in pictures[SHOTS:]])
    assert torch.equal(images, ref["image"])
    figures: dict[str, float] = {}

    def diff(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        figures[name] = (ours.double() - theirs.double()).abs().max().item()

    features = detector.encode(images)
    for index, name in enumerate(("global_feature", "patch_tokens", "memory_1", "memory_2")):
        ours = [features.global_feature, features.patch_tokens, *features.memory][index]
        diff(name, ours, ref["cls_features"][index])

    captured: dict[str, torch.nn.Module] = {}
    make_prompts = detector.make_prompts

    def keep(category: str, n_prompts: int):  # noqa: ANN202 - records the fitted prompt sets
        prompts = make_prompts(category, n_prompts)
        captured["cls" if n_prompts == detector.config.n_prompts_image else "seg"] = prompts
        return prompts

    detector.make_prompts = keep  # type: ignore[method-assign]
    detector.set_reference(shots, CATEGORY)
    fitted = detector.categories[CATEGORY]
    for task, text in (("cls", fitted.image_text), ("seg", fitted.map_text)):
        diff(f"{task}_normal_ctx", captured[task].normal_ctx.detach(), ref[f"{task}_normal_ctx"])
        diff(f"{task}_abnormal_ctx", captured[task].abnormal_ctx.detach(), ref[f"{task}_abnormal_ctx"])
        diff(f"{task}_text_features", text, ref[f"{task}_text_features"])
    text_image, text_patch, visual = detector.score_grids(images, CATEGORY)
    grid = detector.backbone.grid_size
    diff("visual_grid", visual.reshape(-1, *grid), ref["visual_grid"])
    diff("textual_patch_grid", text_patch.reshape(-1, *grid), ref["seg_text_grid"])
    diff("textual_image_scores", text_image, ref["cls_text_scores"])
    prediction = detector.predict_at(images, CATEGORY, 400)
    diff("maps_400", prediction.anomaly_maps, ref["maps"])
    diff("image_scores", prediction.image_scores, ref["image_scores"])
    print(json.dumps({"epochs": EPOCHS, "shots": SHOTS, "test_images": TEST_IMAGES, **figures}, indent=1))
    assert max(figures.values()) <= TOLERANCE, figures
