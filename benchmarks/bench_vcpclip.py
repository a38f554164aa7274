"""Inference throughput of zsadbench's VCP-CLIP, full-size architecture, random weights, CPU.

    python benchmarks/bench_vcpclip.py [--images 1] [--repeats 2] [--threads 2] [--model ViT-L-14-336] \\
        [--image-size 518] [--ref-root PATH]

zsadbench's VCP-CLIP (ViT-L-14-336, exact GELU, 518 px, taps 6/12/18/24) runs on seeded random weights and untrained
(randomly initialised) parts. Timed: ``predict`` on a batch: the vision pass, the pre-VCP class vectors, the per-image
text (2 prompts through the text tower with inserted embeddings), both maps per tap, the fusion, the Gaussian and the
top-2000 scores; images/s.

Reference in the same run: with ``--ref-root`` (a work tree of xiaozhen228/VCP-CLIP, used in place and never copied;
tests/parity/ref_vcpclip.py builds and runs it) test.py's inference statements on the batch plus its fusion, scipy's
Gaussian and the top-2000 scores, on the same weights and learned parts; target ratio >= 1. Without it, the plain
vision forward alone. Runs alternate so that load from other processes hits all alike; medians are reported with the
load average.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from clip_bench import clip_arguments, compare_rates, print_agreement, random_weights, vision_forward


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    parser = clip_arguments(__doc__.splitlines()[0])
    parser.set_defaults(model="ViT-L-14-336", images=1, repeats=2)
    parser.add_argument("--ref-root", help="a work tree of xiaozhen228/VCP-CLIP to time the reference against")
    args = parser.parse_args()
    import torch

    import zsadbench
    from zsadbench.clip.testing import synthetic_images

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*no checkpoint")  # untrained parts are fine for timing
    warnings.filterwarnings("ignore", message=".*ACTIVATION MISMATCH")
    with random_weights(args.model, fp16_grid=True) as (state, weights):  # the reference's loader rounds them
        detector = zsadbench.load_method("vcpclip", model=args.model, pretrained=str(weights),
                                         image_size=args.image_size)
        pil = synthetic_images(args.images, seed=0, anomalous=(0,))
        images = torch.stack([detector.transform(im) for im in pil])
        runners: dict[str, Callable[[], object]] = {"zsadbench": lambda: detector.predict(images, "object")}
        if args.ref_root:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "parity"))
            import ref_vcpclip  # type: ignore[import-not-found]

            root = Path(args.ref_root).resolve()
            parts = ref_vcpclip.build_reference(ref_vcpclip.import_reference(root), root, str(weights),
                                                args.image_size, seed=0)
            for module in (parts.model, parts.linear, parts.pre, parts.post):
                module.eval()
            learned = detector.reference_state_dict()
            parts.linear.load_state_dict(learned["trainable_linearlayer"])
            parts.pre.load_state_dict(learned["New_Lan_Embed"])
            parts.post.load_state_dict(learned["Zero_try"])
            with torch.no_grad():
                for name, p in parts.model.named_parameters():
                    if "prompt" in name:
                        p.copy_(learned[name])

            def ref() -> tuple[torch.Tensor, torch.Tensor]:
                with torch.no_grad():
                    score, smoothed, _, _ = ref_vcpclip.reference_scores(ref_vcpclip.reference_forward(parts, images))
                return score, smoothed

            runners["xiaozhen228/VCP-CLIP"] = ref
            ours, theirs = detector.predict(images, "object"), ref()
            print_agreement(ours, theirs)
        else:
            runners["plain vision forward only"] = vision_forward(detector.clip.visual, images)
        del state
        baseline = "xiaozhen228/VCP-CLIP" if args.ref_root else "plain vision forward only"
        compare_rates("VCP-CLIP", args, runners, baseline)

if __name__ == "__main__":
    main()
