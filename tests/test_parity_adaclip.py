"""Parity of zsadbench's AdaCLIP with caoyunkang/AdaCLIP on identical weights, learned parts and images (optional).

The reference runs outside the project: ``tests/parity/ref_adaclip.py`` imports it from a work tree, runs it on a
full-size random ViT-L-14-336 state dict with its own (seeded) random learned parts, records every intermediate tensor
and saves the learned parts in the authors' layout (``<OUT stem>_adaclip.pth``, the layout of the released
``pretrained_*.pth``). This test loads that file through ``--checkpoint``'s loader, feeds the same raw images and
compares (several minutes on 2 CPU cores)::

    python -c "from zsadbench.clip.testing import clip_like_state_dict, save_state_dict; \\
               save_state_dict(clip_like_state_dict('ViT-L-14-336', seed=0), 'clip_rand_s0.pt')"
    python tests/parity/ref_adaclip.py --ref-root AdaCLIP --weights clip_rand_s0.pt --out adaclip_ref.pt --train \\
        [--image-size 392 --images 1]   # the method's 518 px by default; a smaller size for busy CPUs
    ZSADBENCH_PARITY_ADACLIP=adaclip_ref.pt ZSADBENCH_PARITY_ADACLIP_WEIGHTS=clip_rand_s0.pt \\
        python -m pytest -m parity -s tests/test_parity_adaclip.py

Compared: preprocessing, positional embedding, dynamic prompts, prompted CLS embedding and taps, text features, the
projected tokens, the HSF feature, the maps before and after smoothing, the image scores, and (when the recording has
``--train``) one training step: the loss, every learned parameter's gradient and its value after the AdamW step.
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

REF = os.environ.get("ZSADBENCH_PARITY_ADACLIP")
WEIGHTS = os.environ.get("ZSADBENCH_PARITY_ADACLIP_WEIGHTS")
if not (REF and WEIGHTS):
    pytest.skip("set ZSADBENCH_PARITY_ADACLIP (tests/parity/ref_adaclip.py output) and "
                "ZSADBENCH_PARITY_ADACLIP_WEIGHTS", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from zsadbench.methods import adaclip as adaclip_module  # noqa: E402
from zsadbench.methods.adaclip import AdaCLIP  # noqa: E402


def max_abs(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Returns max |ours - theirs| (shapes must agree)."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return (ours.double() - theirs.double()).abs().max().item()


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Returns max |ours - theirs| / max |theirs|."""
    return max_abs(ours, theirs) / theirs.double().abs().max().item()


@pytest.fixture(scope="module")
def recording() -> dict:
    return torch.load(REF, weights_only=False)


def detector(recording: dict) -> AdaCLIP:
    """Returns zsadbench's AdaCLIP on the recording's weights, learned parts and image size (518 by default)."""
    learned = Path(REF).with_name(Path(REF).stem + "_adaclip.pth")
    return AdaCLIP(pretrained=WEIGHTS, checkpoint=str(learned), image_size=recording["image"].shape[-1])


