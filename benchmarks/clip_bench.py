"""Shared scaffolding of the CLIP-method benchmarks (AnomalyCLIP, HeadCLIP, AdaptCLIP); not a benchmark itself.

Options every one of them takes, a seeded random full-size weights file that zsadbench and a reference load alike,
alternating timed runs, and stand-ins for the modules the reference implementations import but never use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def clip_arguments(description: str) -> argparse.ArgumentParser:
    """Returns a parser with the common options: --images, --repeats, --threads, --model, --image-size."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--images", type=int, default=2, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--model", default="ViT-L-14-336-quickgelu", help="architecture (default: the full-size one)")
    parser.add_argument("--image-size", type=int, default=518)
    return parser


@contextlib.contextmanager
def random_weights(model: str, fp16_grid: bool = False) -> Iterator[tuple[dict, Path]]:
    """Yields (state dict, file holding it) of seeded random ``model`` weights; the file lives inside the block.

    ``fp16_grid`` rounds them to float16 values: the references whose loaders round the weights to float16
    (xiaozhen228's Bayes-PFL and VCP-CLIP) then compute with the same weights as zsadbench.
    """
    import torch

    from zsadbench.clip.backbone import load_clip

    state = {k: v.detach().clone() for k, v in load_clip(model, "random", seed=0).model.state_dict().items()}
    if fp16_grid:
        state = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.pt"
        torch.save(state, path)
        yield state, path


def timed(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Returns wall times of ``repeats`` alternating runs of each runner (after one warm-up run each)."""
    for run in runners.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def print_rates(kind: str, times: dict[str, list[float]], images: int) -> dict[str, float]:
    """Prints each runner's median time and images/s; returns images/s by runner."""
    rates = {}
    width = max(map(len, times))
    for name, values in times.items():
        median = statistics.median(values)
        rates[name] = images / median
        print(f"  {kind} {name:{width}s} median {median:7.2f} s/batch  {rates[name]:6.3f} images/s"
              f"  (all: {', '.join(f'{v:.1f}' for v in values)})")
    return rates


def compare_rates(method: str, args: argparse.Namespace, runners: dict[str, Callable[[], object]],
                  baseline: str) -> None:
    """Times the runners alternately, prints their rates and the ratio of ``runners["zsadbench"]`` to ``baseline``."""
    load_before = os.getloadavg()[0]
    times = timed(runners, args.repeats)
    load_after = os.getloadavg()[0]
    print(f"{method}, {args.model} @ {args.image_size}px, random weights, batch {args.images}, {args.threads} "
          f"threads, {args.repeats} timed runs each (1-min load average {load_before:.2f} -> {load_after:.2f})")
    rates = print_rates("inference", times, args.images)
    target = " (target >= 1.0)" if args.ref_root else ""
    print(f"  ratio zsadbench / {baseline} images/s = {rates['zsadbench'] / rates[baseline]:.2f}{target}")


PARITY_DRIVERS = Path(__file__).resolve().parent.parent / "tests" / "parity"  # the project's reference-side code


def print_agreement(ours: Any, theirs: tuple[Any, Any]) -> None:
    """Prints the max abs differences of a zsadbench ``Prediction`` and the reference's (scores, maps)."""
    print(f"  (outputs agree: scores {(ours.image_scores - theirs[0]).abs().max():.1e}, maps "
          f"{(ours.anomaly_maps - theirs[1]).abs().max():.1e} max abs)")


def vision_forward(visual: object, images: object, taps: tuple[int, ...] = (6, 12, 18, 24)) -> Callable[[], object]:
    """Returns the baseline runner without a reference: the plain vision forward with the method's taps."""
    import torch

    from zsadbench.clip.vision import forward_vision

    def run() -> object:
        with torch.no_grad():
            return forward_vision(visual, images, taps)

    return run


def install_reference_shims() -> None:
    """Stands in for modules the references import at module level but never use (tests/parity/common.py's)."""
    if str(PARITY_DRIVERS) not in sys.path:
        sys.path.insert(0, str(PARITY_DRIVERS))
    import common  # tests/parity/common.py

    common.install_import_shims()
