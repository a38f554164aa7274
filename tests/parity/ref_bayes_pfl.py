#!/usr/bin/env python
"""Reference side of the Bayes-PFL parity check: runs xiaozhen228/Bayes-PFL on given weights and records its outputs.

Nothing of the reference is copied: ``models.VPB`` (``Context_Prompting``, ``TextEncoder``), ``models.model_CLIP``
(``Load_CLIP``, ``tokenize``, ``_transform_test``) and ``loss`` (``FocalLoss``, ``DiceLoss``, ``Orthogonal_Loss``) are
imported from the work tree given with ``--ref-root``. Run it in an environment with torch, torchvision, numpy, scipy,
scikit-learn, ftfy, regex and setuptools (``pkg_resources``); ``tabulate`` gets a stand-in when missing::

    python tests/parity/make_weights.py --arch ViT-L-14-336 --seed 0 --out /tmp/bayespfl/clip_l14_s0.pt
    python tests/parity/ref_bayes_pfl.py --ref-root Bayes-PFL --weights /tmp/bayespfl/clip_l14_s0.pt \\
        --out /tmp/bayespfl/ref.pt --images 2 --train

What it does, with the reference's own code for every model step:

- ``Load_CLIP(518, weights)`` as train.py / test.py call it (its CLIP copy: exact GELU, weights rounded to float16
  and back, positional embedding resized bicubically with antialias, one extra zero word embedding); then
  ``Context_Prompting`` with the train.sh / test.sh arguments (B = 3, P = Q = 5, K = 10, R = ``--sample-num``,
  layers 6/12/18/24) under ``torch.manual_seed(--seed)``, every parameter moved by seeded noise of scale 0.01 (so that
  zero biases and identical prompts do not hide a swapped or dropped term), saved in the authors' layout
  ``{"MyModel": state_dict}`` to ``<out stem>_bayes_pfl.pth``;
- the reference draws its prompt samples with ``torch.randn_like``; here every draw comes, in call order, from a
  list fixed in advance: per image the R draws of the image-specific flow, then R of the normal and R of the abnormal
  flow, each (1, D), made by ``torch.Generator().manual_seed(--sampling-seed)`` as zsadbench's ``sampling_seed``
  makes them (the same eps for every image, zsadbench's deviation); the draws are saved;
- the reference runs on CUDA only (``.cuda()`` and ``.to('cuda')`` calls); on a CPU-only machine these return the
  tensor itself;
- each image alone (test.py's batch 1): ``encode_image``, ``forward_ensemble(mode="test")`` and the model forward at
  stage 2 (test.py for the released files) and stage 1; the score and map aggregation of test.py's loop (the mean
  over the B·R prompt pairs of softmax([normal, abnormal])[1]; the mean of the 4·B·R upsampled maps) is written out
  here as test.py writes it, then ``scipy.ndimage.gaussian_filter(sigma=8)`` and the image-score fusion of
  ``calcuate_metric_pixel`` (top-k mean of the unsmoothed maps, min-max over the images, α = 0.5);
- with ``--train``: one stage-1 training step of train.py on all images as one batch with their masks (``Resize``
  bilinear + threshold 0.5, as its target transform and loop), the prompt pair fixed to ``--pair`` (train.py draws it
  with ``torch.randint``) and the training draws (image-specific (B, D), normal (1, D), abnormal (1, D)) from
  ``--sampling-seed + 1``; the losses as train.py combines them and every learned parameter's gradient. The frozen
  CLIP gets ``requires_grad=False`` (its gradients are never used).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    common_arguments,
    cuda_is_identity,
    install_import_shims,
    query_images,
    reference_on_path,
    rewinding_jit_load,
    run_metadata,
    save_output,
    setup_torch,
    sibling,
)

CLASS_NAME = "bottle"  # top-k 2000 in the fusion; a class word the reference's class_mapping leaves as is


@contextlib.contextmanager
def cuda_device_is_cpu() -> Iterator[None]:
    """Makes ``tensor.to('cuda')`` stay on the CPU when there is no CUDA (the reference's vision forward calls it)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    torch.Tensor.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.to = original  # type: ignore[method-assign]


@contextlib.contextmanager
def fixed_draws(draws: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Makes ``torch.randn_like`` return the given tensors in order (shapes checked); all must be used."""
    original = torch.randn_like
    queue = list(draws)

    def randn_like(like: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not queue:
            raise RuntimeError("the reference drew more samples than were fixed")
        draw = queue.pop(0)
        if tuple(draw.shape) != tuple(like.shape):
            raise RuntimeError(f"fixed draw of shape {tuple(draw.shape)} for randn_like({tuple(like.shape)})")
        return draw.to(like.dtype).clone()

    torch.randn_like = randn_like  # type: ignore[assignment]
    try:
        yield queue
    finally:
        torch.randn_like = original  # type: ignore[assignment]
    if queue:
        raise RuntimeError(f"{len(queue)} fixed draws were not used")


@contextlib.contextmanager
def reference_session(ref_root: str) -> Iterator[dict[str, Any]]:
    """Imports the reference from ``ref_root`` with the CPU shims active; yields its modules (cwd = the work tree)."""
    install_import_shims()
    cwd = os.getcwd()
    with reference_on_path(ref_root, modules=("models", "loss")), rewinding_jit_load(), cuda_is_identity(), \
            cuda_device_is_cpu():
        os.chdir(ref_root)  # its tokenizer opens ./models/bpe_simple_vocab_16e6.txt.gz
        try:
            import loss
            from models import VPB, model_CLIP
            yield {"loss": loss, "VPB": VPB, "model_CLIP": model_CLIP}
        finally:
            os.chdir(cwd)


def build_reference(modules: dict[str, Any], weights: str, size: int, samples: int, layers: list[int],
                    seed: int) -> tuple[Any, Any, Any, argparse.Namespace]:
    """Returns (CLIP, Context_Prompting with seeded perturbed parameters, TextEncoder, args) built by the reference."""
    clip, _, _ = modules["model_CLIP"].Load_CLIP(size, weights, device="cpu")
    clip.eval().requires_grad_(False)
    options = argparse.Namespace(vision_width=int(clip.visual.conv1.weight.shape[0]),
                                 text_width=int(clip.ln_final.weight.shape[0]),
                                 embed_dim=int(clip.text_projection.shape[1]), prompt_num=3, prompt_context_len=5,
                                 prompt_state_len=5, num_flows=10, sample_num=samples, features_list=list(layers),
                                 image_size=size)
    torch.manual_seed(seed)
    model = modules["VPB"].Context_Prompting(args=options)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return clip, model, modules["VPB"].TextEncoder(clip, options), options


def infer_one(modules: dict[str, Any], clip: Any, model: Any, text_encoder: Any, image: torch.Tensor,
              draws: list[torch.Tensor], options: argparse.Namespace, stages: tuple[int, ...] = (2,)
              ) -> dict[str, Any]:
    """Runs test.py's per-image inference (batch 1) with fixed draws; returns scores and logits per stage, the map."""
    pairs = options.prompt_num * options.sample_num
    result: dict[str, Any] = {}
    with torch.no_grad():
        image_features, _, patch_tokens = clip.encode_image(image, options.features_list)
        with fixed_draws(draws):
            text, _ = model.forward_ensemble(text_encoder, image_features, patch_tokens, [CLASS_NAME], "cpu",
                                             modules["model_CLIP"].tokenize, mode="test")
        for stage in stages:
            logits, maps_list = model(text, image_features, patch_tokens, stage=stage, mode="test")
            logits = logits.squeeze(2)
            score = 0
            for i in range(pairs):  # test.py's loop
                probabilities = torch.cat([logits[:, i].unsqueeze(0), logits[:, i + pairs].unsqueeze(0)],
                                          dim=1).softmax(dim=-1)
                score = score + probabilities[0, 1]
            result[f"score_stage{stage}"] = score / pairs
            result[f"logits_stage{stage}"] = logits[0]
        anomaly_maps = []
        for layer_maps in maps_list:  # test.py's loop (the maps do not depend on the stage)
            for i in range(pairs):
                pair = torch.softmax(torch.stack([layer_maps[:, i], layer_maps[:, i + pairs]], dim=1), dim=1)
                anomaly_maps.append(pair[:, 1].cpu().numpy())
        result["map"] = torch.from_numpy(np.mean(anomaly_maps, axis=0)[0])
        result["global"], result["text"] = image_features[0], text[0]
    return result


def main() -> None:
    """Runs the reference and writes the recording (see the module docstring)."""
    parser = common_arguments(__doc__ or "")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--sample-num", type=int, default=10, help="R (test.sh: 10)")
    parser.add_argument("--sampling-seed", type=int, default=333)
    parser.add_argument("--pair", type=int, default=1, help="the prompt pair of the training step")
    parser.add_argument("--train", action="store_true", help="also record one training step")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18, 24], help="feature layers")
    args = parser.parse_args()
    setup_torch(args.threads)
    args.out, args.weights = os.path.abspath(args.out), os.path.abspath(args.weights)
    started = time.time()
    shims = install_import_shims()

    with reference_session(os.path.abspath(args.ref_root)) as modules:
        reference_loss = modules["loss"]
        tokenize = modules["model_CLIP"].tokenize
        size, samples = args.image_size, args.sample_num
        clip, model, text_encoder, options = build_reference(modules, args.weights, size, samples, args.layers,
                                                             args.seed)
        embed_dim = options.embed_dim
        learned = sibling(args.out, "_bayes_pfl.pth")
        torch.save({"MyModel": model.state_dict()}, learned)

        arrays, masks, labels = query_images(args.images, args.seed)
        transform = modules["model_CLIP"]._transform_test(size)
        from PIL import Image
        images = torch.stack([transform(Image.fromarray(a)) for a in arrays])

        # inference draws exactly as zsadbench's sampling_seed makes them: (R, 1, D) context, normal, abnormal
        sampler = torch.Generator().manual_seed(args.sampling_seed)
        context, normal, abnormal = (torch.randn(samples, 1, embed_dim, generator=sampler) for _ in range(3))
        model.eval()
        out: dict[str, Any] = {"images_uint8": [torch.from_numpy(a) for a in arrays], "image": images,
                               "class_name": CLASS_NAME, "draws": {"context": context, "normal": normal,
                                                                  "abnormal": abnormal}}
        per_image: dict[str, list[torch.Tensor]] = {k: [] for k in ("global", "text", "score_stage2", "score_stage1",
                                                                    "map", "logits_stage2", "logits_stage1")}
        for index in range(len(images)):
            result = infer_one(modules, clip, model, text_encoder, images[index:index + 1],
                               [*context, *normal, *abnormal], options, stages=(2, 1))
            for key, values in per_image.items():
                values.append(result[key])
            print(f"image {index + 1}/{len(images)} done ({time.time() - started:.0f} s)", file=sys.stderr)
        out.update({k: torch.stack(v) for k, v in per_image.items()})
        from scipy.ndimage import gaussian_filter
        out["map_smoothed"] = torch.from_numpy(gaussian_filter(out["map"].numpy(), sigma=8, axes=(1, 2)))
        # calcuate_metric_pixel's image score: top-k mean of the unsmoothed maps, min-max, alpha 0.5
        k = -2000
        top = np.array([np.mean(np.partition(m.reshape(-1), kth=k)[k:]) for m in out["map"].numpy()])
        classifier = out["score_stage2"].numpy()
        top = (top - top.min()) / (top.max() - top.min() + 1e-8)
        classifier = (classifier - classifier.min()) / (classifier.max() - classifier.min() + 1e-8)
        out["fused_scores"] = torch.from_numpy(0.5 * classifier + 0.5 * top)

        if args.train:
            model.train()
            from torchvision import transforms
            target = transforms.Compose([transforms.Resize((size, size)), transforms.CenterCrop(size),
                                         transforms.ToTensor()])
            gt = torch.stack([target(Image.fromarray(m)) for m in masks]).squeeze(1)
            gt[gt > 0.5], gt[gt < 0.5] = 1, 0
            anomaly = torch.tensor(labels)
            trainer = torch.Generator().manual_seed(args.sampling_seed + 1)
            batch = len(images)
            train_draws = [torch.randn(batch, embed_dim, generator=trainer),
                           torch.randn(1, embed_dim, generator=trainer), torch.randn(1, embed_dim, generator=trainer)]
            with torch.no_grad():
                image_features, _, patch_tokens = clip.encode_image(images, args.layers)
            with fixed_draws(list(train_draws)):
                text, loss_reg = model.forward_ensemble(text_encoder, image_features, patch_tokens,
                                                        [CLASS_NAME] * batch, "cpu", tokenize, mode="train")
            logits, maps_list = model(text, image_features, patch_tokens, stage=1, mode="train")
            logits = logits.squeeze(2)
            index_prompt = torch.tensor([args.pair])  # train.py: torch.randint(0, prompt_num, (1, 1))[0]
            # train.py's loss, as it combines the reference's loss modules
            logits = torch.cat([logits[:, index_prompt], logits[:, index_prompt + 3]], dim=1)
            loss_class = torch.nn.CrossEntropyLoss()(logits, anomaly)
            loss_dist_reg = loss_reg[1] + loss_reg[2] + loss_reg[3]
            loss_text = reference_loss.Orthogonal_Loss()(text, options)
            focal = reference_loss.FocalLoss()
            dice = reference_loss.DiceLoss()
            loss_foc = loss_dic = 0
            for layer_maps in maps_list:
                selected = torch.cat([layer_maps[:, index_prompt], layer_maps[:, index_prompt + 3]], dim=1)
                selected = torch.softmax(selected, dim=1)
                loss_foc = loss_foc + focal(selected.clone(), gt.clone())
                loss_dic = loss_dic + dice(selected, gt)
            loss = loss_class + loss_foc + loss_dic + loss_dist_reg + loss_text
            loss.backward()
            out["train"] = {
                "masks": gt, "labels": anomaly, "pair": args.pair,
                "draws": {"context": train_draws[0], "normal": train_draws[1], "abnormal": train_draws[2]},
                "losses": {"loss": loss.detach(), "image": loss_class.detach(), "focal": loss_foc.detach(),
                           "dice": loss_dic.detach(), "kl": loss_dist_reg.detach(), "orthogonal": loss_text.detach()},
                "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
            }
    out["meta"] = run_metadata(args, "xiaozhen228/Bayes-PFL@8f155a0",
                               ["models/VPB.py", "models/PFL.py", "models/flows.py", "models/model_CLIP.py",
                                "models/transformer.py", "loss.py", "test.py", "train.py"],
                               shims=shims, image_size=args.image_size, sample_num=args.sample_num,
                               sampling_seed=args.sampling_seed, layers=list(args.layers),
                               seconds=round(time.time() - started, 1))
    save_output(out, args.out)


if __name__ == "__main__":
    main()
