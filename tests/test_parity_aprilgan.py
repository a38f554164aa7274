"""Parity of zsadbench's APRIL-GAN with ByChelsea/VAND-APRIL-GAN on identical weights, adapters and images (optional).

The reference runs outside the project: ``tests/parity/ref_aprilgan.py`` imports it from a checkout, replays its
test.py (zero-shot and 1-shot on three 518 px images of one category; ``--images`` and ``--image-size`` change them)
and one step of its train.py on a random
full-size ViT-L-14-336 state dict, with seeded random linear adapters saved in the authors' layout
(``<OUT>_adapters.pth``, the layout of mvtec_pretrained.pth). This test loads that file through ``--checkpoint``'s
loader, feeds the same raw images and normal images and compares (a few minutes on CPU)::

    python tests/parity/ref_aprilgan.py weights --out clip_rand_s0.pt
    python tests/parity/ref_aprilgan.py run --ref-root VAND-APRIL-GAN --weights clip_rand_s0.pt --out OUT.pt
    ZSADBENCH_PARITY_APRILGAN=OUT.pt ZSADBENCH_PARITY_APRILGAN_WEIGHTS=clip_rand_s0.pt \
        python -m pytest -m parity tests/test_parity_aprilgan.py -s

Compared: preprocessing, positional embedding, activation, text features, image features, raw patch tokens, per-layer
and summed zero-shot maps, image scores, the few-shot memory and its per-layer distance maps, the few-shot maps and
(min-max normalised) image scores, and one training step: per-layer focal and Dice losses, every adapter gradient and
the adapters after one Adam step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from adam_step import settled_elements
from PIL import Image

pytestmark = pytest.mark.parity

REF = os.environ.get("ZSADBENCH_PARITY_APRILGAN")
WEIGHTS = os.environ.get("ZSADBENCH_PARITY_APRILGAN_WEIGHTS")
if not (REF and WEIGHTS):
    pytest.skip("set ZSADBENCH_PARITY_APRILGAN (tests/parity/ref_aprilgan.py run output) and "
                "ZSADBENCH_PARITY_APRILGAN_WEIGHTS (its weights file)", allow_module_level=True)

from zsadbench.methods.aprilgan import AprilGAN  # noqa: E402

from zsadbench.detector import ImageSet  # noqa: E402
from zsadbench.types import Sample  # noqa: E402


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Returns max |ours - theirs| / max |theirs|."""
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


