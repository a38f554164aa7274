#!/usr/bin/env python
"""Reference side of the AdaCLIP parity check: runs caoyunkang/AdaCLIP on given weights and records every tensor.

Nothing of the reference is copied: its modules are imported from the checkout given with ``--ref-root`` (the
``method`` package and ``loss.py``). Run it in an environment with torch, scikit-learn, scipy, ftfy, regex and
setuptools (``pkg_resources``); ``cv2`` and the reference's ``tools`` package (plotting, metrics, tensorboard) are only
used by its evaluation loop and are replaced by empty modules when missing::

    python -c "from zsadbench.clip.testing import clip_like_state_dict, save_state_dict; \\
               save_state_dict(clip_like_state_dict('ViT-L-14-336', seed=0), 'clip_rand_s0.pt')"
    python tests/parity/ref_adaclip.py --ref-root AdaCLIP --weights clip_rand_s0.pt --out adaclip_ref.pt

What it does, with the reference's own code for every step:

- builds the reference CLIP as its ``create_model`` does (``CLIP(**model_configs/ViT-L-14-336.json)`` at 518 px,
  exact GELU, the state dict's positional embedding resized by its ``resize_pos_embed``), then ``AdaCLIP`` with the
  ``train.py`` defaults (prompt length 5, depth 4, SD / VL, HSF with 20 clusters, layers 6/12/18/24); the learned parts
  keep the reference's own initialisation under ``torch.manual_seed(--seed)`` and are saved in the authors' layout
  (``clip_model.<part>.<key>``, as ``AdaCLIP_Trainer.save`` writes them) to ``<out stem>_adaclip.pth``;
- the reference's k-means is unseeded; it is replaced by the same ``KMeans(n_clusters=20, n_init="auto")`` with
  ``random_state=--kmeans-seed``, the seed zsadbench's ``kmeans_seed`` uses;
- preprocesses seeded random uint8 images with the reference's transforms (``image_transform`` with the first two
  steps replaced as ``AdaCLIP_Trainer`` does) and runs ``AdaCLIP.forward(image, [class], aggregation=True)`` once per
  image (the reference supports batch 1), recording the intermediate tensors through wrappers around its methods,
  and the map smoothed by ``scipy.ndimage.gaussian_filter(sigma=4)`` as ``AdaCLIP_Trainer.evaluation`` does;
- with ``--train``: one ``AdaCLIP_Trainer.train_one_batch`` on the first image with a rectangular defect mask (its
  AdamW, lr 0.01), recording the loss, every learned parameter's gradient and its value after the step. The frozen
  CLIP gets ``requires_grad=False`` (the reference leaves it on but never updates it: the learned parts' gradients
  are the same, the backward is cheaper). One shim, outside the computation: the reference normalises in place
  (``x /= x.norm(...)``), which autograd rejects in fp32 (``norm`` saves ``x`` for its backward, the in-place division
  then bumps its version); under the CUDA autocast the reference trains with, ``norm`` runs on an fp32 cast copy of
  the fp16 ``x``, so the error never shows. During the step ``Tensor.norm`` runs on a copy of its input
  (``norm_of_a_copy``): the same values and the same gradients, as autocast's cast gives on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import types
from collections.abc import Iterator

import numpy as np
import torch


def import_reference(root: str) -> dict[str, types.ModuleType]:
    """Imports the reference's ``method.adaclip``, ``method.trainer`` pieces and ``loss`` from ``root``."""
    root = os.path.abspath(root)
    sys.path.insert(0, root)
    for missing in ("cv2",):
        try:
            importlib.import_module(missing)
        except ImportError:
            sys.modules[missing] = types.ModuleType(missing)  # only the evaluation loop's image IO uses it
    tools = types.ModuleType("tools")  # plotting, metrics, tensorboard: evaluation only
    for name in ("visualization", "calculate_metric", "calculate_average_metric"):
        setattr(tools, name, None)
    sys.modules["tools"] = tools
    package = types.ModuleType("method")  # the package without its __init__ (which imports the trainer eagerly)
    package.__path__ = [os.path.join(root, "method")]
    sys.modules["method"] = package
    modules = {name: importlib.import_module(f"method.{name}") for name in ("adaclip", "clip_model", "custom_clip",
                                                                             "trainer")}
    modules["loss"] = importlib.import_module("loss")
    return modules


