"""Benchmark: zsadbench's pixel-metric engine against the usual stack, on one synthetic category.

Contenders, each timed in its own fresh process on the same seeded category (default: 117 images of 1024x1024,
about 1 % anomalous pixels in about 150 regions, float32 maps and bool masks held in memory):

- ``engine``: :class:`zsadbench.metrics.CategoryMetrics` fed in batches (``update``) then ``compute``: pixel AUROC,
  AP, F1-max and AUPRO@0.3 (plus the image metrics) from the maps and masks.
- ``sklearn``: ``roc_auc_score`` + ``average_precision_score`` + ``precision_recall_curve`` (F1-max) on the
  concatenated pixels.
- ``official_aupro``: a straightforward argsort implementation of the official MVTec AD AU-PRO algorithm (per-pixel
  FP / PRO increments, argsort, cumulative sums, tie merge, trapezoid to 0.3), with float64 FPRs (the official
  script stores them in float32, which is a different number at this size).
- ``sort_floor``: one values-only ``ndarray.sort`` of the category's float32 scores: a floor for any exact
  sort-based method.

Peak memory is each process's VmHWM (/proc/self/status), not ``ru_maxrss``: on Linux that survives fork + exec and
would include the parent. The engine's process loads ``zsadbench/metrics.py`` on its own (numpy + scipy only),
because importing the ``zsadbench`` package pulls in torch, which the metric computation does not use.

Targets (issue 3): the four pixel metrics together >= 20x faster than sklearn + official AUPRO and within 5x of the
sort floor; engine peak RSS <= 3x the input bytes; values equal within 1e-9 (AUPRO) and 1e-12 (AUROC, AP, F1-max).

Usage: ``python benchmarks/bench_metrics.py [--images 117 --height 1024 --width 1024 --repeats 3]`` (also
``nox -s bench -- metrics``). Machines are noisy: every contender is run ``--repeats`` times, interleaved, and the
table shows medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from bisect import bisect_right
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("sort_floor", "engine", "official_aupro", "sklearn")
PIXEL = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


# --------------------------------------------------------------------------------------------------------------------
# The synthetic category
# --------------------------------------------------------------------------------------------------------------------

def make_category(images: int, height: int, width: int, anomalous: float, regions: int, seed: int,
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Returns float32 maps and bool masks: noise everywhere, elliptic defects scored higher by a random margin."""
    rng = np.random.default_rng(seed)
    n_defective = max(1, round(0.65 * images))  # MVTec-like: most test images are defective
    defective = set(rng.choice(images, n_defective, replace=False).tolist())
    extra = rng.multinomial(max(regions - n_defective, 0), [1 / n_defective] * n_defective)
    per_image = 1 + extra
    mean_area = anomalous * images * height * width / max(regions, 1)
    maps, masks, k = [], [], 0
    for i in range(images):
        amap = rng.standard_normal((height, width), dtype=np.float32)
        mask = np.zeros((height, width), bool)
        if i in defective:
            for _ in range(per_image[k]):
                area = mean_area * rng.lognormal(0.0, 0.5) / np.exp(0.125)
                stretch = rng.uniform(0.6, 1.6)
                a, b = np.sqrt(area / np.pi) * stretch, np.sqrt(area / np.pi) / stretch
                cy, cx = rng.uniform(0, height), rng.uniform(0, width)
                y0, y1 = int(max(cy - b, 0)), int(min(cy + b + 1, height))
                x0, x1 = int(max(cx - a, 0)), int(min(cx + a + 1, width))
                yy, xx = np.ogrid[y0:y1, x0:x1]
                inside = ((yy - cy) / b) ** 2 + ((xx - cx) / a) ** 2 <= 1
                mask[y0:y1, x0:x1] |= inside
                amap[y0:y1, x0:x1][inside] += np.float32(rng.uniform(0.0, 3.0))
            k += 1
        maps.append(amap)
        masks.append(mask)
    return maps, masks


# --------------------------------------------------------------------------------------------------------------------
# Contenders (each runs in its own process)
# --------------------------------------------------------------------------------------------------------------------

def load_engine():
    """Returns the zsadbench.metrics module loaded on its own (the package would import torch)."""
    spec = importlib.util.spec_from_file_location("zsadbench_metrics", ROOT / "zsadbench" / "metrics.py")
    engine = sys.modules["zsadbench_metrics"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine)
    return engine


