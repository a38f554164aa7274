"""The feature cache (zsadbench.feature_cache): AnomalyCLIP training and a second evaluation against the reference.

    python benchmarks/bench_feature_cache.py [--images 16] [--epochs 3] [--image-size 224] [--repeats 3]
                                             [--ref-root PATH] [--only train|eval]

Full-size architecture (ViT-L-14-336-quickgelu, DPAM from layer 6, 12 + 8x4 learnable prompt tokens) on seeded random
weights saved once to a file that both sides load; a synthetic benchmark of ``--images`` test images (half of them
anomalous, with masks) written to a temporary folder.

- training: ``zsadbench.training.fit`` (``--epochs`` epochs, batch 8, images decoded from disk every epoch) with the
  feature cache, cold (an empty cache: the frozen tower runs in the first epoch, later epochs read its features) and
  warm (a second training over the same images, e.g. another learning rate in a sweep), against the reference
  training loop on the same preprocessed tensors (zqhang/AnomalyCLIP's ``encode_image`` under ``no_grad``, prompt
  learner, ``compute_similarity``, focal + Dice + CE, Adam; layer 24 only, i.e. cheaper than its train.sh's four
  copies of layer 24), or without ``--ref-root`` against zsadbench without the cache. Target >= 3x.
- evaluation: a second evaluation of a new checkpoint (other prompts) on the same images: ``predict`` over batches
  of 8 reading the features cached by the first evaluation, against the reference's inference (``encode_image`` +
  ``compute_similarity`` + scipy Gaussian) and against zsadbench without the cache. Target >= 5x. The reference's
  text features are computed before timing; zsadbench's first cached run encodes the new checkpoint's prompts, the
  later runs reuse them.

Without ``--ref-root`` only zsadbench with and without the cache is timed. Runs alternate; medians are printed with
the load average. What bounds each figure: a cold training still runs the tower once per image (so at most
``epochs``x over a loop that runs it every epoch); a warm one and a cached evaluation are bounded by the text
encoder, scoring, the Gaussian and (training) image decoding.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from clip_bench import random_weights


def parse_args() -> argparse.Namespace:
    """Returns the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="training / evaluation images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224,
                        help="input size (default 224: the reference's 518 px takes ~10 min per training on 2 cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--train-repeats", type=int, help="timed trainings per variant (default: --repeats)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--model", default="ViT-L-14-336-quickgelu")
    parser.add_argument("--ref-root", help="a checkout of zqhang/AnomalyCLIP to time the reference against")
    parser.add_argument("--only", choices=("train", "eval"), help="run one of the two benchmarks")
    return parser.parse_args()


def median_line(name: str, values: list[float], unit: str = "s") -> str:
    """Returns one printed row: the median and every run."""
    every = ", ".join(f"{v:.2f}" for v in values)
    return f"  {name:38s} median {statistics.median(values):8.2f} {unit}  (all: {every})"


