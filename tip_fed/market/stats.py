"""Pooling correlations over replicates, paired tests, and value-distribution statistics.

Per-replicate correlations are pooled with Fisher's z (weights ``n - 3``), with bootstrap CIs
that resample whole replicates, because sellers within a replicate share a buyer and are not
independent. Distribution statistics (Gini, top share, Lorenz) describe who gets the value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tip_fed.errors import DataError

R_CLIP = 0.9999  # |r| = 1 happens with 8 sellers; arctanh(1) is infinite
# Below this many replicates a bootstrap over replicates has too few distinct resamples to give a
# meaningful interval or p-value (3 replicates of one sign give "p = 0.001"); those fields are None.
MIN_BOOTSTRAP_REPLICATES = 10


def fisher_z(r: Sequence[float] | np.ndarray) -> np.ndarray:
    """Fisher's z of correlations, clipped to ``±R_CLIP`` so perfect ranks stay finite."""
    return np.arctanh(np.clip(np.asarray(r, float), -R_CLIP, R_CLIP))


def _weights(ns: Sequence[int] | np.ndarray) -> np.ndarray:
    w = np.asarray(ns, float) - 3.0
    if w.size == 0 or np.any(w <= 0):
        raise DataError("Fisher-z pooling needs at least 4 sellers in every replicate (weights n - 3)")
    return w


def _clean(rs: Sequence[float | None], ns: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    keep = [i for i, r in enumerate(rs) if r is not None and np.isfinite(r)]
    return np.asarray([rs[i] for i in keep], float), np.asarray([ns[i] for i in keep], float)


def pool(
    rs: Sequence[float | None], ns: Sequence[int], *, boot: int = 2000, seed: int = 0
) -> dict[str, float | int | None]:
    """Fisher-z pooled correlation with a bootstrap 95% CI over replicates; undefined rs are dropped."""
    r, n = _clean(rs, ns)
    if r.size == 0:
        return {"pooled": None, "ci_low": None, "ci_high": None, "mean": None, "mean_abs": None, "n_replicates": 0}
    if r.size == 1:  # one session: its own correlation, no interval (nothing to resample)
        return {"pooled": float(r[0]), "ci_low": None, "ci_high": None, "mean": float(r[0]),
                "mean_abs": float(abs(r[0])), "n_replicates": 1}
    w, z = _weights(n), fisher_z(r)
    lo = hi = None
    if r.size >= MIN_BOOTSTRAP_REPLICATES:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, r.size, size=(boot, r.size))
        zb = (z[idx] * w[idx]).sum(1) / w[idx].sum(1)
        lo, hi = (float(x) for x in np.tanh(np.percentile(zb, [2.5, 97.5])))
    return {
        "pooled": float(np.tanh((w * z).sum() / w.sum())),
        "ci_low": lo,
        "ci_high": hi,
        "mean": float(r.mean()),
        "mean_abs": float(np.abs(r).mean()),
        "n_replicates": int(r.size),
    }


