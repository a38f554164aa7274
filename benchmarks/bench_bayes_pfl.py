"""Inference throughput of zsadbench's Bayes-PFL, full-size architecture, random weights, CPU.

    python benchmarks/bench_bayes_pfl.py [--images 1] [--repeats 2] [--threads 2] [--ref-root PATH] [--weights FILE]

zsadbench's Bayes-PFL (ViT-L-14-336, exact GELU, 518 px, taps 6/12/18/24, R = 10 samples x 3 prompts per state, RCA,
Gaussian σ = 8) runs on seeded random weights and untrained (randomly initialised) learned parts with the classifier
image score (the fusion only adds a min-max over the set). Timed: ``predict`` on a batch; images/s.

Reference in the same run: with ``--ref-root`` (a work tree of xiaozhen228/Bayes-PFL, used in place and never copied;
see tests/parity/ref_bayes_pfl.py for what it needs) test.py's per-image inference (it runs batch 1: the vision pass,
``forward_ensemble`` encoding the 60 sampled prompts one sequence at a time at full length 77, the model forward with
the 60 x 4 maps upsampled, the pairwise softmax averaging) plus scipy's Gaussian, on the same weights, learned parts
and prompt draws; target ratio >= 1. Without it, the plain vision forward alone. ``--weights`` reuses a weights file
(e.g. tests/parity/make_weights.py's) instead of writing a temporary one. Runs alternate so that load from other
processes hits all alike; medians are reported with the load average.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from clip_bench import clip_arguments, compare_rates, print_agreement, random_weights, vision_forward

CLASS_NAME = "bottle"


@contextlib.contextmanager
def weights_file(model: str, given: str | None) -> Iterator[Path]:
    """Yields the weights file to time with: ``given``, or a temporary seeded random one."""
    if given:
        yield Path(given).resolve()
        return
    with random_weights(model, fp16_grid=True) as (state, path):  # the reference's loader rounds them to float16
        del state
        yield path


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    parser = clip_arguments(__doc__.splitlines()[0])
    parser.set_defaults(model="ViT-L-14-336", images=1, repeats=2)
    parser.add_argument("--ref-root", help="a work tree of xiaozhen228/Bayes-PFL to time the reference against")
    parser.add_argument("--weights", help="an existing CLIP weights file (default: a temporary random one)")
    args = parser.parse_args()
    import numpy as np
    import torch
    from scipy.ndimage import gaussian_filter

    import zsadbench
    from zsadbench.clip.testing import synthetic_images

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*no checkpoint")  # untrained parts are fine for timing
    with weights_file(args.model, args.weights) as weights, contextlib.ExitStack() as stack:
        detector = zsadbench.load_method("bayes_pfl", model=args.model, pretrained=str(weights),
                                         image_size=args.image_size, image_score="classifier")
        images = torch.stack([detector.transform(im) for im in synthetic_images(args.images, seed=0,
                                                                                anomalous=(0,))])
        runners: dict[str, Callable[[], object]] = {"zsadbench": lambda: detector.predict(images, CLASS_NAME)}
        if args.ref_root:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "parity"))
            import ref_bayes_pfl as driver  # type: ignore[import-not-found]

            modules = stack.enter_context(driver.reference_session(os.path.abspath(args.ref_root)))
            clip, model, text_encoder, options = driver.build_reference(
                modules, str(weights), args.image_size, detector.config.sample_num,
                list(detector.config.feature_layers), seed=0)
            model.load_state_dict(detector.reference_state_dict()["MyModel"], strict=True)
            model.eval()
            draws = detector.inference_draws(1)
            fixed = [*draws.context.cpu(), *draws.normal.cpu(), *draws.abnormal.cpu()]

            def reference() -> tuple[torch.Tensor, torch.Tensor]:
                results = [driver.infer_one(modules, clip, model, text_encoder, image.unsqueeze(0), fixed, options)
                           for image in images]
                maps = np.stack([gaussian_filter(r["map"].numpy(), sigma=8) for r in results])
                return torch.stack([r["score_stage2"] for r in results]), torch.from_numpy(maps)

            runners["xiaozhen228/Bayes-PFL"] = reference
            ours, theirs = detector.predict(images, CLASS_NAME), reference()
            print_agreement(ours, theirs)
        else:
            runners["plain vision forward only"] = vision_forward(detector.clip.visual, images)
        baseline = "xiaozhen228/Bayes-PFL" if args.ref_root else "plain vision forward only"
        compare_rates("Bayes-PFL", args, runners, baseline)

if __name__ == "__main__":
    main()
