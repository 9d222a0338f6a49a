"""Fidelity (encrypted vs plaintext) and validity (score vs realised benefit) metrics.

Correlations are always signed: a method that ranks harmful data first must look bad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def pearson(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Signed Pearson correlation, None when undefined (fewer than 2 points or a constant input)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return _finite(stats.pearsonr(x, y).statistic)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Signed Spearman rank correlation, None when undefined."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return _finite(stats.spearmanr(x, y).statistic)


def fidelity(encrypted: Sequence[float], plaintext: Sequence[float]) -> dict[str, float | None]:
    """Agreement of decrypted scores with the plaintext reference.

    ``max_rel_error`` is relative to the score scale (the largest |plaintext| score), the
    meaningful yardstick for ranking; per-element relative errors explode near zero.
    """
    e, p = np.asarray(encrypted, float), np.asarray(plaintext, float)
    err = np.abs(e - p)
    scale = float(np.max(np.abs(p))) if p.size else 0.0
    return {
        "pearson": pearson(e.tolist(), p.tolist()),
        "max_abs_error": float(err.max()) if err.size else None,
        "max_rel_error": float(err.max() / scale) if err.size and scale > 0 else None,
        "n_scores": int(e.size),
    }


def top1_match(scores: Sequence[float], benefits: Sequence[float]) -> bool:
    """Whether the highest score and the highest realised benefit name the same seller."""
    return int(np.argmax(scores)) == int(np.argmax(benefits))


def validity(scores: Sequence[float], benefits: Sequence[float]) -> dict[str, float | bool | None]:
    """Signed correlations and top-1 agreement of per-seller scores with realised benefits."""
    return {
        "pearson": pearson(scores, benefits),
        "spearman": spearman(scores, benefits),
        "top1_match": top1_match(scores, benefits),
        "n_sellers": len(scores),
    }
