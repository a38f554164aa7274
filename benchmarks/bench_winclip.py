"""Throughput of zsadbench's WinCLIP against anomalib's WinCLIP torch model (same process, weights, inputs; CPU).

    python benchmarks/bench_winclip.py [--repeats 5] [--batch 2] [--threads 2]

Both models get the same full-size ViT-B-16-plus-240 random weights (240 px) and the same preprocessed batch; text
embeddings are computed before timing (both cache them per class). anomalib is built by the project's parity driver
(tests/parity/ref_winclip.py), with its batch-first window fix (without it the windows are wrong, and slower). Timed
forwards alternate between the two models so that load from other processes hits both alike; medians are reported,
with the load average. Target: ratio >= 1.
Without anomalib installed only zsadbench's throughput is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    """Returns the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2, help="images per forward")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--model", default="ViT-B-16-plus-240", help="architecture (default: the full-size one)")
    parser.add_argument("--image-size", type=int, default=240)
    return parser.parse_args()


def anomalib_model(arch: str, state: dict, class_name: str):  # noqa: ANN201 - anomalib's WinClipModel
    """Returns anomalib's WinClipModel with ``state`` and the batch-first window fix (tests/parity/ref_winclip.py)."""
    try:
        import anomalib  # noqa: F401
    except ImportError:
        return None
    drivers = str(Path(__file__).resolve().parent.parent / "tests" / "parity")
    if drivers not in sys.path:
        sys.path.insert(0, drivers)
    from ref_winclip import anomalib_winclip

    return anomalib_winclip(arch, state, class_name)


def main() -> None:
    """Runs the benchmark and prints medians and the throughput ratio."""
    args = parse_args()
    import torch
    from zsadbench.methods.winclip import WinClip

    from zsadbench.clip.testing import synthetic_images

    torch.set_num_threads(args.threads)
    class_name = "metal_nut"
    ours = WinClip(model=args.model, pretrained="random", image_size=args.image_size, seed=0)
    theirs = anomalib_model(args.model, ours.clip.state_dict(), class_name)
    images = torch.stack([ours.transform(im) for im in synthetic_images(args.batch, seed=0, anomalous=(1,))])

    def run_ours() -> torch.Tensor:
        return ours.predict(images, class_name).anomaly_maps

    def run_theirs() -> torch.Tensor:
        with torch.no_grad():
            return theirs(images).anomaly_map

    runners = {"zsadbench": run_ours} | ({"anomalib": run_theirs} if theirs is not None else {})
    outputs = {name: run() for name, run in runners.items()}  # warm-up (and text embeddings for zsadbench)
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu_times: dict[str, list[float]] = {name: [] for name in runners}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, run in runners.items():
            cpu, start = time.process_time(), time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu)
    load_after = os.getloadavg()[0]

    print(f"WinCLIP zero-shot forward, {args.model} @ {args.image_size}px, batch {args.batch}, "
          f"{args.threads} threads, {args.repeats} timed forwards each "
          f"(1-min load average {load_before:.2f} -> {load_after:.2f})")
    rates, cpu_rates = {}, {}
    for name, values in times.items():
        median = statistics.median(values)
        rates[name] = args.batch / median
        cpu_rates[name] = args.batch / statistics.median(cpu_times[name])
        print(f"  {name:10s} median {median:7.3f} s/forward  {rates[name]:6.3f} images/s  "
              f"(all: {', '.join(f'{v:.2f}' for v in values)}; CPU time {statistics.median(cpu_times[name]):.2f} s)")
    if theirs is None:
        print("  anomalib is not installed: no reference throughput (pip install anomalib in this environment)")
        return
    diff = (outputs["zsadbench"] - outputs["anomalib"]).abs().max().item()
    print(f"  max |map difference| = {diff:.2e}")
    print(f"  ratio zsadbench / anomalib images/s = {rates['zsadbench'] / rates['anomalib']:.2f} (target >= 1.0); "
          f"by process CPU time: {cpu_rates['zsadbench'] / cpu_rates['anomalib']:.2f} (less sensitive to other load)")


if __name__ == "__main__":
    main()
