"""Blocked k-nearest-neighbour search of patch features by matrix products, within a memory budget.

Patch-matching methods (AnomalyDINO's memory bank, its batched zero-shot mode) need, for every query patch, the k
largest inner products with a bank of patches (cosine similarity on unit vectors, or -|q - b|^2 / 2 up to a per-query
constant when the bank carries a bias). The full (Q, M) product does not fit for real banks (VisA at 672 px: 2304
query patches x 460k bank patches = 4 GB per image), so it is computed in blocks of queries and bank columns, each
block reduced at once (``amax`` for k = 1, ``topk`` merged with the running best otherwise). Like MuSc's mutual
scoring (``zsadbench.methods.musc.mutual_scoring``), no distance matrix is ever materialised.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# one product block: on a CPU about 8 MiB (1024 x 2048), which stays in cache while it is reduced (an 8192 x 8192
# block ran 1.3x slower than this on 2 cores: benchmarks/bench_anomalydino.py); on CUDA as wide as the budget allows
BLOCK_COLUMNS_CPU = 2048
BLOCK_BYTES_CPU = 8 * 2**20
BLOCK_COLUMNS_CUDA = 65536


def largest_products(queries: Tensor, bank: Tensor, k: int = 1, *, bank_bias: Tensor | None = None,
                     query_groups: Tensor | None = None, bank_groups: Tensor | None = None,
                     memory_mb: float = 1024.0, progress: bool = False) -> Tensor:
    """Returns (Q, k) float32: per query row, the k largest ``q . b + bias_b`` over the bank rows, descending.

    ``queries`` (Q, D) and ``bank`` (M, D) are multiplied in float32 on the queries' device. ``bank_bias`` (M,) is
    added to every column (``-|b|^2 / 2`` turns the product into a squared-L2 ranking). With ``query_groups`` (Q,)
    and ``bank_groups`` (M,) integer labels, pairs of equal label are excluded (AnomalyDINO's batched mode: a test
    image is never its own reference). ``memory_mb`` bounds the product block plus the running best; a query needs
    at least one full block of ``k`` columns. Raises when fewer than ``k`` bank rows are eligible for some query.
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"largest_products expects (Q, D) queries and (M, D) bank, got {tuple(queries.shape)} and "
                         f"{tuple(bank.shape)}")
    if (query_groups is None) != (bank_groups is None):
        raise ValueError("largest_products: give both query_groups and bank_groups, or neither")
    n_queries, n_bank = queries.shape[0], bank.shape[0]
    if not 1 <= k <= n_bank:
        raise ValueError(f"largest_products: k={k} must lie in [1, {n_bank}] (the bank size)")
    device = queries.device
    queries = queries.float()
    bank = bank.to(device, torch.float32)
    bias = None if bank_bias is None else bank_bias.to(device, torch.float32)
    budget = memory_mb * 2**20
    target = BLOCK_COLUMNS_CUDA if device.type == "cuda" else BLOCK_COLUMNS_CPU
    columns = min(n_bank, max(k, target))
    # rows so that one (rows, columns) product, its top-k and the running best (2 x rows x k) fit the budget
    rows = int(budget // (4 * (columns + 3 * k) + (columns if query_groups is not None else 0)))
    if device.type != "cuda":
        rows = min(rows, BLOCK_BYTES_CPU // (4 * columns))
    rows = max(1, min(n_queries, rows))
    if rows == 1 and 4 * (columns + 3 * k) > budget:
        log.warning("patch kNN: one query row needs %.0f MiB; the budget is %.0f MiB (running anyway)",
                    4 * (columns + 3 * k) / 2**20, memory_mb)
    out = torch.empty(n_queries, k, dtype=torch.float32, device=device)
    bar = tqdm(total=n_queries, desc="patch kNN", unit="patch", leave=False, disable=not progress)
    for r0 in range(0, n_queries, rows):
        r1 = min(n_queries, r0 + rows)
        query_block = queries[r0:r1]
        best: Tensor | None = None
        for c0 in range(0, n_bank, columns):
            c1 = min(n_bank, c0 + columns)
            product = query_block @ bank[c0:c1].T
            if bias is not None:
                product += bias[c0:c1]
            if query_groups is not None and bank_groups is not None:
                same = query_groups[r0:r1, None].to(device) == bank_groups[None, c0:c1].to(device)
                product.masked_fill_(same, float("-inf"))
            if k == 1:
                top = product.amax(dim=1, keepdim=True)
                best = top if best is None else torch.maximum(best, top)
            else:
                top = product.topk(min(k, c1 - c0), dim=1).values
                merged = top if best is None else torch.cat([best, top], dim=1)
                best = merged.topk(min(k, merged.shape[1]), dim=1).values
            del product
        assert best is not None
        if best.shape[1] < k or bool(torch.isneginf(best[:, -1]).any()):
            raise ValueError(f"largest_products: some query has fewer than k={k} eligible bank rows")
        out[r0:r1] = best
        bar.update(r1 - r0)
    bar.close()
    return out
