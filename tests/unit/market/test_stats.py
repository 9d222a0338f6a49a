"""Pooled Fisher z and bootstrap CIs against independent computations; distribution statistics."""

import math

import numpy as np
import pytest

from tip_fed.errors import DataError
from tip_fed.market import stats


def test_pooled_point_estimate_is_weighted_fisher_z():
    rs, ns = [0.9, 0.5, -0.2, 0.7], [8, 10, 6, 20]
    z = sum((n - 3) * math.atanh(r) for r, n in zip(rs, ns, strict=True)) / sum(n - 3 for n in ns)
    out = stats.pool(rs, ns)
    assert out["pooled"] == pytest.approx(math.tanh(z), abs=1e-12)
    assert out["mean"] == pytest.approx(np.mean(rs)) and out["mean_abs"] == pytest.approx(np.mean(np.abs(rs)))
    many = stats.pool(rs * 3, ns * 3)
    assert many["ci_low"] <= many["pooled"] <= many["ci_high"]


def test_bootstrap_ci_agrees_with_normal_theory_for_many_replicates():
    rng = np.random.default_rng(1)
    z = rng.normal(0.8, 0.3, size=400)
    out = stats.pool(np.tanh(z), [10] * 400, boot=4000)
    se = z.std(ddof=1) / math.sqrt(400)
    assert out["ci_low"] == pytest.approx(math.tanh(z.mean() - 1.96 * se), abs=0.01)
    assert out["ci_high"] == pytest.approx(math.tanh(z.mean() + 1.96 * se), abs=0.01)


def test_perfect_and_undefined_correlations_are_handled():
    out = stats.pool([1.0, 1.0, None], [8, 8, 8])
    assert out["n_replicates"] == 2 and out["pooled"] == pytest.approx(stats.R_CLIP)
    with pytest.raises(DataError, match="4 sellers"):
        stats.pool([0.5, 0.4], [3, 8])
    # one session has nothing to pool: its own correlation, exactly, and no interval
    assert stats.pool([1.0], [3]) == {"pooled": 1.0, "ci_low": None, "ci_high": None, "mean": 1.0, "mean_abs": 1.0,
                                      "n_replicates": 1}


def test_paired_test_detects_a_difference_and_not_a_non_difference():
    rng = np.random.default_rng(2)
    a = np.tanh(rng.normal(1.2, 0.2, 30))
    b = np.tanh(rng.normal(0.4, 0.2, 30))
    out = stats.paired(list(a), list(b), [8] * 30)
    assert out["delta_z"] == pytest.approx(np.mean(np.arctanh(a) - np.arctanh(b)))
    assert out["p_bootstrap"] < 0.01 and out["p_wilcoxon"] < 0.01 and out["p_sign_flip"] < 0.01 and out["ci_low"] > 0
    same = stats.paired(list(a), list(a), [8] * 30)
    assert same["delta_z"] == 0 and same["p_bootstrap"] == 1.0 and same["p_wilcoxon"] == 1.0
    assert same["p_sign_flip"] == 1.0


def _sign_flip_p(dz, w):
    """Exact two-sided sign-flip p by enumerating every sign pattern (independent of scipy)."""
    import itertools

    obs = abs(np.dot(dz, w))
    hits = [abs(np.dot(np.array(signs) * dz, w)) >= obs - 1e-12 for signs in itertools.product((1, -1), repeat=dz.size)]
    return float(np.mean(hits))


@pytest.mark.parametrize("n", [3, 5, 7])
def test_few_replicates_give_honest_p_values_and_no_bootstrap(n):
    """All replicates favour A: with 3 of them no test may claim p < 0.25 (2 of 8 sign patterns are as extreme)."""
    rng = np.random.default_rng(n)
    a, b = np.tanh(rng.normal(1.2, 0.1, n)), np.tanh(rng.normal(0.2, 0.1, n))
    ns = list(rng.integers(6, 30, n))
    out = stats.paired(list(a), list(b), ns)
    dz, w = np.arctanh(a) - np.arctanh(b), np.asarray(ns, float) - 3
    assert out["p_sign_flip"] == pytest.approx(_sign_flip_p(dz, w))
    assert out["p_sign_flip"] >= 2 / 2**n - 1e-12
    assert out["p_bootstrap"] is None and out["ci_low"] is None and out["ci_high"] is None
    pooled = stats.pool(list(a), ns)
    assert pooled["ci_low"] is None and pooled["pooled"] is not None


def _gini_pairs(v):
    v = np.asarray(v, float)
    return np.abs(v[:, None] - v[None, :]).sum() / (2 * v.size**2 * v.mean())


def test_gini_top_share_and_lorenz():
    assert stats.gini([1, 1, 1, 1]) == 0.0
    assert stats.gini([0, 0, 0, 1]) == pytest.approx(0.75)
    v = np.random.default_rng(3).exponential(size=50)
    assert stats.gini(v) == pytest.approx(_gini_pairs(v))
    assert stats.top_share([10] + [1] * 9, 0.1) == pytest.approx(10 / 19)
    x, y = stats.lorenz(v)
    assert (x[0], y[0], x[-1], y[-1]) == (0, 0, 1, pytest.approx(1.0)) and np.all(np.diff(y) >= 0)
    area = np.sum((y[1:] + y[:-1]) / 2 * np.diff(x))
    assert stats.gini(v) == pytest.approx(1 - 2 * area)
    with pytest.raises(DataError, match="non-negative"):
        stats.gini([1, -1])


def test_value_distribution_and_topk():
    d = stats.value_distribution([5, 1, -1, -2])
    assert d["fraction_negative"] == 0.5 and d["top10_share"] == pytest.approx(5 / 6)
    assert stats.topk_agreement([3, 2, 1, 0], [0, 2, 3, 1], 2) == 0.5
