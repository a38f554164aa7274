"""Inference throughput and training-step time of zsadbench's AnomalyCLIP, full-size architecture, random weights, CPU.

    python benchmarks/bench_anomalyclip.py [--images 2] [--repeats 3] [--threads 2] [--ref-root PATH]

zsadbench's AnomalyCLIP (ViT-L-14-336-quickgelu at 518 px, DPAM from layer 6, 12 + 8x4 learnable prompt tokens) runs
on seeded random weights; text features are computed before timing (the method caches them). Timed:

- inference: ``predict`` on a batch (dual-path forward, scoring, upsampling, Gaussian), images/s;
- training step: one optimiser step of ``training_step`` on the same batch with random masks, s/step.

Reference in the same run: with ``--ref-root`` (a checkout of zqhang/AnomalyCLIP) the authors' implementation on the
same weights, prompts and batch (their ``encode_image`` + ``compute_similarity`` + scipy Gaussian; their train.py
step); target ratio >= 1. Without it, plain open_clip ``encode_image`` at 518 px (no V-V path, no scoring): the ratio
shows what the DPAM path and scoring cost on top of one standard forward. Runs alternate so that load from other
processes hits all alike; medians are reported with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from clip_bench import clip_arguments, install_reference_shims, print_rates, random_weights, timed


def parse_args() -> argparse.Namespace:
    """Returns the command-line options."""
    parser = clip_arguments(__doc__.splitlines()[0])
    parser.add_argument("--ref-root", help="a checkout of zqhang/AnomalyCLIP to time the reference against")
    parser.add_argument("--no-train", action="store_true", help="time inference only")
    return parser.parse_args()


def reference(ref_root: str, state: dict, prompt_state: dict, image_size: int):  # noqa: ANN201 - reference objects
    """Returns (reference inference fn, reference train-step fn) built from the authors' code on the same weights."""
    import torch
    import torch.nn.functional as F

    install_reference_shims()
    sys.path.insert(0, str(Path(ref_root).resolve()))
    from AnomalyCLIP_lib import compute_similarity, get_similarity_map  # type: ignore[import-not-found]
    from AnomalyCLIP_lib.build_model import build_model  # type: ignore[import-not-found]
    from loss import BinaryDiceLoss, FocalLoss  # type: ignore[import-not-found]
    from prompt_ensemble import AnomalyCLIP_PromptLearner  # type: ignore[import-not-found]
    from scipy.ndimage import gaussian_filter

    design = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
    model = build_model("ViT-L/14@336px", dict(state), design).float().eval()
    learner = AnomalyCLIP_PromptLearner(model, design)
    learner.load_state_dict(prompt_state, strict=True)
    model.visual.DAPM_replace(DPAM_layer=20)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3, betas=(0.5, 0.999))

    def text_features():
        prompts, tokens, deep = learner(cls_id=None)
        features = model.encode_text_learn(prompts, tokens, deep).float()
        features = torch.stack(torch.chunk(features, dim=0, chunks=2), dim=1)
        return features / features.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        cached = text_features()

    def infer(images):
        with torch.no_grad():
            image_features, patches = model.encode_image(images, [24], DPAM_layer=20)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            scores = ((image_features.unsqueeze(1) @ cached.permute(0, 2, 1))[:, 0] / 0.07).softmax(-1)[:, 1]
            patch = patches[0] / patches[0].norm(dim=-1, keepdim=True)
            similarity, _ = compute_similarity(patch, cached[0])
            maps = get_similarity_map(similarity[:, 1:, :], image_size)
            maps = (maps[..., 1] + 1 - maps[..., 0]) / 2
            maps = torch.stack([torch.from_numpy(gaussian_filter(m, sigma=4)) for m in maps.numpy()])
        return scores, maps

    focal, dice = FocalLoss(), BinaryDiceLoss()

    def train_step(images, masks, labels):
        with torch.no_grad():
            image_features, patches = model.encode_image(images, [24], DPAM_layer=20)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text = text_features()
        logits = (image_features.unsqueeze(1) @ text.permute(0, 2, 1))[:, 0] / 0.07
        image_loss = F.cross_entropy(logits, labels.long())
        patch = patches[0] / patches[0].norm(dim=-1, keepdim=True)
        similarity, _ = compute_similarity(patch, text[0])
        maps = get_similarity_map(similarity[:, 1:, :], image_size).permute(0, 3, 1, 2)
        loss = 4 * (focal(maps, masks) + dice(maps[:, 1], masks) + dice(maps[:, 0], 1 - masks))
        optimizer.zero_grad()
        (loss + image_loss).backward()
        optimizer.step()

    return infer, train_step


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    args = parse_args()
    import torch
    from zsadbench.methods.anomalyclip import AnomalyCLIP

    from zsadbench.clip.testing import synthetic_images

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="anomalyclip: no checkpoint")  # random prompts are fine for timing
    with random_weights(args.model) as (state, weights):
        ours = AnomalyCLIP(model=args.model, pretrained=str(weights), image_size=args.image_size)
    images = torch.stack([ours.transform(im) for im in synthetic_images(args.images, seed=0, anomalous=(0,))])
    masks = (torch.rand(args.images, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
             > 0.97).float()
    labels = torch.tensor([i % 2 for i in range(args.images)])
    prompt_state = ours.prompt_learner.reference_state_dict()
    ours.text_features()
    optimizer = ours.make_optimizer()

    def our_train_step() -> None:
        ours.set_train_mode(True)
        losses = ours.training_step(images, masks, labels)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        ours.set_train_mode(False)

    if args.ref_root:
        ref_infer, ref_train = reference(args.ref_root, state, prompt_state, args.image_size)
        baseline_name = "zqhang/AnomalyCLIP"

        def baseline_infer() -> object:
            return ref_infer(images)

        def reference_train() -> object:
            return ref_train(images, masks, labels)

        baseline_train: Callable[[], object] | None = reference_train
    else:
        baseline_name = "open_clip encode_image"

        def baseline_infer() -> object:
            with torch.no_grad():
                return ours.clip.encode_image(images)

        baseline_train = None
    del state

    load_before = os.getloadavg()[0]
    infer = timed({"zsadbench": lambda: ours.predict(images, "bench"), baseline_name: baseline_infer}, args.repeats)
    train = {} if args.no_train else timed(
        {"zsadbench": our_train_step, **({baseline_name: baseline_train} if baseline_train else {})}, args.repeats)
    load_after = os.getloadavg()[0]

    print(f"AnomalyCLIP, {args.model} @ {args.image_size}px, random weights, batch {args.images}, {args.threads} "
          f"threads, {args.repeats} timed runs each (1-min load average {load_before:.2f} -> {load_after:.2f})")
    rates = print_rates("inference", infer, args.images)
    print(f"  inference ratio zsadbench / {baseline_name} images/s = {rates['zsadbench'] / rates[baseline_name]:.2f}"
          + (" (target >= 1.0)" if args.ref_root else " (the V-V path and scoring on top of one plain forward)"))
    for name, values in train.items():
        print(f"  train step {name:24s} median {statistics.median(values):7.2f} s/step ({args.images} images)"
              f"  (all: {', '.join(f'{v:.1f}' for v in values)})")
    if baseline_name in train:
        ratio = statistics.median(train[baseline_name]) / statistics.median(train["zsadbench"])
        print(f"  training ratio {baseline_name} / zsadbench s/step = {ratio:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
