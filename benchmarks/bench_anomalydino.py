"""AnomalyDINO nearest neighbours: the blocked kernel against the reference's own search, same run, same features.

Two cost centres, random unit-norm DINOv2-S-sized features (the cost does not depend on the data):

- few-shot: each test image's P patches against a memory bank of K shots x 8 rotations x P patches. Reference:
  faiss ``IndexFlatL2`` on L2-normalised features, searched one image at a time (``src/detection.py`` with
  ``--faiss_on_cpu``; needs ``faiss-cpu``). Ours: :func:`zsadbench.patch_knn.largest_products`, one call per batch.
- batched zero-shot: every image of a set against all patches of the others. Reference:
  ``run_anomalydino_batched.calculate_cosine_distances`` per image (the full P x (N - 1) P distance matrix, then
  ``kthvalue``). Ours: :func:`zsadbench.methods.anomalydino.batched_distances` (blocked top-k within a budget).

The reference is imported from ``--ref-root`` (a work tree of dammsi/AnomalyDINO; its modules import faiss, OpenCV,
matplotlib, tifffile and scikit-learn). Each repeat times both sides on the same features, alternating which goes
first; the script prints medians of wall and process CPU time, their ratios (target >= 1.0) and the largest
differences of the distances (target <= 1e-5).

    python benchmarks/bench_anomalydino.py --ref-root /refs/AnomalyDINO [--shots 4] [--images 8] [--set-images 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from zsadbench.methods.anomalydino import batched_distances

from zsadbench.patch_knn import largest_products


def timed(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    """Returns (result, wall seconds, process CPU seconds of all threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start, time.process_time() - cpu


def unit(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Returns random float32 vectors of unit norm along the last axis."""
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def ours_fewshot(bank: torch.Tensor, tests: torch.Tensor, memory_mb: float) -> torch.Tensor:
    """Returns (B, P) cosine distances to the nearest bank patch, all test images in one blocked call."""
    best = largest_products(tests.reshape(-1, tests.shape[-1]), bank, 1, memory_mb=memory_mb)
    return (1 - best[:, 0]).clamp(min=0).view(tests.shape[:2])


def reference_fewshot(bank: torch.Tensor, tests: torch.Tensor) -> torch.Tensor:
    """Returns (B, P) distances as src/detection.py computes them with faiss on the CPU, one image at a time."""
    import faiss

    features = bank.numpy().astype("float32")  # a copy: normalize_L2 works in place
    index = faiss.IndexFlatL2(features.shape[1])
    faiss.normalize_L2(features)
    index.add(features)
    out = []
    for image in tests:
        queries = np.array(image.numpy(), dtype="float32")
        faiss.normalize_L2(queries)
        distances, _ = index.search(queries, k=1)
        out.append(torch.from_numpy(distances[:, 0] / 2))
    return torch.stack(out)


def reference_batched(features: list[np.ndarray]) -> torch.Tensor:
    """Returns (N, P) distances: run_anomalydino_batched.calculate_cosine_distances for every image of the set."""
    from run_anomalydino_batched import calculate_cosine_distances

    return torch.stack([torch.from_numpy(calculate_cosine_distances(features, i, device="cpu"))
                        for i in range(len(features))])


def summarise(rows: list[dict], name: str) -> dict:
    """Returns the medians and ratios of one benchmark's rows."""
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith(("_s", "_cpu"))}
    out = {f"{name}_median_ours_s": med["ours_s"], f"{name}_median_ours_cpu_s": med["ours_cpu"]}
    if "ref_s" in med:
        out |= {f"{name}_median_reference_s": med["ref_s"], f"{name}_median_reference_cpu_s": med["ref_cpu"],
                f"{name}_speedup_median": med["ref_s"] / med["ours_s"],
                f"{name}_speedup_cpu_time_median": med["ref_cpu"] / med["ours_cpu"],
                f"{name}_max_abs_diff": max(r["max_abs_diff"] for r in rows)}
    return out


def main() -> None:
    """Parses the command line, runs both benchmarks and prints a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-root", help="a work tree of dammsi/AnomalyDINO to time the reference against")
    parser.add_argument("--side", type=int, default=32, help="patch grid side (default 32 = 448 px / 14)")
    parser.add_argument("--dim", type=int, default=384, help="feature channels (default 384, ViT-S/14)")
    parser.add_argument("--shots", type=int, default=4, help="few-shot: K (bank = K x 8 rotations x P patches)")
    parser.add_argument("--images", type=int, default=8, help="few-shot: test images per repeat")
    parser.add_argument("--set-images", type=int, default=16, help="batched: images in the set")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-mb", type=float, default=1024.0, help="budget of the blocked kernel")
    parser.add_argument("--threads", type=int, default=2, help="torch / faiss threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.ref_root:
        sys.path.insert(0, str(Path(args.ref_root).resolve()))
    patches = args.side * args.side
    generator = torch.Generator().manual_seed(args.seed)
    summary: dict = {"patches": patches, "dim": args.dim, "threads": torch.get_num_threads(),
                     "bank_rows": args.shots * 8 * patches, "set_images": args.set_images}

    rows = []
    for repeat in range(args.repeats):
        bank, tests = unit(generator, args.shots * 8 * patches, args.dim), unit(generator, args.images, patches,
                                                                                 args.dim)
        row: dict = {"load_1min": os.getloadavg()[0]}
        for side in (("ours", "ref") if repeat % 2 == 0 else ("ref", "ours")):
            if side == "ours":
                mine, row["ours_s"], row["ours_cpu"] = timed(ours_fewshot, bank, tests, args.memory_mb)
            elif args.ref_root:
                theirs, row["ref_s"], row["ref_cpu"] = timed(reference_fewshot, bank, tests)
        if args.ref_root:
            row["max_abs_diff"] = float((mine - theirs).abs().max())
        rows.append(row)
        print(json.dumps({"fewshot": row}), flush=True)
    summary |= summarise(rows, "fewshot")

    rows = []
    for repeat in range(args.repeats):
        features = unit(generator, args.set_images, patches, args.dim)
        row = {"load_1min": os.getloadavg()[0]}
        for side in (("ours", "ref") if repeat % 2 == 0 else ("ref", "ours")):
            if side == "ours":
                mine, row["ours_s"], row["ours_cpu"] = timed(batched_distances, features, 0.001, args.memory_mb)
            elif args.ref_root:
                theirs, row["ref_s"], row["ref_cpu"] = timed(reference_batched, list(features.numpy()))
        if args.ref_root:
            row["max_abs_diff"] = float((mine - theirs).abs().max())
        rows.append(row)
        print(json.dumps({"batched": row}), flush=True)
    summary |= summarise(rows, "batched")
    summary["batched_reference_matrix_mb"] = patches * (args.set_images - 1) * patches * 4 / 2**20
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
