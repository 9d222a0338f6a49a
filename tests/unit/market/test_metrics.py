"""Validity and fidelity metrics against independent numpy computations."""

import numpy as np
import pytest

from tip_fed.market import metrics


def _ranks(x):
    return np.argsort(np.argsort(x)).astype(float)


def test_signed_correlations_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = -2 * a + rng.normal(scale=0.5, size=50)
    assert metrics.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert metrics.spearman(a, b) == pytest.approx(np.corrcoef(_ranks(a), _ranks(b))[0, 1], abs=1e-12)
    assert metrics.pearson(a, b) < -0.9  # sign is kept, never |r|


def test_undefined_correlations_are_none():
    assert metrics.pearson([1.0], [2.0]) is None
    assert metrics.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def test_fidelity_relative_to_score_scale():
    plain = np.array([10.0, -5.0, 0.0, 2.0])
    enc = plain + np.array([1e-6, -2e-6, 3e-6, 0.0])
    f = metrics.fidelity(enc, plain)
    assert f["max_abs_error"] == pytest.approx(3e-6)
    assert f["max_rel_error"] == pytest.approx(3e-7)
    assert f["pearson"] == pytest.approx(1.0, abs=1e-9)


def test_validity_top1():
    v = metrics.validity([1.0, 3.0, 2.0], [0.1, 0.5, 0.2])
    assert v["top1_match"] is True and v["spearman"] == pytest.approx(1.0)
    assert metrics.validity([3.0, 1.0, 2.0], [0.1, 0.5, 0.2])["top1_match"] is False
