"""Parity of zsadbench's VCP-CLIP with xiaozhen228/VCP-CLIP on identical weights, learned parts and images (optional).

The reference runs outside the project: ``tests/parity/ref_vcpclip.py`` imports it from a work tree, runs it on a
full-size random state dict with its own seeded random learned parts (saved in the authors' layout as
``<OUT stem>_vcpclip.pth``, the layout of the released ``train_visa.pth``), and records the intermediate tensors, the
maps, the image scores and (``--train``) one training step. This test loads the learned parts through
``--checkpoint``'s loader, feeds the same raw images and compares::

    python tests/parity/make_weights.py --arch ViT-L-14-336 --seed 0 --out clip_rand_s0.pt
    python tests/parity/ref_vcpclip.py --ref-root VCP-CLIP --weights clip_rand_s0.pt --out vcp_ref.pt --train \\
        [--image-size 518 --images 2]
    ZSADBENCH_PARITY_VCPCLIP=vcp_ref.pt ZSADBENCH_PARITY_VCPCLIP_WEIGHTS=clip_rand_s0.pt \\
        ZSADBENCH_PARITY_VCPCLIP_MODEL=ViT-L-14-336 python -m pytest -m parity -s tests/test_parity_vcpclip.py

Compared: preprocessing, positional embedding, global embedding and taps, pre-VCP class vectors, text features, the
raw and new maps, the smoothed map, the image scores; one training step's losses, every gradient and the parameters
after the two-group Adam step.
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

REF = os.environ.get("ZSADBENCH_PARITY_VCPCLIP")
WEIGHTS = os.environ.get("ZSADBENCH_PARITY_VCPCLIP_WEIGHTS")
MODEL = os.environ.get("ZSADBENCH_PARITY_VCPCLIP_MODEL", "ViT-L-14-336")
if not (REF and WEIGHTS):
    pytest.skip("set ZSADBENCH_PARITY_VCPCLIP (tests/parity/ref_vcpclip.py output) and "
                "ZSADBENCH_PARITY_VCPCLIP_WEIGHTS", allow_module_level=True)

from zsadbench.methods.vcpclip import REFERENCE_PARTS, TEXT_PART, VCPCLIP  # noqa: E402


def max_abs(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Returns max |ours - theirs| (shapes must agree)."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return (ours.double() - theirs.double()).abs().max().item()


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Returns max |ours - theirs| / max |theirs|."""
    return max_abs(ours, theirs) / max(theirs.double().abs().max().item(), 1e-30)


@pytest.fixture(scope="module")
def recording() -> dict:
    return torch.load(REF, weights_only=False)


def detector(recording: dict, **overrides: object) -> VCPCLIP:
    """Returns zsadbench's VCP-CLIP on the recording's weights, learned parts and image size."""
    learned = Path(REF).with_name(Path(REF).stem + "_vcpclip.pth")
    return VCPCLIP(model=MODEL, pretrained=WEIGHTS, checkpoint=str(learned), image_size=recording["image"].shape[-1],
                   feature_layers=tuple(recording.get("features", (6, 12, 18, 24))), **overrides)


def images_of(model: VCPCLIP, recording: dict) -> torch.Tensor:
    return torch.stack([model.transform(Image.fromarray(a.numpy())) for a in recording["images_uint8"]])


