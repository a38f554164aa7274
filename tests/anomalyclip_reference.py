"""Comparison of an AnomalyCLIP-family detector with the outputs of the zqhang/AnomalyCLIP parity driver.

Shared by the AnomalyCLIP and HeadCLIP parity tests: the driver (tests/parity/ref_anomalyclip.py) saves the
reference's inputs and every intermediate tensor; :func:`compare_inference` feeds the same
raw images through the detector and returns the max abs (and relative) differences per tensor.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from PIL import Image
from zsadbench.methods.anomalyclip import AnomalyCLIP

from zsadbench.clip.dual_path import forward_dual_path
from zsadbench.clip.scoring import class_probabilities, patch_probability_maps
from zsadbench.data import resize_mask
from zsadbench.filters import gaussian_filter


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Returns max |ours - ref| / max |ref|."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def compare_inference(detector: AnomalyCLIP, ref: dict) -> dict[str, float]:
    """Returns the differences of stages 1-8 of test_parity_anomalyclip.py (``layers_max_rel`` when layers were dumped).

    A detector with learnable head weights (HeadCLIP) runs its dual path with them; its image score must then be the
    global probability (``jas.alpha`` 1) to compare with the reference's.
    """
    visual, learner = detector.clip.visual, detector.prompt_learner
    head_weights = getattr(detector, "head_weights", None)
    figures: dict[str, float] = {}
    images = torch.stack([detector.transform(Image.fromarray(a.numpy())) for a in ref["images_uint8"]])
    masks = torch.stack([torch.from_numpy(resize_mask(m.numpy() > 0, (518, 518))).float() for m in ref["masks_uint8"]])
    assert torch.equal(images, ref["image"]) and torch.equal(masks, ref["gt_mask"][:, 0])  # row 1
    figures["pos_embed"] = (visual.positional_embedding - ref["pos_embed_interp"]).abs().max().item()  # row 2
    assert torch.equal(learner.token_ids.to(torch.int32), ref["tokenized_prompts"])
    assert torch.equal(learner.input_embeddings(), ref["prompts"])
    with torch.no_grad():
        text = learner(detector.clip)
    figures["text_raw"] = (text - ref["text_features_raw"]).abs().max().item()  # row 3
    figures["text"] = (F.normalize(text, dim=-1) - ref["text_features"][0]).abs().max().item()

    dumped = sorted(int(k.split("_")[-1]) for k in ref if k.startswith("layer_o_"))
    layers: dict[str, float] = {}
    for i in range(len(images)):
        with torch.no_grad():
            vv_taps = tuple(sorted({24, *(layer for layer in dumped if layer >= 6)}))
            out = forward_dual_path(visual, images[i:i + 1], vv_taps=vv_taps, original_taps=tuple(dumped),
                                    head_weights=head_weights)
            for layer in dumped:  # row 4
                layers[f"o_{layer}"] = max(layers.get(f"o_{layer}", 0.0),
                                           relative(out.original_taps[layer][0], ref[f"layer_o_{layer}"][i]))
                if layer >= 6:
                    layers[f"v_{layer}"] = max(layers.get(f"v_{layer}", 0.0),
                                               relative(out.vv_taps[layer][0], ref[f"layer_v_{layer}"][i]))
            patch = out.patch_features(visual, [24])[0]
            rows = {  # rows 5-8
                "image_features_raw": out.global_feature[0],
                "patch_tokens_raw": patch[0],
                "prob_map_37": class_probabilities(patch[:, 1:], text, 0.07)[0].reshape(37, 37, 2).permute(2, 0, 1),
                "similarity_map_518": patch_probability_maps(patch, text, 0.07, (518, 518))[0],
            }
            prediction = detector.predict(images[i:i + 1], "parity")
        rows["image_score"] = prediction.image_scores[0]
        rows["anomaly_map_smoothed"] = prediction.anomaly_maps[0]
        s = rows["similarity_map_518"]
        rows["anomaly_map_518"] = (s[1] + 1 - s[0]) / 2
        assert torch.equal(gaussian_filter(rows["anomaly_map_518"], 4.0), rows["anomaly_map_smoothed"])
        for key, value in rows.items():
            diff = (value - ref[key][i]).abs().max().item()
            figures[key] = max(figures.get(key, 0.0), diff)
            if key.endswith("_raw"):
                figures[key + "_rel"] = max(figures.get(key + "_rel", 0.0), relative(value, ref[key][i]))
    if layers:
        figures["layers_max_rel"] = max(layers.values())
    return figures


def assert_inference_parity(figures: dict[str, float], ref: dict) -> None:
    """Asserts the per-stage tolerances on :func:`compare_inference`'s figures."""
    assert figures["pos_embed"] <= 1e-6
    assert figures["text_raw"] < 1e-5 * ref["text_features_raw"].abs().max().item() + 1e-5 and figures["text"] < 1e-5
    assert "layers_max_rel" not in figures or figures["layers_max_rel"] < 1e-4
    assert figures["image_features_raw_rel"] < 1e-5 and figures["patch_tokens_raw_rel"] < 1e-5
    for key in ("prob_map_37", "similarity_map_518", "anomaly_map_518", "anomaly_map_smoothed", "image_score"):
        assert figures[key] < 1e-5, key
    assert ref["anomaly_map_smoothed"].std() > 100 * figures["anomaly_map_smoothed"]  # not a comparison of constants