def run_engine(engine, maps: list[np.ndarray], masks: list[np.ndarray], batch_size: int) -> dict[str, float]:
    """Returns the engine's metrics, fed batch by batch as the evaluator does."""
    metrics = engine.CategoryMetrics()
    for begin in range(0, len(maps), batch_size):
        batch_maps, batch_masks = maps[begin:begin + batch_size], masks[begin:begin + batch_size]
        metrics.update(np.array([m.max() for m in batch_maps], np.float64), np.array([m.any() for m in batch_masks]),
                       batch_maps, batch_masks)
    out = metrics.compute()
    return {name: out[name] for name in PIXEL}


def run_sklearn(maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """Returns pixel AUROC, AP and F1-max from sklearn on the concatenated pixels."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score  # noqa: I001

    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([m.ravel() for m in masks])
    out = {"pixel_auroc": float(roc_auc_score(labels, scores)),
           "pixel_ap": float(average_precision_score(labels, scores))}
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    out["pixel_f1max"] = float(f1.max())
    return out


def run_official_aupro(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3) -> dict[str, float]:
    """Returns AUPRO by the official algorithm: per-pixel increments sorted by one argsort of all scores."""
    from scipy.ndimage import label

    shape = (len(maps), *maps[0].shape)
    fp_changes = np.zeros(shape, np.uint32)
    pro_changes = np.zeros(shape, np.float64)
    n_ok, n_regions = 0, 0
    for i, mask in enumerate(masks):
        labeled, count = label(mask, np.ones((3, 3), int))
        n_regions += count
        ok = labeled == 0
        n_ok += int(ok.sum())
        fp_changes[i, ok] = 1
        areas = np.bincount(labeled.ravel())
        inside = labeled > 0
        pro_changes[i, inside] = 1.0 / areas[labeled[inside]]
    scores = np.array(maps).ravel()
    fp, pro = fp_changes.ravel(), pro_changes.ravel()
    order = np.argsort(scores).astype(np.uint32)[::-1]
    np.take(scores, order, out=scores)
    np.take(fp, order, out=fp)
    np.take(pro, order, out=pro)
    del order
    np.cumsum(fp, out=fp)
    fprs = fp / n_ok  # float64 (the official script divides in float32)
    del fp, fp_changes
    np.cumsum(pro, out=pro)
    pros = pro / n_regions
    del pro, pro_changes
    keep = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate(([0.0], np.clip(fprs[keep], None, 1.0), [1.0]))
    pros = np.concatenate(([0.0], np.clip(pros[keep], None, 1.0), [1.0]))
    correction = 0.0
    if fpr_limit not in fprs:
        i = bisect_right(fprs, fpr_limit)
        at_limit = pros[i - 1] + (pros[i] - pros[i - 1]) * (fpr_limit - fprs[i - 1]) / (fprs[i] - fprs[i - 1])
        correction = 0.5 * (at_limit + pros[i - 1]) * (fpr_limit - fprs[i - 1])
    inside = fprs <= fpr_limit
    x, y = fprs[inside], pros[inside]
    return {"pixel_aupro": float((np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / fpr_limit)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def child(args: argparse.Namespace) -> None:
    """Generates the category, runs one contender and prints a JSON line with its time, values and memory."""
    # Imports happen before timing: they are not part of the computation.
    engine = load_engine() if args.child == "engine" else None
    if args.child == "sklearn":
        import sklearn.metrics  # noqa: F401
    import scipy.ndimage  # noqa: F401
    rss_start = _status_kib("VmRSS") * 1024
    maps, masks = make_category(args.images, args.height, args.width, args.anomalous, args.regions, args.seed)
    input_bytes = sum(m.nbytes for m in maps) + sum(m.nbytes for m in masks)
    flat = np.concatenate([m.ravel() for m in maps]) if args.child == "sort_floor" else None
    rss_input = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if args.child == "sort_floor":
        flat.sort()
        values: dict[str, float] = {}
    elif args.child == "engine":
        values = run_engine(engine, maps, masks, args.batch_size)
    elif args.child == "sklearn":
        values = run_sklearn(maps, masks)
    else:
        values = run_official_aupro(maps, masks)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "values": values, "peak_rss": _status_kib("VmHWM") * 1024,
                      "rss_start": rss_start, "rss_input": rss_input, "input_bytes": input_bytes,
                      "pixels": sum(m.size for m in maps), "positives": int(sum(m.sum() for m in masks)),
                      "regions": _count_regions(masks)}))


def _count_regions(masks: list[np.ndarray]) -> int:
    from scipy.ndimage import label

    return sum(label(m, np.ones((3, 3), int))[1] for m in masks)


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------

def _spawn(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", name, "--images", str(args.images), "--height", str(args.height),
               "--width", str(args.width), "--anomalous", str(args.anomalous), "--regions", str(args.regions),
               "--seed", str(args.seed), "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prefault(nbytes: int) -> None:
    """Touches ``nbytes`` once in a throw-away process, so no contender pays a VM's first-touch cost of fresh pages."""
    code = f"import numpy as np; a = np.ones({nbytes}, np.uint8); print(int(a[::4096].sum()))"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints its table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=117, help="images in the category")
    parser.add_argument("--height", type=int, default=1024, help="map height")
    parser.add_argument("--width", type=int, default=1024, help="map width")
    parser.add_argument("--anomalous", type=float, default=0.01, help="target fraction of anomalous pixels")
    parser.add_argument("--regions", type=int, default=150, help="target number of defect regions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic category")
    parser.add_argument("--batch-size", type=int, default=8, help="images per engine update (the evaluator's batch)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender (medians are reported)")
    parser.add_argument("--reference-repeats", type=int, help="runs of sklearn / official_aupro (default: --repeats)")
    parser.add_argument("--skip-references", action="store_true", help="time only the engine and the sort floor")
    parser.add_argument("--no-prefault", action="store_true", help="skip touching memory once before timing")
    parser.add_argument("--json", dest="json_path", help="also write every measurement to this JSON file")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    reference_repeats = args.reference_repeats or args.repeats
    wanted = ["sort_floor", "engine"] + ([] if args.skip_references else ["official_aupro", "sklearn"])
    pixels = args.images * args.height * args.width
    print(f"bench_metrics: {args.images} images of {args.height}x{args.width} = {pixels / 1e6:.1f} Mpx, "
          f"~{args.anomalous:.1%} anomalous in ~{args.regions} regions, seed {args.seed}")
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1/5/15 min), {os.cpu_count()} CPUs")
    if not args.no_prefault:
        _prefault(min(12 * pixels, 8 * 2 ** 30))
    runs: dict[str, list[dict]] = {name: [] for name in wanted}
    for repeat in range(max(args.repeats, reference_repeats)):
        for name in wanted:
            limit = args.repeats if name in ("sort_floor", "engine") else reference_repeats
            if repeat < limit:
                runs[name].append(_spawn(name, args))
                print(f"  run {repeat + 1}: {name:15s} {runs[name][-1]['seconds']:8.2f} s", flush=True)

    first = runs["engine"][0]
    print(f"\ncategory: {first['pixels'] / 1e6:.1f} Mpx, {first['positives'] / first['pixels']:.2%} anomalous, "
          f"{first['regions']} regions; input {_mib(first['input_bytes'])} (float32 maps + bool masks)")
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    peak = {name: max(r["peak_rss"] for r in rs) for name, rs in runs.items()}
    own = {name: max(r["peak_rss"] - r["rss_input"] for r in rs) for name, rs in runs.items()}
    print(f"\n{'contender':15s} {'median s':>9s} {'runs':>4s} {'peak RSS':>10s} {'peak/input':>10s} "
          f"{'above input':>11s}  values")
    for name, rs in runs.items():
        values = ", ".join(f"{k.removeprefix('pixel_')}={v:.12f}" for k, v in rs[0]["values"].items())
        print(f"{name:15s} {median[name]:9.2f} {len(rs):4d} {_mib(peak[name]):>10s} "
              f"{peak[name] / first['input_bytes']:10.2f} {_mib(own[name]):>11s}  {values}")
    print("(peak RSS: the process's VmHWM, input included; above input: peak minus the RSS once the input was built)")

    engine_values = first["values"]
    print(f"\nengine / sort_floor: {median['engine'] / median['sort_floor']:.2f}x (target <= 5x)")
    print(f"engine peak RSS / input bytes: {peak['engine'] / first['input_bytes']:.2f} (target <= 3)")
    if not args.skip_references:
        reference = median["sklearn"] + median["official_aupro"]
        print(f"(sklearn + official_aupro) / engine: {reference / median['engine']:.1f}x faster (target >= 20x)")
        diffs = {name: abs(engine_values[name] - runs["sklearn"][0]["values"][name])
                 for name in ("pixel_auroc", "pixel_ap", "pixel_f1max")}
        diffs["pixel_aupro"] = abs(engine_values["pixel_aupro"] - runs["official_aupro"][0]["values"]["pixel_aupro"])
        print("|engine - reference|: " + ", ".join(f"{k}={v:.1e}" for k, v in diffs.items())
              + " (targets: 1e-12, AUPRO 1e-9)")
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
