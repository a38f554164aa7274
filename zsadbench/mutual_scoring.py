"""Mutual scoring (MSM, from MuSc): each patch's distance to every other image of a set, blocked and memory-bounded.

A patch's distance to another image is its Euclidean distance to that image's nearest patch; its score is the mean
of the smallest fraction of these per-image distances (the "interval average", MuSc's ``topmin``). Computed with
blocked matrix products that use each image pair once for both directions, min reductions over the products, and
cdist's own formula folded into the product, within a configurable memory budget. MuSc (methods/musc.py) is its
first user; any nearest-neighbour patch scoring over a set of images can call :func:`mutual_scoring`.

Reference: X. Li et al., "MuSc", ICLR 2024, https://arxiv.org/abs/2401.16753 (xrli-U/MuSc, models/musc.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# columns of one mutual-scoring product: on a CPU, P x ~3000 products run at the matmul peak and leave the row and
# column maxima in cache (2 x 1369 columns measured 10-15 % faster than 8 x 1369); GPUs want wide products
PRODUCT_COLUMNS_CPU = 3000
PRODUCT_COLUMNS_CUDA = 32768


class SetTooSmallError(ValueError):
    """A scored set has too few images for the interval average (or for mutual scoring at all)."""


def interval_bounds(others: int, topmin_min: float = 0.0, topmin_max: float = 0.3,
                    rounding: Literal["floor", "ceil"] = "floor") -> tuple[int, int]:
    """Returns (lo, hi): the interval average keeps the per-image distances of sorted ranks lo..hi-1 (ascending).

    Bounds below 1 are fractions of ``others`` (the number of other images), bounds >= 1 absolute counts, as in the
    reference; swapped when given in the wrong order. ``floor`` is the reference's ``int(fraction * others)``; ``ceil``
    rounds up instead (keeps at least one image for any set of >= 2). Raises :class:`SetTooSmallError` when the
    interval is empty or reaches past ``others``.
    """
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"topmin_rounding must be 'floor' or 'ceil', got {rounding!r}")
    lo, hi = _interval(others, topmin_min, topmin_max, rounding)
    if hi - lo < 1 or hi > others:
        need = next((n for n in range(2, 100_000) if _fits(n - 1, topmin_min, topmin_max, rounding)), None)
        hint = f"at least {need} images" if need else "a different interval"
        raise SetTooSmallError(
            f"MuSc's interval average over {others} other image(s) with topmin_min={topmin_min}, "
            f"topmin_max={topmin_max} ({rounding}) keeps the sorted ranks [{lo}, {hi}), which is "
            f"{'empty' if hi - lo < 1 else 'beyond the set'}: a scored set needs {hint} "
            "(the reference silently returns NaN here); use fewer divisions (divide_num) or topmin_rounding=ceil")
    return lo, hi


def _interval(others: int, topmin_min: float, topmin_max: float, rounding: str) -> tuple[int, int]:
    """Returns the (lo, hi) ranks before validation."""

    def count(bound: float) -> int:
        if bound >= 1:
            return int(bound)
        value = others * bound
        if abs(value - round(value)) < 1e-9:  # 0.3 * 10 = 3.0000000000000004 must not round up to 4
            value = float(round(value))
        return math.ceil(value) if rounding == "ceil" else int(value)

    lo, hi = count(topmin_min), count(topmin_max)
    return (hi, lo) if hi < lo else (lo, hi)


def _fits(others: int, topmin_min: float, topmin_max: float, rounding: str) -> bool:
    lo, hi = _interval(others, topmin_min, topmin_max, rounding)
    return hi - lo >= 1 and hi <= others


def mutual_scoring(features: Tensor, *, topmin_min: float = 0.0, topmin_max: float = 0.3,
                   rounding: Literal["floor", "ceil"] = "floor", memory_mb: float = 1024.0,
                   precision: Literal["fp32", "bf16"] = "fp32", progress: bool = False) -> Tensor:
    """Returns (N, P) float64 MSM scores of the (N, P, D) patch features of one scored set.

    Score of patch p of image i: with d_j = min_q |f[i, p] - f[j, q]| (Euclidean) for every other image j, the mean
    of the sorted d_j of ranks [lo, hi) (:func:`interval_bounds`; default: the smallest int(0.3 (N - 1))).

    How it is computed: for image i and a chunk of partner images J, ONE product gives the nearest patches in both
    directions: its row maxima per partner give d(i -> j), its column maxima d(j -> i). Each unordered pair is
    multiplied once (half the work of the reference, which runs one ``cdist`` per image against all others) and no
    distance matrix is ever materialised. The product carries cdist's own formula, |a|^2 + |b|^2 - 2 a.b: rows
    [a, -|a|^2/2, 1] times columns [b, 1, -|b|^2/2] give -d^2/2 (exact power-of-two scalings of the same terms), so
    the rounding stays that of the reference's ``cdist`` matmul path. The nearest distances per image pair, (N, N, P)
    float32, are kept so that the interval average can sort them.

    Memory: ``memory_mb`` bounds that store, the product chunk and the augmented column copy of the features (built
    per chunk instead when it does not fit). When the store does not fit, the images are processed in bands of rows:
    pairs inside a band still share their product, pairs across bands are multiplied from both sides (up to the
    reference's cost), so any set size runs; the floor is one (N, P) row plus one P x P product.
    ``precision="bf16"`` multiplies in bfloat16 (much faster on CPUs with AMX and on GPUs; scores move by ~1e-3; never
    the default). Runs on the features' device.
    """
    if features.ndim != 3:
        raise ValueError(f"mutual_scoring expects (N, P, D) features, got shape {tuple(features.shape)}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"MSM precision must be 'fp32' or 'bf16', got {precision!r}")
    n, patches, dim = features.shape
    if n < 2:
        raise SetTooSmallError(f"mutual scoring needs at least 2 images in a scored set, got {n}")
    lo, hi = interval_bounds(n - 1, topmin_min, topmin_max, rounding)
    x = features.float()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    itemsize = 2 if precision == "bf16" else 4

    budget = memory_mb * 2**20
    row_bytes = n * patches * 4  # one image's row of the nearest-distance store
    pair_bytes = patches * patches * itemsize  # one P x P product
    copy_bytes = n * patches * (dim + 2) * itemsize  # augmented columns of all images
    band = n if n * row_bytes + pair_bytes <= budget else max(1, int((budget - pair_bytes) // row_bytes))
    spare = budget - band * row_bytes
    hold_columns = spare - copy_bytes >= pair_bytes
    per_partner = pair_bytes + (0 if hold_columns else patches * (dim + 2) * itemsize)
    target = PRODUCT_COLUMNS_CUDA if x.device.type == "cuda" else PRODUCT_COLUMNS_CPU
    fits = int((spare - (copy_bytes if hold_columns else 0)) // per_partner)
    chunk = max(1, min(n - 1, max(1, target // patches), fits))
    if band * row_bytes + chunk * per_partner > budget:
        log.warning("MSM: %d images x %d patches need at least %.0f MiB; the budget is %.0f MiB (running anyway)",
                    n, patches, (row_bytes + per_partner) / 2**20, memory_mb)
    if band < n:
        log.info("MSM: %d images do not fit %.0f MiB at once; bands of %d rows (cross-band pairs computed twice)",
                 n, memory_mb, band)

    half_norms = x.square().sum(dim=-1).div_(2)  # (N, P): |f|^2 / 2, summed as cdist sums |f|^2
    columns = _augmented_columns(x, half_norms, 0, n, dtype) if hold_columns else None
    scores = torch.empty(n, patches, dtype=torch.float64, device=features.device)
    bar = tqdm(total=n, desc="mutual scoring", unit="img", leave=False, disable=None if progress else True)
    for start in range(0, n, band):
        stop = min(n, start + band)
        best = _band_best_similarity(x, half_norms, columns, start, stop, chunk, dtype)
        distances = best.mul_(-2).clamp_(min=0).sqrt_()  # own image: -inf -> +inf, never among the smallest
        for row in range(stop - start):
            kept = distances[row].topk(hi, dim=0, largest=False, sorted=True).values[lo:]
            scores[start + row] = kept.mean(dim=0).double()
        del best, distances
        bar.update(stop - start)
    bar.close()
    return scores


def _augmented_columns(x: Tensor, half_norms: Tensor, j0: int, j1: int, dtype: torch.dtype) -> Tensor:
    """Returns ((j1 - j0) P, D + 2) rows [f, 1, -|f|^2/2] of images j0..j1-1 (the column side of the product)."""
    rows = x[j0:j1].reshape(-1, x.shape[-1])
    ones = torch.ones(rows.shape[0], 1, device=x.device)
    return torch.cat([rows, ones, -half_norms[j0:j1].reshape(-1, 1)], dim=1).to(dtype)


def _band_best_similarity(x: Tensor, half_norms: Tensor, columns: Tensor | None, start: int, stop: int, chunk: int,
                          dtype: torch.dtype) -> Tensor:
    """Returns (stop - start, N, P) float32: [i, j, p] = -min_q |x[i, p] - x[j, q]|^2 / 2; -inf at j == i."""
    n, patches, _ = x.shape
    best = torch.full((stop - start, n, patches), float("-inf"), dtype=torch.float32, device=x.device)

    def partners(j0: int, j1: int) -> Tensor:
        if columns is not None:
            return columns[j0 * patches:j1 * patches]
        return _augmented_columns(x, half_norms, j0, j1, dtype)

    for i in range(start, stop):
        ones = torch.ones(patches, 1, device=x.device)
        own = torch.cat([x[i], -half_norms[i, :, None], ones], dim=1).to(dtype)  # rows [f, -|f|^2/2, 1]
        for j0, j1 in _spans(i + 1, stop, chunk):  # partners inside the band: both directions from one product
            product = own @ partners(j0, j1).T
            best[i - start, j0:j1] = product.view(patches, j1 - j0, patches).amax(dim=2).T
            best[j0 - start:j1 - start, i] = product.amax(dim=0).view(j1 - j0, patches)
        for j0, j1 in [*_spans(0, start, chunk), *_spans(stop, n, chunk)]:  # partners in other bands: this row only
            product = own @ partners(j0, j1).T
            best[i - start, j0:j1] = product.view(patches, j1 - j0, patches).amax(dim=2).T
    return best


def _spans(begin: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    """Yields consecutive [a, b) ranges of at most ``size`` covering [begin, end), as equal as possible.

    Equal parts keep every product wide (a lone 1-image remainder multiplies at about half the rate).
    """
    total = end - begin
    if total <= 0:
        return
    parts = -(-total // size)
    for k in range(parts):
        yield begin + k * total // parts, begin + (k + 1) * total // parts