def test_adaclip_matches_the_reference(recording: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = recording
    model = detector(ref)
    category = ref["class_name"]
    figures: dict[str, float] = {}
    images = torch.stack([model.transform(Image.fromarray(a.numpy())) for a in ref["images_uint8"]])
    figures["preprocessing"] = max_abs(images, ref["image"])
    figures["pos_embed"] = max_abs(model.clip.visual.positional_embedding, ref["pos_embed"])

    # one predict() (a full-size pass is minutes on CPU): its steps are recorded on the way
    seen: dict[str, object] = {}

    def recording_call(name: str, function):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            seen[name] = out = function(*args, **kwargs)
            return out
        return wrapped

    monkeypatch.setattr(model, "dynamic_prompts", recording_call("dynamic", model.dynamic_prompts))
    monkeypatch.setattr(model, "text_features", recording_call("text", model.text_features))
    monkeypatch.setattr(model, "forward", recording_call("forward", model.forward))
    monkeypatch.setattr(adaclip_module, "forward_prompted_vision",
                        recording_call("vision", adaclip_module.forward_prompted_vision))
    monkeypatch.setattr(adaclip_module, "hybrid_semantic_fusion",
                        recording_call("hsf", adaclip_module.hybrid_semantic_fusion))
    monkeypatch.setattr(model.patch_token_layer, "each", recording_call("patches", model.patch_token_layer.each))
    cls_hook = model.cls_token_layer.head[0].register_forward_hook(lambda m, i, o: seen.__setitem__("cls", o))
    prediction = model.predict(images, category)
    cls_hook.remove()

    dynamic_visual, dynamic_text = seen["dynamic"]  # type: ignore[misc]
    figures["dynamic_visual_prompts_rel"] = relative(dynamic_visual, ref["dynamic_visual_prompts"])
    figures["dynamic_text_prompts_rel"] = relative(dynamic_text, ref["dynamic_text_prompts"])
    vision = seen["vision"]
    figures["prompted_cls_rel"] = relative(vision.pooled, ref["pooled"])  # type: ignore[attr-defined]
    taps = torch.stack([vision.taps[k] for k in model.config.feature_layers], 1)  # type: ignore[attr-defined]
    figures["taps_rel"] = relative(taps, ref["patch_tokens"])
    figures["text_features"] = max_abs(seen["text"], ref["text_features"].transpose(1, 2))  # type: ignore[arg-type]
    patches = torch.stack([F.normalize(t, dim=-1) for t in seen["patches"]], 1)  # type: ignore[attr-defined]
    figures["proj_patch_tokens"] = max_abs(patches, ref["proj_patch_tokens"])
    figures["proj_cls"] = max_abs(F.normalize(seen["cls"], dim=-1), ref["proj_cls"])  # type: ignore[arg-type]
    figures["hsf_feature"] = max_abs(seen["hsf"], ref["hsf_feature"])  # type: ignore[arg-type]
    probabilities = torch.stack(seen["forward"].layer_logits, 1).mean(1).softmax(1)  # type: ignore[attr-defined]
    figures["map_before_smoothing"] = max_abs((probabilities[:, 1] + 1 - probabilities[:, 0]) / 2, ref["map"])
    figures["map"] = max_abs(prediction.anomaly_maps, ref["map_smoothed"])
    figures["score"] = max_abs(prediction.image_scores, ref["score"])
    figures["map_std_ref"] = ref["map_smoothed"].std().item()
    figures["score_spread_ref"] = (ref["score"].max() - ref["score"].min()).item()
    print("\nadaclip parity " + json.dumps(figures))
    assert figures["preprocessing"] == 0.0 and figures["pos_embed"] < 1e-6
    for key in ("dynamic_visual_prompts_rel", "dynamic_text_prompts_rel", "prompted_cls_rel", "taps_rel"):
        assert figures[key] < 1e-4, key
    for key in ("text_features", "proj_patch_tokens", "proj_cls", "hsf_feature"):
        assert figures[key] < 1e-4, key
    assert figures["map_before_smoothing"] <= 1e-4 and figures["map"] <= 1e-4 and figures["score"] <= 1e-4
    assert figures["map_std_ref"] > 100 * figures["map"]  # the maps are not trivially flat


def test_adaclip_training_step_matches_the_reference(recording: dict) -> None:
    if "train_loss" not in recording:
        pytest.skip("the recording has no training step (run ref_adaclip.py with --train)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = recording
    model = detector(ref)
    model.set_train_mode(True)
    optimizer = model.make_optimizer()
    image = torch.stack([model.transform(Image.fromarray(ref["images_uint8"][0].numpy()))])
    losses = model.category_losses(image, ref["train_mask"][None], torch.tensor([1]), ref["class_name"])
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    named = {f"clip_model.{part}.{name}": p for part, module in model.learnable_modules().items()
             for name, p in module.named_parameters()}
    with_grad = {k for k, p in named.items() if p.grad is not None}
    assert with_grad == set(ref["train_grads"])  # the same parameters are reached (not text static prompts 0)
    optimizer.step()
    figures = {"loss": abs(losses["loss"].item() - ref["train_loss"].item()),
               "loss_rel": abs(losses["loss"].item() - ref["train_loss"].item()) / ref["train_loss"].item()}
    grads = {k: relative(named[k].grad, ref["train_grads"][k]) for k in with_grad}
    figures["grad_max_rel"] = max(grads.values())
    figures["grad_max_abs"] = max(max_abs(named[k].grad, ref["train_grads"][k]) for k in with_grad)
    figures["params_after_max_abs"] = max(max_abs(p.detach(), ref["train_params_after"][k]) for k, p in named.items())
    # AdamW's first step is ±lr·g/(|g| + eps): compare where the measured gradient error cannot move it (adam_step)
    group = optimizer.param_groups[0]
    settled = {k: settled_elements(ref["train_grads"][k], figures["grad_max_abs"], group["lr"], group["eps"])
               for k in with_grad}
    figures["params_after_settled_max_abs"] = max(
        (named[k].detach() - ref["train_params_after"][k])[settled[k]].abs().max().item() for k in with_grad
        if settled[k].any())
    figures["settled_fraction"] = sum(int(m.sum()) for m in settled.values()) / sum(m.numel() for m in settled.values())
    print("\nadaclip training-step parity " + json.dumps(figures))
    print("worst gradients " + json.dumps(sorted(grads.items(), key=lambda kv: -kv[1])[:3]))
    assert figures["loss_rel"] < 1e-5
    assert figures["grad_max_rel"] < 1e-3, sorted(grads.items(), key=lambda kv: -kv[1])[:3]
    assert figures["settled_fraction"] > 0.5 and figures["params_after_settled_max_abs"] < 1e-5
    assert figures["params_after_max_abs"] <= 2 * model.config.train.lr + 1e-6