def synthetic_images(count: int, seed: int, height: int = 400, width: int = 460) -> list[np.ndarray]:
    """Returns seeded uint8 RGB images: smooth colour fields plus a few bright blobs and noise."""
    rng = np.random.default_rng(seed)
    images = []
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    for _ in range(count):
        base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6)) for _ in range(3)], -1)
        base += np.stack([np.cos(5 * yy * rng.uniform(0.5, 2) + rng.uniform(0, 6)) for _ in range(3)], -1)
        for _ in range(3):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.1)
            base += 2.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)[..., None] * rng.uniform(-1, 1, 3)
        base += 0.3 * rng.standard_normal(base.shape)
        images.append(np.clip((base - base.min()) / (base.max() - base.min()) * 255, 0, 255).astype(np.uint8))
    return images


def build_reference(ref: dict[str, types.ModuleType], ref_root: str, weights: str, image_size: int, seed: int,
                    kmeans_seed: int):
    """Returns (AdaCLIP, preprocess) built as AdaCLIP_Trainer builds them, on the given CLIP weights."""
    from sklearn.cluster import KMeans
    from torchvision import transforms

    with open(os.path.join(ref_root, "model_configs", "ViT-L-14-336.json")) as f:
        config = json.load(f)
    config["vision_cfg"]["image_size"] = image_size
    clip = ref["clip_model"].CLIP(**config, cast_dtype=None)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    ref["clip_model"].resize_pos_embed(state, clip)
    clip.load_state_dict(state, strict=True)
    clip.eval()
    layers = config["vision_cfg"]["layers"] // 4
    torch.manual_seed(seed)
    model = ref["adaclip"].AdaCLIP(freeze_clip=clip, text_channel=config["embed_dim"],
                                   visual_channel=config["vision_cfg"]["width"], prompting_length=5,
                                   prompting_depth=4, prompting_branch="VL", prompting_type="SD", use_hsf=True,
                                   k_clusters=20, output_layers=[layers, 2 * layers, 3 * layers, 4 * layers],
                                   device="cpu", image_size=image_size)
    model.HSF.cluster_performer = KMeans(n_clusters=20, n_init="auto", random_state=kmeans_seed)
    preprocess = ref["custom_clip"].image_transform(image_size, is_train=False)
    preprocess.transforms[0] = transforms.Resize(size=(image_size, image_size),
                                                 interpolation=transforms.InterpolationMode.BICUBIC, max_size=None)
    preprocess.transforms[1] = transforms.CenterCrop(size=(image_size, image_size))
    return model, preprocess


LEARNABLE = ("text_prompter", "visual_prompter", "patch_token_layer", "cls_token_layer",
             "dynamic_visual_prompt_generator", "dynamic_text_prompt_generator")  # AdaCLIP_Trainer's list


def learned_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Returns the learned parts as AdaCLIP_Trainer.save writes them (``clip_model.`` + the AdaCLIP key)."""
    return {f"clip_model.{k}": v.detach().clone() for k, v in model.state_dict().items()
            if any(name in k for name in LEARNABLE)}


class Recorder:
    """Wraps methods of the reference's objects to record their inputs and outputs per call."""

    def __init__(self) -> None:
        self.calls: dict[str, list] = {}

    def wrap(self, owner: object, name: str, record, key: str | None = None) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls.setdefault(key or name, []).append(record(args, out))
            return out

        setattr(owner, name, wrapped)