def main() -> None:
    """Runs the benchmarks and prints medians and ratios."""
    args = parse_args()
    import torch
    from zsadbench.datasets.synthetic import load_synthetic
    from zsadbench.methods.anomalyclip import AnomalyCLIP

    from zsadbench.data import SampleLoader
    from zsadbench.feature_cache import FeatureCache, use_feature_cache
    from zsadbench.training import training_samples

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="anomalyclip: no checkpoint")
    work = Path(tempfile.mkdtemp(prefix="bench-feature-cache-"))
    try:
        anomalous = args.images // 2
        dataset = load_synthetic(work / "data", image_size=args.image_size, n_train=0,
                                 n_test_normal=args.images - anomalous, n_test_anomalous=anomalous,
                                 categories=("carpet",))
        with random_weights(args.model) as (state, weights):
            ours = AnomalyCLIP(model=args.model, pretrained=str(weights), image_size=args.image_size)
            samples = training_samples(dataset)
            loader = SampleLoader(samples, ours.transform, ours.input_size, "bilinear", with_masks=True)
            items = [loader[i] for i in range(len(samples))]
            images = torch.stack([item[0] for item in items])
            masks = torch.stack([torch.as_tensor(item[1], dtype=torch.float32) for item in items])
            labels = torch.tensor([s.label for s in samples])
            initial = ours.state_dict()
            reference_fns = None
            if args.ref_root:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from bench_anomalyclip import reference

                reference_fns = reference(args.ref_root, state, ours.prompt_learner.reference_state_dict(),
                                          args.image_size)
            del state
        batches = [slice(b, b + args.batch_size) for b in range(0, len(images), args.batch_size)]
        load_before = os.getloadavg()[0]
        print(f"feature cache, AnomalyCLIP {args.model} @ {args.image_size}px, random weights, {len(images)} images "
              f"({anomalous} anomalous), batch {args.batch_size}, {args.threads} threads", flush=True)

        if args.only in (None, "eval"):
            cache = FeatureCache(work / "eval-cache")
            use_feature_cache(ours, cache)
            ours.load_state_dict(initial)
            with torch.no_grad():
                for part in batches:  # the first evaluation: fills the cache
                    ours.predict(images[part], "carpet")
            generator = torch.Generator().manual_seed(5)
            new_checkpoint = {k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                              for k, v in initial.items()}
            ours.load_state_dict(new_checkpoint)

            def evaluate(with_cache: bool) -> None:
                use_feature_cache(ours, cache if with_cache else None)
                with torch.no_grad():
                    for part in batches:
                        ours.predict(images[part], "carpet")

            eval_runners: dict[str, Callable[[], object]] = {
                "zsadbench, cached features": lambda: evaluate(True),
                "zsadbench, no cache": lambda: evaluate(False)}
            if reference_fns is not None:
                ref_infer = reference_fns[0]
                eval_runners["zqhang/AnomalyCLIP inference"] = lambda: [ref_infer(images[p]) for p in batches]
            hits = cache.stats.hits
            times = timed_once_each(eval_runners, args.repeats)
            assert cache.stats.hits - hits == len(images) * args.repeats, "the cached evaluation missed"
            print(f"second evaluation of a new checkpoint on the same {len(images)} images (s per evaluation):")
            for name, values in times.items():
                print(median_line(name, values) + f"  {len(images) / statistics.median(values):7.2f} images/s")
            for base in ("zqhang/AnomalyCLIP inference", "zsadbench, no cache"):
                if base in times:
                    ratio = statistics.median(times[base]) / statistics.median(times["zsadbench, cached features"])
                    print(f"  evaluation ratio {base} / zsadbench, cached features = {ratio:.2f} (target >= 5)")
        if args.only in (None, "train"):
            caches: list[Path] = []

            def train(cache_dir: Path | None) -> None:
                ours.load_state_dict(initial)
                use_feature_cache(ours, FeatureCache(cache_dir) if cache_dir is not None else None)
                ours.fit(dataset, epochs=args.epochs, batch_size=args.batch_size, progress=False)

            def cold() -> None:
                caches.append(work / f"cache-{len(caches)}")
                train(caches[-1])

            def warm() -> None:
                train(caches[0])  # filled by the first cold training

            runners: dict[str, Callable[[], object]] = {"zsadbench, cold cache": cold, "zsadbench, warm cache": warm}
            if reference_fns is None:  # with a reference, it is the baseline (zsadbench's own loop costs about as much)
                runners["zsadbench, no cache"] = lambda: train(None)
            else:
                ref_train = reference_fns[1]
                generator = torch.Generator().manual_seed(111)

                def reference_training() -> None:
                    for _ in range(args.epochs):
                        order = torch.randperm(len(images), generator=generator)
                        for part in batches:
                            index = order[part]
                            ref_train(images[index], masks[index], labels[index])

                runners["zqhang/AnomalyCLIP training loop"] = reference_training
            times = timed_once_each(runners, args.train_repeats or args.repeats)
            print(f"training, {args.epochs} epochs of {len(images)} images (s per training):")
            for name, values in times.items():
                print(median_line(name, values), flush=True)
            base = "zqhang/AnomalyCLIP training loop" if reference_fns is not None else "zsadbench, no cache"
            for name in ("zsadbench, cold cache", "zsadbench, warm cache"):
                ratio = statistics.median(times[base]) / statistics.median(times[name])
                print(f"  training ratio {base} / {name} = {ratio:.2f}" + (" (target >= 3)" if "cold" in name else ""))

        print(f"  1-min load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}; GPU: not run (CPU only)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timed_once_each(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Returns wall times of ``repeats`` alternating runs of each runner (no warm-up: a cold cache is the point)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            print(f"    ({name}: {times[name][-1]:.2f} s)", flush=True)  # what a run cut short still shows
    return times


if __name__ == "__main__":
    main()
