"""Inference throughput of zsadbench's APRIL-GAN, zero-shot and 1-shot, full-size architecture, random weights, CPU.

    python benchmarks/bench_aprilgan.py [--images 2] [--repeats 3] [--threads 2] [--ref-root PATH]

zsadbench's APRIL-GAN (ViT-L-14-336 with exact GELU at 518 px, taps 6/12/18/24, linear adapters) runs on seeded random
weights and untrained adapters; the text features and the 1-shot memory are built before timing (the method computes
them once per category). Timed: scoring a batch of images (``predict``; 1-shot: ``predict_set`` over the batch, the
memory branch and the min-max normalised scores included), images/s.

Reference in the same run: with ``--ref-root`` (a work tree of ByChelsea/VAND-APRIL-GAN, MIT, used in place and never
copied; its ``open_clip`` package is imported under another name so that it does not meet the installed one) the
per-image loop body of its test.py on the same weights, adapters and images: one image at a time as its DataLoader
gives them, a second forward for the few-shot branch and sklearn's cosine similarity, as it runs. Target ratio >= 1.
Without it, the plain forward with the four taps alone. Runs alternate so that load from other processes hits all
alike; medians are reported with the load average.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from clip_bench import clip_arguments, print_rates, random_weights, timed

LAYERS = [6, 12, 18, 24]


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """Maps ``Tensor.to('cuda')`` to the CPU (the reference's forward builds an unused attention summary on 'cuda')."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.to

    def to(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            args = ("cpu", *args[1:])
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


def import_reference_open_clip(ref_root: Path):  # noqa: ANN201
    """Returns the reference's ``open_clip`` package, imported as ``vand_open_clip``."""
    package = ref_root / "open_clip"
    spec = importlib.util.spec_from_file_location("vand_open_clip", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["vand_open_clip"] = module
    spec.loader.exec_module(module)
    return module


def reference(ref_root: str, weights: Path, adapters: dict, normal, image_size: int,  # noqa: ANN001, ANN201
              category: str):
    """Returns (zero-shot fn, 1-shot fn) replaying the reference's test.py loop body (same weights, adapters)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import pairwise

    root = Path(ref_root).resolve()
    vand = import_reference_open_clip(root)
    sys.path.insert(0, str(root))
    from model import LinearLayer  # type: ignore[import-not-found]
    from prompt_ensemble import encode_text_with_prompt_ensemble  # type: ignore[import-not-found]

    loader = vand.factory.load_openai_model
    vand.factory.load_openai_model = lambda name, **kw: loader(str(weights), **kw)
    model = vand.create_model("ViT-L-14-336", image_size, pretrained="openai").eval()
    linearlayer = LinearLayer(1024, 768, len(LAYERS), "ViT-L-14-336")
    linearlayer.load_state_dict(adapters["trainable_linearlayer"])
    with torch.no_grad(), cuda_to_cpu():
        text_prompts = encode_text_with_prompt_ensemble(model, [category], vand.get_tokenizer("ViT-L-14-336"), "cpu")
        _, memory_tokens = model.encode_image(normal, LAYERS)
    memory = [p[0, 1:, :] for p in memory_tokens]

    def infer(images, shots: int):  # noqa: ANN001, ANN202
        scores, maps = [], []
        with torch.no_grad(), cuda_to_cpu():
            for index in range(len(images)):
                image_features, patch_tokens = model.encode_image(images[index:index + 1], LAYERS)
                image_features /= image_features.norm(dim=-1, keepdim=True)
                text_features = torch.stack([text_prompts[category]], dim=0)
                scores.append((100.0 * image_features @ text_features[0]).softmax(dim=-1)[0][1].item())
                patch_tokens = linearlayer(patch_tokens)
                anomaly_maps = []
                for layer in range(len(patch_tokens)):
                    patch_tokens[layer] /= patch_tokens[layer].norm(dim=-1, keepdim=True)
                    anomaly_map = 100.0 * patch_tokens[layer] @ text_features
                    b, n, _ = anomaly_map.shape
                    side = int(np.sqrt(n))
                    anomaly_map = F.interpolate(anomaly_map.permute(0, 2, 1).view(b, 2, side, side), size=image_size,
                                                mode="bilinear", align_corners=True)
                    anomaly_maps.append(torch.softmax(anomaly_map, dim=1)[:, 1, :, :].numpy())
                anomaly_map = np.sum(anomaly_maps, axis=0)
                if shots:
                    _, patch_tokens = model.encode_image(images[index:index + 1], LAYERS)
                    few_shot = []
                    for idx, p in enumerate(patch_tokens):
                        cos = pairwise.cosine_similarity(memory[idx], p[0, 1:, :])
                        side = int(np.sqrt(cos.shape[1]))
                        distance = np.min(1 - cos, 0).reshape(1, 1, side, side)
                        few_shot.append(F.interpolate(torch.tensor(distance), size=image_size, mode="bilinear",
                                                      align_corners=True)[0].numpy())
                    anomaly_map = anomaly_map + np.sum(few_shot, axis=0)
                maps.append(anomaly_map)
        maxima = np.array([m.max() for m in maps])
        if shots:
            scores = list(0.5 * (np.array(scores) + (maxima - maxima.min()) / (maxima.max() - maxima.min())))
        return np.array(scores), np.concatenate(maps)

    return (lambda images: infer(images, 0)), (lambda images: infer(images, 1))


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    parser = clip_arguments(__doc__.splitlines()[0])
    parser.set_defaults(model="ViT-L-14-336")
    parser.add_argument("--ref-root", help="a work tree of ByChelsea/VAND-APRIL-GAN to time the reference against")
    args = parser.parse_args()
    import torch

    import zsadbench
    from zsadbench.clip.testing import synthetic_images
    from zsadbench.clip.vision import forward_vision
    from zsadbench.detector import ImageSet

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*no checkpoint")  # untrained adapters are fine for timing
    options = {"model": args.model, "image_size": args.image_size}
    category = "metal_nut"
    with random_weights(args.model) as (state, weights):
        zero = zsadbench.load_method("aprilgan", pretrained=str(weights), **options)
        one = zsadbench.load_method("aprilgan", pretrained=str(weights), shots=1, **options)
        one.load_state_dict(zero.state_dict())  # the same adapters in both
        images = torch.stack([zero.transform(im) for im in synthetic_images(args.images, seed=0, anomalous=(0,))])
        normal = torch.stack([zero.transform(im) for im in synthetic_images(1, seed=1)])
        for detector in (zero, one):
            detector.text_features(category)
        one.set_reference(normal, category)
        image_set = ImageSet.from_tensor(images, batch_size=len(images))
        runners: dict[str, Callable[[], object]] = {
            "zsadbench 0-shot": lambda: zero.predict(images, category),
            "zsadbench 1-shot": lambda: one.predict_set(image_set, category)}
        if args.ref_root:
            ref_zero, ref_one = reference(args.ref_root, weights, zero.reference_state_dict(), normal,
                                          args.image_size, category)
            runners |= {"VAND-APRIL-GAN 0-shot": lambda: ref_zero(images),
                        "VAND-APRIL-GAN 1-shot": lambda: ref_one(images)}
            ours, theirs = one.predict_set(image_set, category), ref_one(images)
            print(f"  (1-shot outputs agree: scores {(ours.image_scores - torch.from_numpy(theirs[0])).abs().max():.1e}"
                  f", maps {(ours.anomaly_maps - torch.from_numpy(theirs[1])).abs().max():.1e} max abs; the reference "
                  "loads the weights through fp16, so this is not the parity figure)")
        else:
            def backbone() -> object:
                with torch.no_grad():
                    return forward_vision(zero.clip.visual, images, taps=LAYERS)

            runners["forward only"] = backbone
    del state

    load_before = os.getloadavg()[0]
    times = timed(runners, args.repeats)
    load_after = os.getloadavg()[0]
    print(f"APRIL-GAN, {args.model} @ {args.image_size}px, random weights, batch {args.images}, {args.threads} "
          f"threads, {args.repeats} timed runs each (1-min load average {load_before:.2f} -> {load_after:.2f})")
    rates = print_rates("inference", times, args.images)
    for shots in ("0-shot", "1-shot"):
        baseline = f"VAND-APRIL-GAN {shots}" if args.ref_root else "forward only"
        target = " (target >= 1.0)" if args.ref_root else ""
        print(f"  ratio zsadbench {shots} / {baseline} images/s = "
              f"{rates[f'zsadbench {shots}'] / rates[baseline]:.2f}{target}")


if __name__ == "__main__":
    main()