@contextlib.contextmanager
def norm_of_a_copy() -> Iterator[None]:
    """Makes ``Tensor.norm`` save a copy of its input for backward, so the reference's in-place ``/=`` is legal."""
    original = torch.Tensor.norm

    def norm(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return original(self.clone() if torch.is_grad_enabled() and self.requires_grad else self, *args, **kwargs)

    torch.Tensor.norm = norm  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.norm = original  # type: ignore[method-assign]


def detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return [detach(v) for v in x]
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref-root", required=True, help="caoyunkang/AdaCLIP work tree")
    parser.add_argument("--weights", required=True, help="CLIP ViT-L-14-336 state dict (open_clip layout)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--seed", type=int, default=0, help="seed of the learned parts' initialisation")
    parser.add_argument("--kmeans-seed", type=int, default=0)
    parser.add_argument("--class-name", default="metal_nut")
    parser.add_argument("--train", action="store_true", help="also record one training step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    ref = import_reference(args.ref_root)
    model, preprocess = build_reference(ref, args.ref_root, args.weights, args.image_size, args.seed,
                                        args.kmeans_seed)
    stem = os.path.splitext(args.out)[0]
    torch.save(learned_state(model), f"{stem}_adaclip.pth")
    raw = synthetic_images(args.images, seed=args.seed + 7)
    images = torch.stack([preprocess(Image.fromarray(a)) for a in raw])
    record: dict[str, object] = {"images_uint8": torch.from_numpy(np.stack(raw)), "image": images,
                                 "pos_embed": model.visual.positional_embedding.detach().clone(),
                                 "class_name": args.class_name}

    recorder = Recorder()
    recorder.wrap(model.visual_prompter, "set_dynamic_prompts", lambda a, o: detach(a[0]))
    recorder.wrap(model.text_prompter, "set_dynamic_prompts", lambda a, o: detach(a[0]))
    recorder.wrap(model, "encode_image", lambda a, o: detach([o[0], o[1]]))  # pooled, prompt-free taps
    recorder.wrap(model, "proj_visual_tokens", lambda a, o: detach([o[0], o[1]]))
    recorder.wrap(model.text_embedding_layer, "forward", lambda a, o: detach(o), key="text")
    recorder.wrap(model.HSF, "forward", lambda a, o: detach(o), key="hsf")
    started = time.perf_counter()
    maps, scores = [], []
    with torch.no_grad():
        for image in images:
            anomaly_map, score = model(image.unsqueeze(0), [args.class_name], aggregation=True)
            maps.append(anomaly_map[0].detach().clone())
            scores.append(score[0].detach().clone())
    record["inference_seconds"] = time.perf_counter() - started
    calls = recorder.calls
    record["dynamic_visual_prompts"] = torch.cat(calls["set_dynamic_prompts"][0::2])
    record["dynamic_text_prompts"] = torch.cat(calls["set_dynamic_prompts"][1::2])
    record["pooled"] = torch.cat([c[0] for c in calls["encode_image"]])
    record["patch_tokens"] = torch.stack([torch.cat([c[1][i] for c in calls["encode_image"]]) for i in range(4)], 1)
    record["proj_cls"] = torch.cat([c[0] for c in calls["proj_visual_tokens"]])
    record["proj_patch_tokens"] = torch.stack([torch.cat([c[1][i] for c in calls["proj_visual_tokens"]])
                                               for i in range(4)], 1)
    record["text_features"] = torch.cat(calls["text"])  # (B, C, 2)
    record["hsf_feature"] = torch.cat(calls["hsf"])
    record["map"] = torch.stack(maps)
    record["score"] = torch.stack(scores)
    record["map_smoothed"] = torch.from_numpy(np.stack([gaussian_filter(m.numpy(), sigma=4) for m in maps]))

    if args.train:
        trainer_cls = ref["trainer"].AdaCLIP_Trainer
        model.freeze_clip.requires_grad_(False)
        params = [p for n, p in model.named_parameters() if any(k in n for k in LEARNABLE)]
        names = [n for n, p in model.named_parameters() if any(k in n for k in LEARNABLE)]
        state = types.SimpleNamespace(clip_model=model, device="cpu", loss_focal=ref["loss"].FocalLoss(),
                                      loss_dice=ref["loss"].BinaryDiceLoss(),
                                      optimizer=torch.optim.AdamW(params, lr=0.01, betas=(0.5, 0.999)))
        mask = torch.zeros(1, 1, args.image_size, args.image_size)
        mask[..., args.image_size // 4: args.image_size // 2, args.image_size // 3: 2 * args.image_size // 3] = 1
        model.train()
        started = time.perf_counter()
        with norm_of_a_copy():
            loss = trainer_cls.train_one_batch(state, {"img": images[:1], "cls_name": [args.class_name],
                                                       "img_mask": mask.clone(),
                                                       "anomaly": torch.tensor([1])})
        record["train_seconds"] = time.perf_counter() - started
        record["train_mask"] = mask[0, 0]
        record["train_loss"] = loss.detach().clone()
        record["train_grads"] = {f"clip_model.{n}": p.grad.detach().clone() for n, p in zip(names, params)
                                 if p.grad is not None}
        record["train_params_after"] = {f"clip_model.{n}": p.detach().clone() for n, p in zip(names, params)}
    torch.save(record, args.out)
    print(f"wrote {args.out} and {stem}_adaclip.pth "
          f"(inference {record['inference_seconds']:.1f} s, training step {record.get('train_seconds', 0):.1f} s)")


if __name__ == "__main__":
    main()