def check_training_step(detector: AnomalyCLIP, ref: dict, step: dict) -> dict[str, float]:
    """Asserts row 9: one reference training step (train.py) on the same images, masks and prompts."""
    index = step["images_index"].tolist()
    learner = detector.prompt_learner
    detector.set_train_mode(True)
    optimizer = detector.make_optimizer()
    losses = detector.training_step(ref["image"][index], ref["gt_mask"][index][:, 0], ref["labels"][index])
    optimizer.zero_grad()
    losses["loss"].backward()
    figures = {f"loss_{k}": abs(losses[k].item() - step[r].item()) / abs(step[r].item()) for k, r in (
        ("loss", "total"), ("image_loss", "image_loss"), ("focal", "focal"), ("dice_abnormal", "dice_abnormal"),
        ("dice_normal", "dice_normal"))}
    figures["grad_ctx"] = max(relative(learner.ctx_pos.grad, step["grad_ctx_pos"]),
                              relative(learner.ctx_neg.grad, step["grad_ctx_neg"]))
    # deep-prompt gradients are rounded to fp16 per sequence on both sides: float round-off before the rounding
    # flips single fp16 steps, so compare the share of bit-equal elements and the size of the rest
    equal, total, deep = 0, 0, 0.0
    for i, prompt in enumerate(learner.compound_prompts_text):
        reference_grad = step[f"grad_compound_prompts_text.{i}"]
        equal += int((prompt.grad == reference_grad).sum())
        total += reference_grad.numel()
        deep = max(deep, relative(prompt.grad, reference_grad))
    figures["grad_deep_equal_share"], figures["grad_deep_rel"] = equal / total, deep
    optimizer.step()
    figures["after_step"] = max(relative(learner.ctx_pos.detach(), step["after_ctx_pos"]),
                                relative(learner.ctx_neg.detach(), step["after_ctx_neg"]),
                                *(relative(p.detach(), step[f"after_compound_prompts_text.{i}"])
                                  for i, p in enumerate(learner.compound_prompts_text)))
    print(f"{detector.name} training-step parity " + json.dumps(figures))
    assert max(v for k, v in figures.items() if k.startswith("loss_")) < 1e-6
    assert figures["grad_ctx"] < 1e-4
    assert figures["grad_deep_equal_share"] > 0.95 and figures["grad_deep_rel"] < 1e-3
    assert figures["after_step"] < 1e-4
    return figures