def test_aprilgan_matches_the_reference() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = torch.load(REF, weights_only=True)
    adapters = Path(REF).with_name(Path(REF).stem + "_adapters.pth")
    category = ref["category"]
    size = ref["image"].shape[-1]  # 518 unless the recording was made with --image-size
    detector = AprilGAN(pretrained=WEIGHTS, checkpoint=str(adapters), shots=len(ref["memory_indices"]),
                        image_size=size)
    figures: dict[str, float] = {}

    def diff(name: str, ours: torch.Tensor, theirs: torch.Tensor, rel: bool = False) -> None:
        figures[name] = relative(ours, theirs) if rel else (ours.double() - theirs.double()).abs().max().item()

    images = torch.stack([detector.transform(Image.fromarray(a.numpy())) for a in ref["images_uint8"]])
    assert torch.equal(images, ref["image"])
    assert ref["gelu"] == "GELU" and type(detector.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    diff("pos_embed", detector.clip.visual.positional_embedding, ref["pos_embed"])
    with torch.no_grad():
        diff("text_features", detector.text_features(category), ref["text_features"].T)
        image_features, patch_tokens = detector.encode_tokens(images, detector.config.feature_layers)
        diff("image_features", torch.nn.functional.normalize(image_features, dim=-1), ref["image_features"])
        diff("patch_tokens_rel", torch.stack([t[0] for t in patch_tokens]), ref["patch_tokens_first"][:, 1:], rel=True)
        layer_maps = torch.stack([p[:, 1] for p in detector.layer_probabilities(patch_tokens,
                                                                                detector.text_features(category))],
                                 dim=1)
        diff("zs_layer_maps", layer_maps, ref["layer_maps"])
        zero_shot = AprilGAN.predict(detector_with(detector, shots=0), images, category)
        diff("zs_map", zero_shot.anomaly_maps, ref["zs_map"])
        diff("zs_score", zero_shot.image_scores, ref["zs_score"])

        normals = torch.stack([detector.transform(Image.fromarray(ref["normals_uint8"][i].numpy()))
                               for i in ref["memory_indices"]])
        detector.set_reference(normals, category)
        for layer, (ours, theirs) in enumerate(zip(detector.memories[category], ref["memory_features"])):
            figures[f"memory_rel_{layer}"] = relative(ours, theirs)
        few_shot = detector.predict_set(ImageSet.from_tensor(images, batch_size=2), category)  # batches of 2 and 1
        diff("fs_map", few_shot.anomaly_maps, ref["fs_map"])
        diff("fs_distance", few_shot.anomaly_maps - zero_shot.anomaly_maps, ref["fs_layer_maps"].sum(1))
        diff("fs_score", few_shot.image_scores, ref["fs_score"])

    train = ref["train"]
    trained = AprilGAN(pretrained=WEIGHTS, checkpoint=str(adapters), image_size=size)
    trained.set_train_mode(True)
    optimizer = trained.make_optimizer()
    samples = [Sample(Path(f"{i}.png"), category, 1, None, "parity", "parity") for i in range(2)]
    losses = trained.training_step(images[:2], train["masks"], torch.tensor([1, 1]), samples)
    optimizer.zero_grad()
    losses["loss"].backward()
    figures["train_loss_rel"] = abs(losses["loss"].item() - train["loss"].item()) / train["loss"].item()
    figures["train_focal_rel"] = abs(losses["focal"].item() - train["focal"].sum().item()) / train["focal"].sum().item()
    figures["train_dice_rel"] = abs(losses["dice"].item() - train["dice"].sum().item()) / train["dice"].sum().item()
    named = dict(trained.adapters.named_parameters())
    assert set(named) == set(train["grads"])
    figures["grad_max_rel"] = max(relative(p.grad, train["grads"][k]) for k, p in named.items())
    figures["grad_max_abs"] = max((p.grad - train["grads"][k]).abs().max().item() for k, p in named.items())
    optimizer.step()
    # Adam's first step is ±lr·g/(|g| + eps): compare where the measured gradient error cannot move it (adam_step)
    group = optimizer.param_groups[0]
    settled = {k: settled_elements(train["grads"][k], figures["grad_max_abs"], group["lr"], group["eps"])
               for k in named}
    figures["after_step_settled_max_abs"] = max((p.detach() - train["after"][k])[settled[k]].abs().max().item()
                                                for k, p in named.items() if settled[k].any())
    figures["settled_fraction"] = sum(int(m.sum()) for m in settled.values()) / sum(m.numel() for m in settled.values())
    figures["after_step_max_abs"] = max((p.detach() - train["after"][k]).abs().max().item() for k, p in named.items())

    print("\naprilgan parity " + json.dumps(figures))
    assert figures["pos_embed"] < 1e-6 and figures["text_features"] < 1e-6 and figures["image_features"] < 1e-5
    assert figures["patch_tokens_rel"] < 1e-5 and max(v for k, v in figures.items() if k.startswith("memory_")) < 1e-5
    for key in ("zs_layer_maps", "zs_map", "zs_score", "fs_map", "fs_distance", "fs_score"):
        assert figures[key] <= 1e-4, key
    assert ref["zs_map"].std() > 100 * figures["zs_map"] and ref["fs_map"].std() > 100 * figures["fs_map"]
    assert figures["train_loss_rel"] < 1e-6 and figures["train_focal_rel"] < 1e-6 and figures["train_dice_rel"] < 1e-6
    assert figures["grad_max_rel"] < 1e-4
    assert figures["settled_fraction"] > 0.5 and figures["after_step_settled_max_abs"] < 1e-5
    assert figures["after_step_max_abs"] <= 2e-3 + 1e-6


def detector_with(detector: AprilGAN, **changes: object) -> AprilGAN:
    """Returns a shallow copy of ``detector`` with config fields changed (same backbone and adapters)."""
    from dataclasses import replace

    clone = object.__new__(AprilGAN)
    clone.__dict__.update(detector.__dict__)
    clone.config = replace(detector.config, **changes)
    clone.transductive = False  # type: ignore[misc]
    return clone
