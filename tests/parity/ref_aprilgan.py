#!/usr/bin/env python
"""Reference side of the APRIL-GAN parity check: runs ByChelsea/VAND-APRIL-GAN's own code and records every tensor.

The reference is imported from a checkout given on the command line (never vendored). Two steps, two processes (the
reference ships its own package named ``open_clip``, which must not meet the installed one)::

    python tests/parity/ref_aprilgan.py weights --out clip_rand_s0.pt            # zsadbench's open_clip, no reference
    python tests/parity/ref_aprilgan.py run --ref-root VAND-APRIL-GAN --weights clip_rand_s0.pt --out OUT.pt
    ZSADBENCH_PARITY_APRILGAN=OUT.pt ZSADBENCH_PARITY_APRILGAN_WEIGHTS=clip_rand_s0.pt \
        python -m pytest -m parity tests/test_parity_aprilgan.py -s

``weights``: a seeded random full-size ``ViT-L-14-336`` state dict in the OpenAI / open_clip key layout with non-trivial
LayerNorms and attention biases (zsadbench.clip.testing.clip_like_state_dict), every tensor rounded to the fp16 grid:
the reference builds the OpenAI model through ``convert_weights_to_fp16`` first, which is then lossless.

``run`` replays the reference exactly as its scripts run it (test_zero_shot.sh, test_few_shot.sh, train.sh: ViT-L-14-336
at 518 px, features 6 12 18 24, ``pretrained="openai"``): ``open_clip.create_model_and_transforms`` (its ``openai``
branch, with ``load_openai_model`` pointed at the weights file instead of the download), ``LinearLayer`` with seeded
random weights saved in the authors' layout (``<OUT>_adapters.pth``), ``encode_text_with_prompt_ensemble``,
``few_shot.memory`` on a small MVTec-style folder written from the same images (meta.json, the reference's own
``MVTecDataset`` and its ``torch.randint`` draw), then the per-image loop body of test.py (batch 1), the few-shot
image-score normalisation of its metric section, and one step of train.py's loop (focal + Dice per layer, Adam
lr 1e-3, betas (0.5, 0.999)) on the first two images with synthetic masks.

Three shims, all outside the computation: train.py normalises the adapted tokens in place (``x /= x.norm(...)``),
which autograd rejects in fp32 (under the CUDA autocast the reference trains with, ``norm`` runs on an fp32 cast copy),
so during the training step ``Tensor.norm`` runs on a copy of its input (same values, same gradients); Pillow >= 11
rejects the reference's ``Image.fromarray(float zeros, mode='L')`` (the empty mask of a normal image; cast to uint8
for the call), and the reference's
``VisionTransformer.forward`` builds an attention summary it never uses with ``.to('cuda')`` (mapped to the CPU on a
machine without CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

MODEL = "ViT-L-14-336"
IMAGE_SIZE = 518  # test_zero_shot.sh / train.sh (--image-size changes it for a quicker check)
LAYERS = [6, 12, 18, 24]
CATEGORY = "metal_nut"  # an underscore in the class word, as in MVTec AD


def make_weights(out: Path, seed: int) -> None:
    """Writes the fp16-grid random state dict (zsadbench's open_clip; the reference is not imported)."""
    from zsadbench.clip.testing import clip_like_state_dict

    state = clip_like_state_dict(MODEL, seed=seed)
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, out)
    print(f"wrote {out} ({len(state)} tensors)")


