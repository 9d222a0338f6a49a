"""Duplicate and near-duplicate records in a delivery (a seller padding its data to inflate its total).

Why: a seller's total is a sum over its records, so copying every record 5 times multiplies the
total by 5 and is consistent with any commitment made over the padded data. Records are compared
after standardising every column (so units do not matter): two records whose root-mean-square
standardised difference is at most ``tol`` are near-duplicates (0 for exact copies). Candidates are
found in a 32-dimensional random projection (chunked, O(n^2 * 32)) and confirmed exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from tip_fed.protocol.data import Batch, check_batch

NEAR_DUP_TOL = 1e-3
_PROJ_DIM = 32
_CHUNK = 1024


def _features(data: Batch) -> np.ndarray:
    n = check_batch(data)
    cols = [data[k].detach().reshape(n, -1).to(torch.float64).cpu().numpy() for k in sorted(data)]
    x = np.concatenate(cols, axis=1)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def duplicate_pairs(data: Batch, tol: float = NEAR_DUP_TOL) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of records at standardised RMS distance <= ``tol``."""
    x = _features(data)
    n, d = x.shape
    if n < 2:
        return []
    if d > _PROJ_DIM:
        proj = np.random.default_rng(0).standard_normal((d, _PROJ_DIM)) / np.sqrt(_PROJ_DIM)
        y = x @ proj
    else:
        y = x
    sq = (y**2).sum(axis=1)
    # a projection keeps squared distances within a factor ~(1 +- 0.9) w.h.p. at these sizes: generous slack
    cut = (3.0 * tol) ** 2 * d
    pairs = []
    for start in range(0, n, _CHUNK):
        block = y[start : start + _CHUNK]
        d2 = sq[start : start + _CHUNK, None] + sq[None, :] - 2.0 * block @ y.T
        for a, b in zip(*np.nonzero(d2 <= cut + 1e-9 * (1 + sq.max())), strict=True):
            i, j = start + int(a), int(b)
            if i < j and np.sqrt(np.mean((x[i] - x[j]) ** 2)) <= tol:
                pairs.append((i, j))
    return pairs


def duplicated_records(data: Batch, tol: float = NEAR_DUP_TOL) -> list[int]:
    """Records that (nearly) repeat an earlier record: what padding added."""
    return sorted({j for _, j in duplicate_pairs(data, tol)})
