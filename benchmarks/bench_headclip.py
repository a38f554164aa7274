"""Inference throughput and training-step time of HeadCLIP (reconstruction) against AnomalyCLIP, same weights, CPU.

    python benchmarks/bench_headclip.py [--images 2] [--repeats 3] [--threads 2] [--no-train]

Both run zsadbench's code on the same seeded random full-size weights (ViT-L-14-336-quickgelu at 518 px), the same
untrained prompts and the same batch. Timed, alternating so that load from other processes hits all alike:

- inference: ``predict`` (dual-path forward, scoring, Gaussian; HeadCLIP adds its head weights in all 24 layers and
  the joint score): images/s of HeadCLIP static, HeadCLIP conditioned and AnomalyCLIP;
- training step: one optimiser step. AnomalyCLIP learns only prompts, so its backward pass stays in the text tower
  and the scoring; HeadCLIP's head weights put the whole vision tower into the backward pass (from the first weighted
  layer on), which is what learning them costs, not the per-head multiplication.
"""

from __future__ import annotations

import os
import statistics
import warnings

from clip_bench import clip_arguments, print_rates, random_weights, timed


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    parser = clip_arguments(__doc__.splitlines()[0])
    parser.add_argument("--no-train", action="store_true", help="time inference only")
    args = parser.parse_args()
    import torch

    import zsadbench
    from zsadbench.clip.testing import synthetic_images

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*no checkpoint")  # random prompts are fine for timing
    options = {"model": args.model, "image_size": args.image_size}
    with random_weights(args.model) as (_, weights):
        detectors = {
            "HeadCLIP static": zsadbench.load_method("headclip", pretrained=str(weights), **options),
            "HeadCLIP conditioned": zsadbench.load_method("headclip", pretrained=str(weights), **options,
                                                          **{"lhw.mode": "conditioned"}),
            "AnomalyCLIP": zsadbench.load_method("anomalyclip", pretrained=str(weights), **options),
        }
    first = detectors["AnomalyCLIP"]
    images = torch.stack([first.transform(im) for im in synthetic_images(args.images, seed=0, anomalous=(0,))])
    masks = (torch.rand(args.images, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
             > 0.97).float()
    labels = torch.tensor([i % 2 for i in range(args.images)])

    def train_step(detector) -> None:
        optimizer = detector.make_optimizer()
        detector.set_train_mode(True)
        losses = detector.training_step(images, masks, labels)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        detector.set_train_mode(False)

    load_before = os.getloadavg()[0]
    infer = timed({name: (lambda d=d: d.predict(images, "bench")) for name, d in detectors.items()}, args.repeats)
    trained = ("HeadCLIP static", "AnomalyCLIP")
    train = {} if args.no_train else timed({n: (lambda d=detectors[n]: train_step(d)) for n in trained}, args.repeats)
    load_after = os.getloadavg()[0]

    print(f"HeadCLIP vs AnomalyCLIP, {args.model} @ {args.image_size}px, random weights, batch {args.images}, "
          f"{args.threads} threads, {args.repeats} timed runs each (1-min load average {load_before:.2f} -> "
          f"{load_after:.2f})")
    rates = print_rates("inference", infer, args.images)
    for name in ("HeadCLIP static", "HeadCLIP conditioned"):
        print(f"  inference ratio {name} / AnomalyCLIP images/s = {rates[name] / rates['AnomalyCLIP']:.3f} "
              "(the head weights should cost next to nothing: ~1.0)")
    for name, values in train.items():
        print(f"  train step {name:22s} median {statistics.median(values):7.2f} s/step ({args.images} images)"
              f"  (all: {', '.join(f'{v:.1f}' for v in values)})")
    if train:
        ratio = statistics.median(train["HeadCLIP static"]) / statistics.median(train["AnomalyCLIP"])
        print(f"  training step ratio HeadCLIP / AnomalyCLIP s/step = {ratio:.2f} (backward through the vision tower)")


if __name__ == "__main__":
    main()