def test_vcpclip_matches_the_reference(recording: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = recording
    model = detector(ref)
    figures: dict[str, float] = {}
    images = images_of(model, ref)
    figures["preprocessing"] = max_abs(images, ref["image"])
    figures["pos_embed"] = max_abs(model.clip.visual.positional_embedding, ref["pos_embed"])
    seen: dict[str, object] = {}

    def recording_call(name: str, function):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            seen[name] = out = function(*args, **kwargs)
            return out
        return wrapped

    monkeypatch.setattr(model, "forward", recording_call("forward", model.forward))
    monkeypatch.setattr(model, "text_features", recording_call("text", model.text_features))
    pre_hook = model.pre_vcp.register_forward_hook(lambda m, i, o: seen.update(global_=i[0], context=o))
    import zsadbench.methods.vcpclip as module

    monkeypatch.setattr(module, "forward_vision", recording_call("vision", module.forward_vision))
    prediction = model.predict(images, "object")
    pre_hook.remove()
    vision = seen["vision"]
    figures["global_rel"] = relative(seen["global_"], ref["global"])  # type: ignore[arg-type]
    taps = torch.stack([vision.taps[k] for k in model.config.feature_layers], 1)  # type: ignore[attr-defined]
    figures["taps_rel"] = relative(taps, ref["taps"])
    figures["class_vectors_rel"] = relative(seen["context"], ref["class_token"])  # type: ignore[arg-type]
    figures["text_features"] = max_abs(seen["text"], ref["text_features"])  # type: ignore[arg-type]
    out = seen["forward"]
    raw = torch.stack([p[:, 1] for p in out.raw]).mean(0)  # type: ignore[attr-defined]
    new = torch.stack([p[:, 1] for p in out.new]).mean(0)  # type: ignore[attr-defined]
    figures["map_raw"] = max_abs(raw, ref["map_raw"])
    figures["map_new"] = max_abs(new, ref["map_new"])
    figures["map"] = max_abs(prediction.anomaly_maps, ref["map"])
    figures["score"] = max_abs(prediction.image_scores, ref["score"])
    figures["map_std_ref"] = ref["map"].std().item()
    figures["score_spread_ref"] = (ref["score"].max() - ref["score"].min()).item()
    print("\nvcpclip parity " + json.dumps(figures))
    assert figures["preprocessing"] == 0.0 and figures["pos_embed"] < 1e-6
    for key in ("global_rel", "taps_rel", "class_vectors_rel"):
        assert figures[key] < 1e-4, key
    assert figures["text_features"] < 1e-4
    for key in ("map_raw", "map_new", "map", "score"):
        assert figures[key] <= 1e-4, key
    assert figures["map_std_ref"] > 100 * figures["map"]  # the maps are not trivially flat


def test_vcpclip_training_step_matches_the_reference(recording: dict) -> None:
    if "train_loss" not in recording:
        pytest.skip("the recording has no training step (run ref_vcpclip.py with --train)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = recording
    model = detector(ref, prompt_dropout=0.0)
    model.set_train_mode(True)
    optimizer = model.make_optimizer()
    images = images_of(model, ref)[:2]
    losses = model.training_step(images, ref["train_mask"], torch.tensor([1, 0]))
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    named = {}  # the authors' names of the learned parameters
    for part, module in model.learnable_modules().items():
        for name, p in module.named_parameters():
            named[name if part == TEXT_PART else f"{REFERENCE_PARTS[part]}.{name}"] = p
    with_grad = {k for k, p in named.items() if p.grad is not None}
    assert with_grad == set(ref["train_grads"])
    optimizer.step()
    figures = {"loss": abs(losses["loss"].item() - ref["train_loss"].item()),
               "loss_raw": abs(losses["loss_raw"].item() - ref["train_loss_raw"].item()),
               "loss_new": abs(losses["loss_new"].item() - ref["train_loss_new"].item())}
    # some gradients are analytically zero and only float noise on both sides: the k bias of post-VCP (softmax over
    # the keys ignores a shift shared by all keys) and the Conv1d bias of pre-VCP (a constant added to every
    # channel of a token is removed by each LayerNorm and never reaches the end-of-text token); they are compared
    # in absolute terms against the largest gradient, the others relatively
    sizes = {k: ref["train_grads"][k].abs().max().item() for k in with_grad}
    scale = max(sizes.values())
    # (measured on ViT-B-16: the post-VCP v / output biases, ~1000x smaller than the largest gradient because the
    # normal and abnormal texts' contributions cancel, differ by up to 2 % relative, 5e-7 absolute)
    significant = {k for k in with_grad if sizes[k] > 1e-2 * scale}
    grads = {k: relative(named[k].grad, ref["train_grads"][k]) for k in significant}
    figures["grad_max_rel"] = max(grads.values())
    figures["grad_max_abs"] = max(max_abs(named[k].grad, ref["train_grads"][k]) for k in with_grad)
    figures["grad_largest"] = scale
    figures["params_after_max_abs"] = max(max_abs(p.detach(), ref["train_params_after"][k]) for k, p in named.items())
    # Adam's first step is ±lr·g/(|g| + eps): where the measured gradient error cannot move it (adam_step)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    settled = {k: settled_elements(ref["train_grads"][k], figures["grad_max_abs"], group_of[id(named[k])]["lr"],
                                   group_of[id(named[k])]["eps"]) for k in with_grad}
    figures["params_after_settled_max_abs"] = max(
        (named[k].detach() - ref["train_params_after"][k])[settled[k]].abs().max().item() for k in with_grad
        if settled[k].any())
    figures["settled_fraction"] = sum(int(m.sum()) for m in settled.values()) / sum(m.numel() for m in settled.values())
    print("\nvcpclip training-step parity " + json.dumps(figures))
    print("worst gradients " + json.dumps(sorted(grads.items(), key=lambda kv: -kv[1])[:3]))
    print("noise-level gradients (max |g| in the reference, max abs difference) " + json.dumps(
        {k: (sizes[k], max_abs(named[k].grad, ref["train_grads"][k])) for k in sorted(with_grad - significant)}))
    assert figures["loss"] < 1e-4 and figures["loss_raw"] < 1e-4 and figures["loss_new"] < 1e-4
    assert figures["grad_max_rel"] < 1e-3, sorted(grads.items(), key=lambda kv: -kv[1])[:3]
    assert figures["grad_max_abs"] < 1e-4 * scale
    assert figures["params_after_max_abs"] < 1e-4
    assert figures["settled_fraction"] > 0.5 and figures["params_after_settled_max_abs"] < 1e-5
