"""Inference throughput of zsadbench's AdaCLIP, full-size architecture, random weights, CPU.

    python benchmarks/bench_adaclip.py [--images 1] [--repeats 2] [--threads 2] [--ref-root PATH]

zsadbench's AdaCLIP (ViT-L-14-336, exact GELU, 518 px, hybrid prompts in both encoders, taps 6/12/18/24, HSF with
k-means) runs on seeded random weights and untrained (randomly initialised) prompts. Timed: ``predict`` on a batch: the
prompt-free pass for the dynamic prompts, the prompted vision pass, the per-image prompted text (48 sentences), the
maps, HSF and the Gaussian; images/s.

Reference in the same run: with ``--ref-root`` (a work tree of caoyunkang/AdaCLIP, used in place and never copied;
see tests/parity/ref_adaclip.py for what it needs) its ``AdaCLIP.forward(image, [class], aggregation=True)`` per image
(it runs batch 1) plus scipy's Gaussian, on the same weights and learned parts; target ratio >= 1. Without it, the
plain vision forward alone: the ratio shows what the prompts, the text and HSF cost on top of one backbone pass. Runs
alternate so that load from other processes hits all alike; medians are reported with the load average.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from clip_bench import clip_arguments, compare_rates, print_agreement, random_weights, vision_forward

CLASS_NAME = "metal_nut"


def reference(ref_root: str, weights: Path, learned: dict, image_size: int):  # noqa: ANN001, ANN201
    """Returns a function running the reference's inference on a batch, one image at a time as it does."""
    import numpy as np
    import torch
    from scipy.ndimage import gaussian_filter

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "parity"))
    from ref_adaclip import build_reference, import_reference  # type: ignore[import-not-found]

    modules = import_reference(ref_root)
    model, _ = build_reference(modules, ref_root, str(weights), image_size, seed=0, kmeans_seed=0)
    missing, unexpected = model.load_state_dict({k.removeprefix("clip_model."): v for k, v in learned.items()},
                                                strict=False)
    assert not unexpected and all(k.startswith(("freeze_clip.", "visual.", "transformer.", "token_embedding",
                                                "positional_embedding", "ln_final", "text_projection"))
                                  for k in missing), (missing, unexpected)
    model.eval()

    def infer(images):
        maps, scores = [], []
        with torch.no_grad():
            for image in images:
                anomaly_map, score = model(image.unsqueeze(0), [CLASS_NAME], aggregation=True)
                maps.append(gaussian_filter(anomaly_map[0].numpy(), sigma=4))
                scores.append(score[0])
        return torch.stack(scores), torch.from_numpy(np.stack(maps))

    return infer


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    parser = clip_arguments(__doc__.splitlines()[0])
    parser.set_defaults(model="ViT-L-14-336", images=1, repeats=2)
    parser.add_argument("--ref-root", help="a work tree of caoyunkang/AdaCLIP to time the reference against")
    args = parser.parse_args()
    import torch

    import zsadbench
    from zsadbench.clip.testing import synthetic_images

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*no checkpoint")  # untrained prompts are fine for timing
    with random_weights(args.model) as (state, weights):
        detector = zsadbench.load_method("adaclip", model=args.model, pretrained=str(weights),
                                         image_size=args.image_size)
        images = torch.stack([detector.transform(im) for im in synthetic_images(args.images, seed=0,
                                                                                anomalous=(0,))])
        runners: dict[str, Callable[[], object]] = {"zsadbench": lambda: detector.predict(images, CLASS_NAME)}
        if args.ref_root:
            ref = reference(args.ref_root, weights, detector.reference_state_dict(), args.image_size)
            runners["caoyunkang/AdaCLIP"] = lambda: ref(images)
            ours, theirs = detector.predict(images, CLASS_NAME), ref(images)
            print_agreement(ours, theirs)
        else:
            runners["plain vision forward only"] = vision_forward(detector.clip.visual, images)
        del state
        baseline = "caoyunkang/AdaCLIP" if args.ref_root else "plain vision forward only"
        compare_rates("AdaCLIP", args, runners, baseline)

if __name__ == "__main__":
    main()