def paired(
    rs_a: Sequence[float | None], rs_b: Sequence[float | None], ns: Sequence[int], *, boot: int = 2000, seed: int = 0
) -> dict[str, float | int | None]:
    """Paired comparison of method A vs B over the same replicates: weighted mean Δz = z_A - z_B.

    ``p_sign_flip`` is the two-sided randomisation test of the weighted mean Δz (exact up to 2^13
    replicates' sign patterns, scipy's permutation test); it is honest at any number of replicates:
    with 3 it cannot go below 0.25. ``p_wilcoxon`` is the signed-rank test on per-replicate Δz.
    ``p_bootstrap`` and the CI resample replicates and are None below
    :data:`MIN_BOOTSTRAP_REPLICATES`.
    """
    keep = [i for i in range(len(ns)) if rs_a[i] is not None and rs_b[i] is not None]
    empty: dict[str, float | int | None] = {
        "delta_z": None,
        "ci_low": None,
        "ci_high": None,
        "p_sign_flip": None,
        "p_bootstrap": None,
        "p_wilcoxon": None,
        "n_replicates": len(keep),
    }
    if len(keep) < 2:
        return empty
    dz = fisher_z([float(rs_a[i]) for i in keep]) - fisher_z([float(rs_b[i]) for i in keep])  # type: ignore[arg-type]
    w = _weights([ns[i] for i in keep])
    out = {**empty, "delta_z": float((w * dz).sum() / w.sum()), "n_replicates": int(dz.size)}
    if not np.any(dz != 0):
        return {
            **out,
            "p_sign_flip": 1.0,
            "p_wilcoxon": 1.0,
            **({"p_bootstrap": 1.0, "ci_low": 0.0, "ci_high": 0.0} if dz.size >= MIN_BOOTSTRAP_REPLICATES else {}),
        }
    from scipy import stats as sps  # here: rendering and pooling results need no scipy

    out["p_wilcoxon"] = float(sps.wilcoxon(dz).pvalue)
    out["p_sign_flip"] = float(
        sps.permutation_test(
            (dz,),
            lambda x, axis=-1: (x * w).sum(axis=axis) / w.sum(),
            permutation_type="samples",
            vectorized=True,
            n_resamples=8192,
            alternative="two-sided",
            rng=np.random.default_rng(seed),
        ).pvalue
    )
    if dz.size >= MIN_BOOTSTRAP_REPLICATES:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, dz.size, size=(boot, dz.size))
        db = (dz[idx] * w[idx]).sum(1) / w[idx].sum(1)
        tail = min((db <= 0).sum(), (db >= 0).sum())
        out.update(
            ci_low=float(np.percentile(db, 2.5)),
            ci_high=float(np.percentile(db, 97.5)),
            p_bootstrap=float(min(1.0, 2 * (tail + 1) / (boot + 1))),
        )
    return out


def topk_agreement(scores: Sequence[float], benefits: Sequence[float], k: int) -> float:
    """Fraction of the k highest-scored sellers that are among the k highest-benefit sellers."""
    s, b = np.asarray(scores, float), np.asarray(benefits, float)
    k = max(1, min(k, s.size))
    return len(set(np.argsort(-s)[:k]) & set(np.argsort(-b)[:k])) / k


def _nonneg(values: Sequence[float], what: str) -> np.ndarray:
    v = np.asarray(values, float)
    if np.any(v < 0):
        raise DataError(f"{what} needs non-negative values (clip signed values at 0 first)")
    return v


def gini(values: Sequence[float]) -> float:
    """Gini coefficient of non-negative amounts: 0 = equal, (n-1)/n = one holder has everything."""
    v = np.sort(_nonneg(values, "gini"))
    n, total = v.size, v.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ v / (n * total))


def top_share(values: Sequence[float], fraction: float = 0.1) -> float:
    """Share of the total held by the top ``fraction`` of holders (at least one holder)."""
    v = np.sort(_nonneg(values, "top_share"))[::-1]
    total = v.sum()
    if v.size == 0 or total == 0:
        return 0.0
    k = max(1, int(np.ceil(fraction * v.size)))
    return float(v[:k].sum() / total)


def lorenz(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve points (population share, cumulative value share), starting at (0, 0)."""
    v = np.sort(_nonneg(values, "lorenz"))
    total = v.sum()
    x = np.arange(v.size + 1) / max(v.size, 1)
    y = np.concatenate([[0.0], np.cumsum(v) / total]) if total > 0 else x.copy()
    return x, y


def value_distribution(values: Sequence[float]) -> dict[str, float | int]:
    """Heavy-tail summary of signed seller values: Gini and top-10% share of the positive part."""
    v = np.asarray(values, float)
    pos = np.clip(v, 0, None)
    return {
        "gini": gini(pos),
        "top10_share": top_share(pos, 0.1),
        "fraction_negative": float((v < 0).mean()) if v.size else 0.0,
        "n_sellers": int(v.size),
    }