def synthetic_images(count: int, seed: int) -> np.ndarray:
    """Returns (count, 256, 320, 3) uint8 images: smooth random colour fields plus noise (not square: squash resize)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((320, 256), Image.Resampling.BICUBIC), dtype=np.float64)
        out.append(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


@contextlib.contextmanager
def float_masks_as_uint8() -> Iterator[None]:
    """Lets ``Image.fromarray(float zeros, mode='L')`` work as with the Pillow of the reference's days.

    The reference's dataset.py builds the empty mask of a normal image that way; Pillow >= 11 rejects a float array
    with mode 'L'. The values are zeros either way.
    """
    from PIL import Image

    original = Image.fromarray

    def fromarray(array: np.ndarray, mode: str | None = None) -> Image.Image:
        if mode == "L" and np.asarray(array).dtype.kind == "f":
            array = np.asarray(array).astype(np.uint8)
        return original(array, mode) if mode is not None else original(array)

    Image.fromarray = fromarray  # type: ignore[assignment]
    try:
        yield
    finally:
        Image.fromarray = original  # type: ignore[assignment]


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """Maps ``Tensor.to('cuda')`` to the CPU when there is no CUDA (the reference's unused attention summary)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.to

    def to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            args = ("cpu", *args[1:])
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    torch.Tensor.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.to = original  # type: ignore[method-assign]


def norm_of_a_copy():  # noqa: ANN201
    """The AdaCLIP driver's shim: ``Tensor.norm`` saves a copy, so train.py's in-place ``/=`` is legal in fp32."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ref_adaclip import norm_of_a_copy as shim  # type: ignore[import-not-found]

    return shim()


def write_folder(root: Path, normals: np.ndarray) -> None:
    """Writes an MVTec-style folder with meta.json whose train split holds ``normals`` (for few_shot.memory)."""
    from PIL import Image

    entries = []
    for i, image in enumerate(normals):
        path = f"{CATEGORY}/train/good/{i:03d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / path)
        entries.append({"img_path": path, "mask_path": "", "cls_name": CATEGORY, "specie_name": "good", "anomaly": 0})
    (root / "meta.json").write_text(json.dumps({"train": {CATEGORY: entries}, "test": {CATEGORY: []}}))


def run(args: argparse.Namespace) -> None:
    """Runs the reference and saves the recording."""
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(args.ref_root).resolve()))
    import open_clip  # the reference's own package
    import torch.nn.functional as F
    import torchvision.transforms as transforms
    from few_shot import memory
    from loss import BinaryDiceLoss, FocalLoss
    from model import LinearLayer
    from PIL import Image
    from prompt_ensemble import encode_text_with_prompt_ensemble
    from sklearn.metrics import pairwise

    if not open_clip.__file__.startswith(str(Path(args.ref_root).resolve())):
        raise SystemExit(f"imported {open_clip.__file__}, not the reference's open_clip under {args.ref_root}")
    started = time.time()
    size = args.image_size
    weights = str(Path(args.weights).resolve())
    original_loader = open_clip.factory.load_openai_model
    open_clip.factory.load_openai_model = lambda name, **kw: original_loader(weights, **kw)

    # test.py: setup_seed(args.seed), then the model, the linear layers, the transforms
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    device = "cpu"
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, size, pretrained="openai")
    model.to(device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    with open(Path(args.ref_root) / "open_clip" / "model_configs" / f"{MODEL}.json") as f:
        model_configs = json.load(f)
    with torch.random.fork_rng(devices=[]):  # random adapters in the authors' layout, saved for our side
        torch.manual_seed(args.seed + 1)
        linearlayer = LinearLayer(model_configs["vision_cfg"]["width"], model_configs["embed_dim"], len(LAYERS), MODEL)
    adapters_path = Path(args.out).with_name(Path(args.out).stem + "_adapters.pth")
    torch.save({"trainable_linearlayer": linearlayer.state_dict()}, adapters_path)
    linearlayer.load_state_dict(torch.load(adapters_path)["trainable_linearlayer"])
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.CenterCrop(size),
                                    transforms.ToTensor()])

    raw = synthetic_images(args.images + args.normals, args.seed)
    queries, normals = raw[:args.images], raw[args.images:]
    image = torch.stack([preprocess(Image.fromarray(a)) for a in queries])
    record: dict[str, object] = {"images_uint8": torch.from_numpy(queries), "normals_uint8": torch.from_numpy(normals),
                                 "image": image, "category": CATEGORY,
                                 "pos_embed": model.visual.positional_embedding.detach().clone(),
                                 "gelu": type(model.visual.transformer.resblocks[0].mlp.gelu).__name__}

    with cuda_to_cpu():
        # few-shot memory, through the reference's own dataset class and draw
        with tempfile.TemporaryDirectory() as folder:
            root, save = Path(folder) / "data", Path(folder) / "save"
            save.mkdir()
            write_folder(root, normals)
            with float_masks_as_uint8():
                mem_features = memory(MODEL, model, [CATEGORY], str(root), str(save), preprocess, transform,
                                      args.shots, LAYERS, "mvtec", device)
            drawn = (save / "k_shot.txt").read_text().split()
        record["memory_indices"] = torch.tensor([int(Path(p).stem) for p in drawn])
        record["memory_features"] = [m.clone() for m in mem_features[CATEGORY]]

        with torch.cuda.amp.autocast(), torch.no_grad():
            text_prompts = encode_text_with_prompt_ensemble(model, [CATEGORY], tokenizer, device)
        record["text_features"] = text_prompts[CATEGORY].clone()  # (E, 2)

        # test.py's loop body, one image at a time (batch 1 as its DataLoader)
        keys = ("image_features", "pr_sp", "layer_maps", "zs_map", "fs_layer_maps", "fs_map", "patch_tokens_first")
        out: dict[str, list] = {k: [] for k in keys}
        for index in range(len(image)):
            one = image[index:index + 1].to(device)
            cls_name = [CATEGORY]
            with torch.no_grad(), torch.cuda.amp.autocast():
                image_features, patch_tokens = model.encode_image(one, LAYERS)
                image_features /= image_features.norm(dim=-1, keepdim=True)
                text_features = torch.stack([text_prompts[cls] for cls in cls_name], dim=0)
                text_probs = (100.0 * image_features @ text_features[0]).softmax(dim=-1)
                out["image_features"].append(image_features[0].clone())
                out["pr_sp"].append(text_probs[0][1].cpu().item())
                if index == 0:
                    out["patch_tokens_first"] = [p[0].clone() for p in patch_tokens]
                patch_tokens = linearlayer(patch_tokens)
                anomaly_maps = []
                for layer in range(len(patch_tokens)):
                    patch_tokens[layer] /= patch_tokens[layer].norm(dim=-1, keepdim=True)
                    anomaly_map = (100.0 * patch_tokens[layer] @ text_features)
                    B, L, C = anomaly_map.shape
                    H = int(np.sqrt(L))
                    anomaly_map = F.interpolate(anomaly_map.permute(0, 2, 1).view(B, 2, H, H),
                                                size=size, mode="bilinear", align_corners=True)
                    anomaly_map = torch.softmax(anomaly_map, dim=1)[:, 1, :, :]
                    anomaly_maps.append(anomaly_map.cpu().numpy())
                anomaly_map = np.sum(anomaly_maps, axis=0)
                out["layer_maps"].append(torch.from_numpy(np.concatenate(anomaly_maps)))
                out["zs_map"].append(torch.from_numpy(anomaly_map[0].copy()))

                image_features, patch_tokens = model.encode_image(one, LAYERS)  # few_shot_features = features_list
                anomaly_maps_few_shot = []
                for idx, p in enumerate(patch_tokens):
                    p = p[0, 1:, :]
                    cos = pairwise.cosine_similarity(mem_features[cls_name[0]][idx].cpu(), p.cpu())
                    height = int(np.sqrt(cos.shape[1]))
                    anomaly_map_few_shot = np.min((1 - cos), 0).reshape(1, 1, height, height)
                    anomaly_map_few_shot = F.interpolate(torch.tensor(anomaly_map_few_shot),
                                                         size=size, mode="bilinear", align_corners=True)
                    anomaly_maps_few_shot.append(anomaly_map_few_shot[0].cpu().numpy())
                anomaly_map_few_shot = np.sum(anomaly_maps_few_shot, axis=0)
                out["fs_layer_maps"].append(torch.from_numpy(np.concatenate(anomaly_maps_few_shot)))
                out["fs_map"].append(torch.from_numpy((anomaly_map + anomaly_map_few_shot)[0].copy()))

        # the metric section's few-shot image score: ½ (p + min-max normalised map maxima over the category)
        pr_sp = np.array(out["pr_sp"])
        pr_sp_tmp = np.array([np.max(m.numpy()) for m in out["fs_map"]])
        pr_sp_tmp = (pr_sp_tmp - pr_sp_tmp.min()) / (pr_sp_tmp.max() - pr_sp_tmp.min())
        record.update({
            "image_features": torch.stack(out["image_features"]),
            "zs_score": torch.tensor(pr_sp, dtype=torch.float64),
            "layer_maps": torch.stack(out["layer_maps"]), "zs_map": torch.stack(out["zs_map"]),
            "fs_layer_maps": torch.stack(out["fs_layer_maps"]), "fs_map": torch.stack(out["fs_map"]),
            "fs_score": torch.tensor(0.5 * (pr_sp + pr_sp_tmp), dtype=torch.float64),
            "patch_tokens_first": torch.stack(out["patch_tokens_first"]),
        })

        # one step of train.py's loop on the first two images (batch 2), masks given at 518 px
        masks = torch.zeros(2, 1, size, size)
        at = [round(v * size / IMAGE_SIZE) for v in (150, 300, 200, 380, 400, 470, 30, 90)]  # 518 px boxes, scaled
        masks[1, 0, at[0]:at[1], at[2]:at[3]] = 1.0
        masks[0, 0, at[4]:at[5], at[6]:at[7]] = 1.0
        optimizer = torch.optim.Adam(list(linearlayer.parameters()), lr=1e-3, betas=(0.5, 0.999))
        loss_focal, loss_dice = FocalLoss(), BinaryDiceLoss()
        train_image = image[:2].to(device)
        cls_name = [CATEGORY, CATEGORY]
        with torch.cuda.amp.autocast(), norm_of_a_copy():
            with torch.no_grad():
                image_features, patch_tokens = model.encode_image(train_image, LAYERS)
                text_features = torch.stack([text_prompts[cls] for cls in cls_name], dim=0)
            patch_tokens = linearlayer(patch_tokens)
            anomaly_maps = []
            for layer in range(len(patch_tokens)):
                patch_tokens[layer] /= patch_tokens[layer].norm(dim=-1, keepdim=True)
                anomaly_map = (100.0 * patch_tokens[layer] @ text_features)
                B, L, C = anomaly_map.shape
                H = int(np.sqrt(L))
                anomaly_map = F.interpolate(anomaly_map.permute(0, 2, 1).view(B, 2, H, H),
                                            size=size, mode="bilinear", align_corners=True)
                anomaly_maps.append(torch.softmax(anomaly_map, dim=1))
        gt = masks.squeeze().to(device)
        gt[gt > 0.5], gt[gt <= 0.5] = 1, 0
        focal_terms, dice_terms = [], []
        loss = 0
        for num in range(len(anomaly_maps)):
            focal_terms.append(loss_focal(anomaly_maps[num], gt))
            dice_terms.append(loss_dice(anomaly_maps[num][:, 1, :, :], gt))
            loss += focal_terms[-1]
            loss += dice_terms[-1]
        optimizer.zero_grad()
        with norm_of_a_copy():
            loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in linearlayer.named_parameters()}
        optimizer.step()
        record["train"] = {"masks": masks[:, 0].clone(), "loss": loss.detach(),
                           "focal": torch.stack([t.detach() for t in focal_terms]),
                           "dice": torch.stack([t.detach() for t in dice_terms]), "grads": grads,
                           "after": {k: p.detach().clone() for k, p in linearlayer.named_parameters()}}
    record["seconds"] = time.time() - started
    record["ref_root"] = str(args.ref_root)
    torch.save(record, args.out)
    print(f"wrote {args.out} and {adapters_path} in {record['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    weights = commands.add_parser("weights", help="write the random full-size weights (no reference needed)")
    weights.add_argument("--out", required=True)
    weights.add_argument("--seed", type=int, default=0)
    run_parser = commands.add_parser("run", help="run the reference and record its tensors")
    run_parser.add_argument("--ref-root", required=True, help="a ByChelsea/VAND-APRIL-GAN checkout")
    run_parser.add_argument("--weights", required=True)
    run_parser.add_argument("--out", required=True)
    run_parser.add_argument("--images", type=int, default=3, help="test images (>= 3: the min-max has an inside)")
    run_parser.add_argument("--normals", type=int, default=3, help="normal train images the shots are drawn from")
    run_parser.add_argument("--shots", type=int, default=1)
    run_parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                            help="the reference's scripts' 518 px by default; a smaller size for busy CPUs")
    run_parser.add_argument("--seed", type=int, default=42)
    run_parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()
    if args.command == "weights":
        make_weights(Path(args.out), args.seed)
    else:
        run(args)


if __name__ == "__main__":
    main()
