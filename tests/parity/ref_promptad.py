"""Reference side of the PromptAD parity check: runs FuNz-0/PromptAD's own fit and scoring, saves its tensors.

Runs in an environment where the reference imports (its CLIPAD copy of open_clip, cv2, loguru, seaborn, scikit-image);
never imports zsadbench, so the two sides share nothing but the files::

    python tests/parity/ref_promptad.py --ref-root PromptAD --weights clip.pt --inputs inputs.pt --out ref.pt

``--weights`` is a ViT-B-16-plus-240 state dict; ``--inputs`` (written by tests/test_parity_promptad.py) holds the
category, the shots and test images as uint8 RGB arrays, the initial prompt contexts of both prompt sets and the number
of epochs. The driver builds two ``PromptAD.PromptAD`` models (image prompts n_pro=3, map prompts n_pro=1, as
train_cls.py / train_seg.py), loads the weights, swaps in the given initial contexts, and calls the reference's
``train_cls.fit`` and ``train_seg.fit`` (its SGD, cosine schedule, losses, per-epoch text gallery) with the shots as
the training loader and the test images as its (per-epoch evaluation) test loader. Adjustments, all outside the
computation compared:

- fp32: the reference hard-codes fp16 (``self.precision = 'fp16'``); the model is built in fp32, ``precision`` set to
  'fp32' and its fp16 buffers cast back; ``logit_scalef`` (a typo on the reference's fp32 path) aliases
  ``logit_scale``. Its ``PromptLearner`` receives that forced 'fp16' as ``pre`` (fp16 contexts, fp16 token-embedding
  buffers, fp16 SGD updates: 3e-5 steps at the contexts' size); the driver passes 'fp32' instead, the learner's own
  fp32 branch.
- The shots are handed to ``fit`` in BGR order (it converts them to RGB); the test images are handed in RGB, so both
  sides see the same pixels (the reference's test loop feeds cv2's BGR arrays unconverted).
- After ``fit`` the model holds the prompts of the last epoch (its best-epoch checkpoint file is not reloaded).

Saved: preprocessed test tensor, the four encode_image features of the test images, the learned contexts and text
galleries of both models, the visual maps and textual image scores (``forward(..., 'cls')``), the fused and smoothed
maps (``forward(..., 'seg')``) and the image scores of ``utils.metrics.metric_cal_img`` (its fusion line, applied to
the same arrays).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image


def parse_args() -> argparse.Namespace:
    """Returns the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-root", required=True, help="checkout of github.com/FuNz-0/PromptAD")
    parser.add_argument("--weights", required=True, help="ViT-B-16-plus-240 state dict (.pt)")
    parser.add_argument("--inputs", required=True, help="inputs file written by tests/test_parity_promptad.py")
    parser.add_argument("--out", required=True, help="output .pt file")
    return parser.parse_args()


def build_model(promptad_model, clipad, state: dict, category: str, shots: int, n_pro: int, normal_ctx: torch.Tensor,
                abnormal_ctx: torch.Tensor):  # noqa: ANN201 - the reference's PromptAD module
    """Returns the reference's PromptAD model in fp32 with ``state`` loaded and the given initial contexts."""
    original = clipad.create_model_and_transforms

    def create_fp32(model_name: str, pretrained: str | None = None, precision: str = "fp32", **kwargs):  # noqa: ANN202
        del pretrained, precision  # the weights come from ``state``; fp32 instead of the forced fp16
        model, train_tf, val_tf = original(model_name, None, precision="fp32", **kwargs)
        model.load_state_dict(state, strict=True)
        return model, train_tf, val_tf

    learner = promptad_model.PromptLearner

    class PromptLearnerFP32(learner):  # type: ignore[misc, valid-type] - the reference's class, its own fp32 branch
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            args = (*args[:-1], "fp32") if len(args) == 7 else args  # PromptAD passes its forced 'fp16' as ``pre``
            kwargs = kwargs | ({"pre": "fp32"} if "pre" in kwargs else {})
            super().__init__(*args, **kwargs)

    clipad.create_model_and_transforms = create_fp32
    promptad_model.PromptLearner = PromptLearnerFP32
    try:
        model = promptad_model.PromptAD(out_size_h=400, out_size_w=400, device="cpu", backbone="ViT-B-16-plus-240",
                                        pretrained_dataset="laion400m_e32", n_ctx=4, n_pro=n_pro, n_ctx_ab=1,
                                        n_pro_ab=4, class_name=category, precision="fp32", k_shot=shots,
                                        img_resize=240, img_cropsize=240)
    finally:
        clipad.create_model_and_transforms = original
        promptad_model.PromptLearner = learner
    assert model.prompt_learner.normal_ctx.dtype == torch.float32, "the prompt learner must be fp32"
    model.precision = "fp32"
    model.feature_gallery1 = model.feature_gallery1.float()
    model.feature_gallery2 = model.feature_gallery2.float()
    model.text_features = model.text_features.float()
    model.model.logit_scalef = model.model.logit_scale  # train_*.py's fp32 branch reads this misspelt attribute
    with torch.no_grad():
        model.prompt_learner.normal_ctx.copy_(normal_ctx)
        model.prompt_learner.abnormal_ctx.copy_(abnormal_ctx)
    return model


