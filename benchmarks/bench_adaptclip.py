"""Inference throughput of zsadbench's AdaptCLIP, zero-shot and 1-shot, full-size architecture, random weights, CPU.

    python benchmarks/bench_adaptclip.py [--images 2] [--repeats 3] [--threads 2] [--ref-root PATH]

zsadbench's AdaptCLIP (ViT-L-14-336-quickgelu at 518 px, DPAM from layer 6, taps 6/12/18/24) runs on seeded random
weights and untrained adapters; the static and learned text features and the 1-shot prompt memory are built before
timing (the method computes them once per run and per category). Timed: ``predict`` on a batch (dual-path forward,
the VA and TA branches, for 1-shot the PQA on four layers, the fusions and the Gaussian), images/s.

Reference in the same run: with ``--ref-root`` (a work tree of gaobb/AdaptCLIP, GPL-2.0, used in place and never
copied) the authors' test.py inference on the same weights, adapters and batch; target ratio >= 1. Without it, the
dual-path forward alone (``forward_dual_path`` with the four taps): the ratio shows what the adapters and the fusion
cost on top of the backbone. Runs alternate so that load from other processes hits all alike; medians are reported
with the load average.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from clip_bench import clip_arguments, install_reference_shims, print_rates, random_weights, timed


def reference(ref_root: str, state: dict, adapters: dict, prompt, image_size: int):  # noqa: ANN001, ANN201
    """Returns (zero-shot fn, 1-shot fn) replaying the reference test.py inference on the same weights and adapters."""
    import torch
    from scipy.ndimage import gaussian_filter

    install_reference_shims()
    sys.path.insert(0, str(Path(ref_root).resolve()))
    from adaptcliplib import PQAdapter, TextualAdapter, VisualAdapter, fusion_fun  # type: ignore[import-not-found]
    from adaptcliplib.build_model import build_model  # type: ignore[import-not-found]

    model = build_model("ViT-L/14@336px", dict(state)).float().eval()
    model.visual.DAPM_replace(DPAM_layer=20)
    layers, patch = [6, 12, 18, 24], model.visual.conv1.weight.shape[-1]
    textual = TextualAdapter(model, image_size, 12).eval()
    visual = VisualAdapter(image_size, patch, input_dim=768, reduction=4).eval()
    pq = PQAdapter(image_size, patch, context=True, input_dim=768, mid_dim=128, layers_num=4).eval()
    for module, key in ((textual, "textual_learner"), (visual, "visual_learner"), (pq, "pq_learner")):
        module.load_state_dict(adapters[key])
    cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda self, *a, **k: self  # its static text calls .cuda()
    try:
        textual.prepare_static_text_feature(model)
    finally:
        torch.Tensor.cuda = cuda
    static = textual.static_text_features
    with torch.no_grad():
        learned = model.encode_text_learn(*textual()).float()
        _, prompt_patches = model.encode_image(prompt, layers, DPAM_layer=20)

    def infer(images, shots: int):
        with torch.no_grad():
            g, patches = model.encode_image(images, layers, DPAM_layer=20)
            va_logit, va_map = visual(g, patches, static)
            ta_logit, ta_map = textual.compute_global_local_score(g, patches, learned)
            s_va, s_ta = va_logit.softmax(-1)[:, 1], ta_logit.softmax(-1)[:, 1]
            if shots == 0:
                fused = fusion_fun([va_map[:, 1], ta_map[:, 1]], fusion_type="average_mean")
                maps = torch.stack([torch.from_numpy(gaussian_filter(m, sigma=4)) for m in fused.numpy()])
                return fusion_fun([s_va, s_ta, maps.flatten(1).amax(1)], fusion_type="average_mean"), maps
            memory = [p.unsqueeze(0).expand(len(images), *p.shape) for p in prompt_patches]
            pq_logits, pq_maps, alignments = pq(g, patches, None, memory)
            pq_map = torch.stack([m[:, 1] for m in pq_maps], dim=1).mean(dim=1)
            alignment = fusion_fun(alignments, fusion_type="harmonic_mean")[:, 0]
            s_pq = torch.stack([x.softmax(-1) for x in pq_logits], dim=-1).mean(dim=-1)[:, 1]
            fused = fusion_fun([va_map[:, 1], ta_map[:, 1], pq_map], fusion_type="average_mean")
            fused = fusion_fun([fused, alignment], fusion_type="harmonic_mean")
            maps = torch.stack([torch.from_numpy(gaussian_filter(m, sigma=4)) for m in fused.numpy()])
            score = fusion_fun([s_va, s_ta, s_pq], fusion_type="average_mean")
            return fusion_fun([score, maps.flatten(1).amax(1)], fusion_type="harmonic_mean"), maps

    return (lambda images: infer(images, 0)), (lambda images: infer(images, 1))


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    parser = clip_arguments(__doc__.splitlines()[0])
    parser.add_argument("--ref-root", help="a work tree of gaobb/AdaptCLIP to time the reference against")
    args = parser.parse_args()
    import torch

    import zsadbench
    from zsadbench.clip.dual_path import forward_dual_path
    from zsadbench.clip.testing import synthetic_images

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*no checkpoint")  # untrained adapters are fine for timing
    options = {"model": args.model, "image_size": args.image_size}
    with random_weights(args.model) as (state, weights):
        zero = zsadbench.load_method("adaptclip", pretrained=str(weights), **options)
        one = zsadbench.load_method("adaptclip", pretrained=str(weights), shots=1, **options)
    one.load_state_dict(zero.state_dict())  # the same adapters in both
    images = torch.stack([zero.transform(im) for im in synthetic_images(args.images, seed=0, anomalous=(0,))])
    prompt = torch.stack([zero.transform(im) for im in synthetic_images(1, seed=1)])
    for detector in (zero, one):
        detector.static_text(), detector.learned_text()
    one.set_reference(prompt, "bench")

    runners: dict[str, Callable[[], object]] = {"zsadbench 0-shot": lambda: zero.predict(images, "bench"),
                                                "zsadbench 1-shot": lambda: one.predict(images, "bench")}
    if args.ref_root:
        ref_zero, ref_one = reference(args.ref_root, state, zero.reference_state_dict(), prompt, args.image_size)
        runners |= {"gaobb/AdaptCLIP 0-shot": lambda: ref_zero(images),
                    "gaobb/AdaptCLIP 1-shot": lambda: ref_one(images)}
        ours, theirs = one.predict(images, "bench"), ref_one(images)
        print(f"  (1-shot outputs agree: scores {(ours.image_scores - theirs[0]).abs().max():.1e}, maps "
              f"{(ours.anomaly_maps - theirs[1]).abs().max():.1e} max abs)")
    else:
        def backbone() -> object:
            with torch.no_grad():
                return forward_dual_path(zero.clip.visual, images, vv_taps=(6, 12, 18, 24))

        runners["dual-path forward only"] = backbone
    del state

    load_before = os.getloadavg()[0]
    times = timed(runners, args.repeats)
    load_after = os.getloadavg()[0]
    print(f"AdaptCLIP, {args.model} @ {args.image_size}px, random weights, batch {args.images}, {args.threads} "
          f"threads, {args.repeats} timed runs each (1-min load average {load_before:.2f} -> {load_after:.2f})")
    rates = print_rates("inference", times, args.images)
    for shots in ("0-shot", "1-shot"):
        baseline = f"gaobb/AdaptCLIP {shots}" if args.ref_root else "dual-path forward only"
        target = " (target >= 1.0)" if args.ref_root else ""
        print(f"  ratio zsadbench {shots} / {baseline} images/s = "
              f"{rates[f'zsadbench {shots}'] / rates[baseline]:.2f}{target}")


if __name__ == "__main__":
    main()
