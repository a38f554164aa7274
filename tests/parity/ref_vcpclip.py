"""Runs the reference VCP-CLIP (xiaozhen228/VCP-CLIP) on given weights and synthetic images; saves what it computes.

    python tests/parity/ref_vcpclip.py --ref-root /path/to/VCP-CLIP --weights clip_rand_s0.pt --out vcp_ref.pt \\
        [--images 2] [--image-size 518] [--train]

Nothing of the reference is copied: its modules are imported from ``--ref-root`` (``models/model_CLIP.py``,
``models/pre_vcp.py``, ``models/post_vcp.py``, ``models/prompt_ensemble.py``, ``utils/loss.py`` and ``train.py`` for
``LinearLayer`` / ``_freeze_stages``). Its CLIP is built by its own ``Load_CLIP`` (fp16 round trip, bicubic
antialiased position resize, the extra ``<|class|>`` row), which reads a TorchScript archive: ``torch.jit.load`` is
replaced, for that call, by an object handing over the state dict of ``--weights`` (open_clip's key layout is
OpenAI's). Weights on the float16 grid (tests/parity/make_weights.py's default) survive the round trip unchanged.

The learned parts are the reference's own modules initialised from ``torch.manual_seed(--seed)``; so that a dropped
or swapped piece shows, the LayerNorm ``prompt_norm`` gets a random affine and the temperatures τ1, τ2 different
values (log 1/0.05, log 1/0.09). They are saved in the authors' layout (train.py's ``save_dict``) as
``<OUT stem>_vcpclip.pth``, which the zsadbench side loads through ``--checkpoint``'s loader.

The inference and training steps are the statements of test.py (lines 160-205) and train.py (lines 166-218), which
are inline in those scripts' functions (no callable to import), written here with the reference's modules, without
CUDA autocast (fp32) and without the per-category min-max normalisation (recorded before it). The reference's
vision forward hard-codes ``.to('cuda')`` for an unused attention map: that one call stays on the CPU here.
``--train`` records one optimiser step of train.py's Adam (two groups) on two images (a defect mask on the first,
none on the second), with the prompt dropout set to 0 (its masks are random draws; zsadbench's side runs with
``prompt_dropout=0`` too).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FILES = ("models/model_CLIP.py", "models/transformer.py", "models/pre_vcp.py", "models/post_vcp.py",
         "models/prompt_ensemble.py", "models/simple_tokenizer.py", "utils/loss.py", "train.py", "test.py")
FEATURES = [6, 12, 18, 24]  # --features_list of train.sh / test.sh (ViT-L); 3 6 9 12 for a 12-block tower
PROMPT_LEN, DEEP_PROMPT_LEN, TOTAL_D_LAYER = 2, 1, 11  # train.sh / test.sh
ALPHA, SIGMA, TOP_K = 0.2, 8, 2000  # test.py calcuate_metric


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Runs the block in ``path`` (the reference's tokenizer opens ./models/bpe_simple_vocab_16e6.txt.gz)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def cuda_string_stays_on_cpu() -> Iterator[None]:
    """Without CUDA, ``tensor.to('cuda')`` returns the tensor (the reference's unused ``out_attn``)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and args[0] == "cuda":
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.to = original  # type: ignore[method-assign]


@contextlib.contextmanager
def state_dict_as_jit_archive(path: str) -> Iterator[None]:
    """Makes ``torch.jit.load`` return an object whose ``state_dict()`` is the plain state dict in ``path``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    archive = types.SimpleNamespace(state_dict=lambda: dict(state))
    archive.eval = lambda: archive
    original = torch.jit.load
    torch.jit.load = lambda *args, **kwargs: archive  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.jit.load = original


def import_reference(root: Path) -> dict[str, types.ModuleType]:
    """Imports the reference's modules from ``root`` (stand-ins for the data-augmentation package only)."""
    shims = common.install_import_shims({"albumentations": ()})
    sys.path.insert(0, str(root))
    with working_directory(root):
        modules = {name: importlib.import_module(name) for name in
                   ("models.model_CLIP", "models.pre_vcp", "models.post_vcp", "models.prompt_ensemble", "utils.loss",
                    "train")}
    modules["shims"] = types.SimpleNamespace(installed=shims)  # type: ignore[assignment]
    return modules


def build_reference(ref: dict[str, types.ModuleType], root: Path, weights: str, size: int, seed: int,
                    features: list[int] = FEATURES) -> types.SimpleNamespace:
    """Returns the reference's CLIP (its Load_CLIP), linear layers, pre-VCP, post-VCP and prompt ensemble."""
    clip_module, train_module = ref["models.model_CLIP"], ref["train"]
    torch.manual_seed(seed)
    with state_dict_as_jit_archive(weights), working_directory(root):
        model, _, preprocess = clip_module.Load_CLIP(size, weights, device="cpu", deep_prompt_len=DEEP_PROMPT_LEN,
                                                     total_d_layer_len=TOTAL_D_LAYER)
    config = {"embed_dim": model.text_projection.shape[1],
              "vision_cfg": {"width": model.visual.conv1.weight.shape[0]},
              "text_cfg": {"width": model.ln_final.weight.shape[0]}}  # the fields the reference reads from its json
    linear = train_module.LinearLayer(config["vision_cfg"]["width"], config["embed_dim"], len(features), "ViT")
    pre = ref["models.pre_vcp"].Context_Prompting(config, cla_len=PROMPT_LEN)
    post = ref["models.post_vcp"].Zero_Parameter(dim_v=config["vision_cfg"]["width"],
                                                 dim_t=config["text_cfg"]["width"],
                                                 dim_out=config["vision_cfg"]["width"])
    generator = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():  # non-default values where the defaults would hide a dropped piece (see the docstring)
        model.prompt_norm.weight.copy_(1 + 0.1 * torch.randn(model.prompt_norm.weight.shape, generator=generator))
        model.prompt_norm.bias.copy_(0.05 * torch.randn(model.prompt_norm.bias.shape, generator=generator))
        pre.prompt_temp.fill_(math.log(1 / 0.05))
        post.prompt_temp_l1.fill_(math.log(1 / 0.09))
    prompt = ref["models.prompt_ensemble"].Prompt_Ensemble(PROMPT_LEN, clip_module.tokenize)
    return types.SimpleNamespace(model=model, linear=linear, pre=pre, post=post, prompt=prompt,
                                 preprocess=preprocess, size=size, features=list(features))


def learned_state(parts: types.SimpleNamespace) -> dict[str, Any]:
    """Returns the learned parts in the authors' layout (train.py's ``save_dict``)."""
    model_prompts = {n: p for n, p in parts.model.named_parameters() if "prompt" in n}  # train.py _freeze_stages
    return {"trainable_linearlayer": parts.linear.state_dict(), "New_Lan_Embed": parts.pre.state_dict(),
            "Zero_try": parts.post.state_dict(), **{n: p.detach().clone() for n, p in model_prompts.items()}}


def reference_forward(parts: types.SimpleNamespace, batch: torch.Tensor) -> dict[str, Any]:
    """Returns the reference's per-layer maps of a batch: test.py lines 160-205 (train.py 166-206 are the same)."""
    model, linear, pre, post, prompt, size = (parts.model, parts.linear, parts.pre, parts.post, parts.prompt,
                                              parts.size)
    with cuda_string_stays_on_cpu():
        with torch.no_grad():
            image_features, patch_tokens = model.encode_image(batch, parts.features)
        class_token = pre.before_extract_feat(patch_tokens, image_features.clone(), use_global=True)
        text_embeddings = prompt.forward_ensemble(model, class_token, "cpu")
    text_embeddings = text_embeddings.permute(0, 2, 1)
    maps_new, maps_raw = [], []
    for layer in range(len(patch_tokens)):
        dense_feature = patch_tokens[layer][:, 1:, :].clone()
        dense_feature = dense_feature / dense_feature.norm(dim=-1, keepdim=True)
        _, f_t_a = post(text_embeddings.permute(0, 2, 1), dense_feature)
        anomaly_map_new = (post.prompt_temp_l1.exp() * dense_feature @ f_t_a.permute(0, 2, 1))
        b, n, _ = anomaly_map_new.shape
        h = int(np.sqrt(n))
        anomaly_map_new = F.interpolate(anomaly_map_new.permute(0, 2, 1).view(b, 2, h, h), size=size,
                                        mode="bilinear", align_corners=True)
        maps_new.append(torch.softmax(anomaly_map_new, dim=1))
    patch_tokens_linear = linear(patch_tokens)
    for layer in range(len(patch_tokens_linear)):
        dense_feature = patch_tokens_linear[layer].clone()
        dense_feature = dense_feature / dense_feature.norm(dim=-1, keepdim=True)
        anomaly_map_raw = (pre.prompt_temp.exp() * dense_feature @ text_embeddings)
        b, n, _ = anomaly_map_raw.shape
        h = int(np.sqrt(n))
        anomaly_map_raw = F.interpolate(anomaly_map_raw.permute(0, 2, 1).view(b, 2, h, h), size=size,
                                        mode="bilinear", align_corners=True)
        maps_raw.append(torch.softmax(anomaly_map_raw, dim=1))
    return {"global": image_features, "taps": patch_tokens, "class_token": class_token,
            "text": text_embeddings.permute(0, 2, 1), "raw": maps_raw, "new": maps_new}


def reference_scores(out: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Returns (image scores, smoothed maps, raw map, new map): test.py's layer means and calcuate_metric's fusion."""
    from scipy.ndimage import gaussian_filter

    raw = np.mean([m[:, 1].numpy() for m in out["raw"]], axis=0)
    new = np.mean([m[:, 1].numpy() for m in out["new"]], axis=0)
    smoothed = gaussian_filter(ALPHA * raw + (1 - ALPHA) * new, sigma=SIGMA, axes=(1, 2))
    top_raw = np.partition(raw.reshape(raw.shape[0], -1), kth=-TOP_K)[:, -TOP_K:]
    top_new = np.partition(new.reshape(new.shape[0], -1), kth=-TOP_K)[:, -TOP_K:]
    score = np.mean(top_raw, axis=1) + np.mean(top_new, axis=1)
    return torch.from_numpy(score), torch.from_numpy(smoothed), raw, new


def main() -> None:
    """Builds the reference, records inference (and optionally one training step), saves the learned parts."""
    parser = common.common_arguments(__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--train", action="store_true", help="also record one training step")
    parser.add_argument("--features", type=int, nargs="+", default=FEATURES, help="tapped vision blocks")
    args = parser.parse_args()
    common.setup_torch(args.threads)
    root = Path(args.ref_root).resolve()
    ref = import_reference(root)
    size = args.image_size
    parts = build_reference(ref, root, args.weights, size, args.seed, args.features)
    model, linear, pre, post = parts.model, parts.linear, parts.pre, parts.post
    stem = os.path.splitext(args.out)[0]
    torch.save(learned_state(parts), f"{stem}_vcpclip.pth")

    raw_images, masks, labels = common.query_images(args.images, args.seed)
    images = common.transformed(parts.preprocess, raw_images)
    record: dict[str, Any] = {"images_uint8": [torch.from_numpy(a) for a in raw_images], "image": images,
                              "features": list(args.features),
                              "pos_embed": model.visual.positional_embedding.detach().clone()}

    def forward(batch: torch.Tensor) -> dict[str, Any]:
        return reference_forward(parts, batch)

    started = time.perf_counter()
    model.eval(), linear.eval(), pre.eval(), post.eval()  # test.py
    with torch.no_grad():
        out = forward(images)
    record["inference_seconds"] = time.perf_counter() - started
    record["global"] = out["global"]
    record["taps"] = torch.stack(out["taps"], 1)
    record["class_token"] = out["class_token"]
    record["text_features"] = out["text"]
    score, smoothed, raw, new = reference_scores(out)
    record["map_raw"], record["map_new"] = torch.from_numpy(raw), torch.from_numpy(new)
    record["map"], record["score"] = smoothed, score

    if args.train:
        model.train(), linear.train(), pre.train(), post.train()  # train.py (the CLIP is never put in eval mode)
        model.prompt_dropout.p = 0.0  # see the docstring
        model_optim = ref["train"]._freeze_stages(model, "prompt")
        group_pre = [m for n, m in pre.named_parameters() if n != "prompt_temp"]
        group1 = [m for n, m in post.named_parameters() if n not in ["prompt_temp_l1"]]
        group2 = [post.prompt_temp_l1]
        lr_group1 = list(linear.parameters()) + group_pre + list(model_optim.values())
        optimizer = torch.optim.Adam([{"params": group1 + lr_group1, "lr": 4e-5},
                                      {"params": group2 + [pre.prompt_temp], "lr": 0.01}], lr=4e-5, betas=(0.5, 0.999))
        loss_focal, loss_dice = ref["utils.loss"].FocalLoss(), ref["utils.loss"].BinaryDiceLoss()
        train_images = images[:2]
        mask_transform = transforms.Compose([transforms.Resize((size, size)), transforms.CenterCrop(size),
                                             transforms.ToTensor()])  # test.py / utils/dataset.py target_transform
        target = common.binarised_masks(mask_transform, list(masks[:2]))
        started = time.perf_counter()
        step = forward(train_images)
        gt = target.squeeze()  # train.py: items['img_mask'].squeeze(), then binarised
        gt[gt > 0.5], gt[gt < 0.5] = 1, 0
        loss_new = 0
        for num in range(len(step["new"])):
            loss_new += loss_focal(step["new"][num], gt)
            loss_new += loss_dice(step["new"][num][:, 1, :, :], gt)
        loss_base = 0
        for num in range(len(step["raw"])):
            loss_base += loss_focal(step["raw"][num], gt)
            loss_base += loss_dice(step["raw"][num][:, 1, :, :], gt)
        loss = loss_new + loss_base
        optimizer.zero_grad()
        loss.backward()
        named = {**{f"trainable_linearlayer.{n}": p for n, p in linear.named_parameters()},
                 **{f"New_Lan_Embed.{n}": p for n, p in pre.named_parameters()},
                 **{f"Zero_try.{n}": p for n, p in post.named_parameters()}, **model_optim}
        record["train_grads"] = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}
        optimizer.step()
        record["train_seconds"] = time.perf_counter() - started
        record["train_mask"] = gt.detach().clone()
        record["train_loss"] = loss.detach().clone()
        record["train_loss_raw"] = loss_base.detach().clone()
        record["train_loss_new"] = loss_new.detach().clone()
        record["train_params_after"] = {n: p.detach().clone() for n, p in named.items()}
    record["meta"] = common.run_metadata(args, "xiaozhen228/VCP-CLIP", FILES, image_size=size,
                                         shims=ref["shims"].installed)  # type: ignore[attr-defined]
    common.save_output(record, args.out)
    print(f"learned parts: {stem}_vcpclip.pth; inference {record['inference_seconds']:.1f} s, "
          f"training step {record.get('train_seconds', 0):.1f} s")


if __name__ == "__main__":
    main()