def main() -> None:
    """Runs both reference fits and saves the tensors."""
    args = parse_args()
    root = Path(args.ref_root).resolve()
    sys.path.insert(0, str(root))
    import train_cls  # noqa: PLC0415 - the reference, from --ref-root
    import train_seg  # noqa: PLC0415
    from PromptAD import model as promptad_model  # noqa: PLC0415

    torch.set_num_threads(1)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    inputs = torch.load(args.inputs, weights_only=False)
    category, epochs = inputs["category"], int(inputs["epochs"])
    shots_rgb, test_rgb = inputs["shots_uint8"], inputs["test_uint8"]
    labels = torch.as_tensor(inputs["labels"])
    masks = torch.as_tensor(inputs["masks_uint8"])  # (N, H, W), 255 = defect
    shots = shots_rgb.shape[0]

    def loader(images: torch.Tensor, image_labels: torch.Tensor, image_masks: torch.Tensor) -> list:
        names = [f"{category}-{i}" for i in range(len(images))]
        types = ["good" if int(v) == 0 else "defect" for v in image_labels]
        return [(images, image_masks, image_labels, names, types)]

    train_loader = loader(shots_rgb.flip(-1), torch.zeros(shots, dtype=torch.long),
                          torch.zeros(shots, *shots_rgb.shape[1:3], dtype=torch.uint8))  # BGR: fit converts to RGB
    test_loader = loader(test_rgb, labels, masks)
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task, module, n_pro in (("cls", train_cls, 3), ("seg", train_seg, 1)):
            torch.manual_seed(0)
            model = build_model(promptad_model, promptad_model.CLIPAD, state, category, shots, n_pro,
                                inputs[f"{task}_normal_ctx"], inputs[f"{task}_abnormal_ctx"])
            fit_args = SimpleNamespace(Epoch=epochs, lr=0.002, momentum=0.9, weight_decay=0.0005, lambda1=0.001,
                                       resolution=400, vis=False)
            extra = {"img_dir": tmp} if task == "seg" else {}
            module.fit(model, fit_args, test_loader, "cpu", check_path=f"{tmp}/{task}.pt", train_data=train_loader,
                       **extra)
            data = torch.stack([model.transform(Image.fromarray(a.numpy())) for a in test_rgb])
            out["image"] = data
            with torch.no_grad():
                features = model.encode_image(data)
                out[f"{task}_features"] = [f.clone() for f in features]
                out[f"{task}_normal_ctx"] = model.prompt_learner.normal_ctx.detach().clone()
                out[f"{task}_abnormal_ctx"] = model.prompt_learner.abnormal_ctx.detach().clone()
                out[f"{task}_text_features"] = model.text_features.detach().clone()
                if task == "cls":
                    text_scores, visual_maps = model(data, "cls")
                    text_scores = np.asarray(text_scores, dtype=np.float64)
                    visual_maps = np.stack(visual_maps)
                    out["cls_text_scores"] = torch.from_numpy(text_scores)
                    out["cls_visual_maps"] = torch.from_numpy(visual_maps)
                    # utils/metrics.py metric_cal_img: 1 / (1 / max(visual map) + 1 / textual score)
                    max_map = visual_maps.reshape(visual_maps.shape[0], -1).max(axis=1)
                    out["image_scores"] = torch.from_numpy(1.0 / (1.0 / max_map + 1.0 / text_scores))
                    out["visual_grid"] = model.calculate_visual_anomaly_score(features)[:, 0].clone()
                else:
                    out["maps"] = torch.from_numpy(np.stack(model(data, "seg")))
                    out["seg_text_grid"] = model.calculate_textual_anomaly_score(features, "seg")[:, 0].clone()
    torch.save(out, args.out)
    print(f"saved {args.out}: {sorted(out)}")


if __name__ == "__main__":
    main()
