"""MuSc mutual scoring (MSM): the blocked kernel against a straightforward per-image ``cdist`` version, same run.

Default = the issue's full size: one category of 40 images, 37 x 37 patches, 1024 channels, 4 layers x 3 degrees =
12 MSM calls, random unit-norm features (the cost does not depend on the data). Each call times both versions on
the same features, interleaved so that load from other processes hits both alike; the script prints per-call
medians of wall and process CPU time, their ratios (target >= 3x) and the largest score difference (target <= 1e-5).
On a shared machine the CPU-time ratio is the steadier one. ``--bf16`` also times the
optional bfloat16 mode and reports how far its scores move. ``--e2e-images N`` (default 10, 0 skips it) adds an
end-to-end run of the MuSc detector on N random images (random ViT-L-14-336 weights at 518 px, CPU) and reports
images/s; the ViT forward dominates it on a CPU.

Quick run:  python benchmarks/bench_musc.py --images 12 --calls 2 --e2e-images 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from zsadbench.mutual_scoring import interval_bounds, mutual_scoring


def msm_per_image_cdist(features: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Returns (N, P) float64 MSM scores the straightforward way: one cdist per image against all others."""
    n, patches, dim = features.shape
    scores = torch.empty(n, patches, dtype=torch.float64)
    for i in range(n):
        others = torch.cat([features[:i], features[i + 1:]]).reshape(-1, dim)
        nearest = torch.cdist(features[i], others).view(patches, n - 1, patches).amin(dim=2)
        scores[i] = nearest.topk(hi, dim=1, largest=False).values[:, lo:].mean(dim=1).double()
    return scores


def timed(fn, *args, **kwargs):
    """Returns (result, wall seconds, process CPU seconds of all threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start, time.process_time() - cpu


def bench_msm(args: argparse.Namespace) -> dict:
    """Returns per-call timings and score differences of the straightforward, fast and (optional) bf16 MSM."""
    patches = args.side * args.side
    lo, hi = interval_bounds(args.images - 1)
    generator = torch.Generator().manual_seed(args.seed)
    rows: list[dict] = []
    for call in range(args.calls * args.repeats):
        z = torch.rand(args.images, patches, args.dim, generator=generator)
        z = z / z.norm(dim=-1, keepdim=True)
        load = os.getloadavg()[0]
        order = ("fast", "straight") if call % 2 else ("straight", "fast")
        out = {}
        for name in order:
            if name == "straight":
                out[name] = timed(msm_per_image_cdist, z, lo, hi)
            else:
                out[name] = timed(mutual_scoring, z, memory_mb=args.memory_mb)
        row = {"call": call, "load_1min": load, "straight_s": out["straight"][1], "fast_s": out["fast"][1],
               "straight_cpu": out["straight"][2], "fast_cpu": out["fast"][2],
               "max_abs_diff": float((out["straight"][0] - out["fast"][0]).abs().max())}
        if args.bf16:
            scores16, row["bf16_s"], row["bf16_cpu"] = timed(mutual_scoring, z, memory_mb=args.memory_mb,
                                                             precision="bf16")
            row["bf16_max_abs_diff"] = float((out["straight"][0] - scores16).abs().max())
            row["bf16_mean_abs_diff"] = float((out["straight"][0] - scores16).abs().mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith(("_s", "_cpu"))}
    summary = {
        "images": args.images, "patches": patches, "dim": args.dim, "calls": len(rows),
        "threads": torch.get_num_threads(),
        "median_straight_s": med["straight_s"], "median_fast_s": med["fast_s"],
        "speedup_median": med["straight_s"] / med["fast_s"],
        "median_straight_cpu_s": med["straight_cpu"], "median_fast_cpu_s": med["fast_cpu"],
        "speedup_cpu_time_median": med["straight_cpu"] / med["fast_cpu"],
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "category_straight_s_x12": 12 * med["straight_s"], "category_fast_s_x12": 12 * med["fast_s"],
        "load_1min": [min(r["load_1min"] for r in rows), max(r["load_1min"] for r in rows)],
    }
    if args.bf16:
        summary.update({"median_bf16_s": med["bf16_s"], "speedup_bf16_median": med["straight_s"] / med["bf16_s"],
                        "speedup_bf16_cpu_time_median": med["straight_cpu"] / med["bf16_cpu"],
                        "bf16_max_abs_diff": max(r["bf16_max_abs_diff"] for r in rows),
                        "bf16_mean_abs_diff": statistics.mean(r["bf16_mean_abs_diff"] for r in rows)})
    return summary


def bench_end_to_end(args: argparse.Namespace) -> dict:
    """Returns images/s of the MuSc detector on random 518-px inputs with random ViT-L-14-336 weights (CPU)."""
    import zsadbench

    detector = zsadbench.load_method("musc", pretrained="random", seed=args.seed)
    size = detector.input_size
    images = torch.randn(args.e2e_images, 3, *size, generator=torch.Generator().manual_seed(args.seed))
    _, seconds, _ = timed(detector.predict, images, "bench")
    return {"e2e_images": args.e2e_images, "e2e_seconds": seconds, "e2e_images_per_s": args.e2e_images / seconds,
            "model": detector.config.model, "image_size": list(size)}


def main() -> None:
    """Parses the command line, runs the benchmark and prints a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40, help="images in the category (default 40)")
    parser.add_argument("--side", type=int, default=37, help="patch grid side (default 37 = 518 px / 14)")
    parser.add_argument("--dim", type=int, default=1024, help="feature channels (default 1024)")
    parser.add_argument("--calls", type=int, default=12,
                        help="MSM calls per repeat (default 12: 4 layers x 3 degrees)")
    parser.add_argument("--repeats", type=int, default=1, help="repeat the set of calls (default 1)")
    parser.add_argument("--memory-mb", type=float, default=1024.0, help="MSM memory budget of the fast kernel")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the optional bfloat16 mode (default on)")
    parser.add_argument("--e2e-images", type=int, default=10,
                        help="end-to-end detector run (ViT-L-14-336 random weights, 518 px) on N images (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary = bench_msm(args)
    if args.e2e_images:
        summary.update(bench_end_to_end(args))
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
