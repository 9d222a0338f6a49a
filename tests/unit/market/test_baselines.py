"""Baseline valuation methods against plain numpy loops."""

import numpy as np
import pytest
import torch

from tip_fed.market import baselines


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_gradient_and_data_cosine_match_loops():
    rng = np.random.default_rng(0)
    g, obj = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    assert baselines.gradient_cosine(g, obj) == pytest.approx(np.mean([_cos(row, obj.mean(0)) for row in g]))
    assert baselines.data_cosine(g, obj) == pytest.approx(np.mean([_cos(row, obj.mean(0)) for row in g]))
    g[0] = 0  # a zero gradient counts as cosine 0, not NaN
    assert np.isfinite(baselines.gradient_cosine(g, obj))


def test_token_features_are_masked_bags_of_tokens():
    data = {"input_ids": torch.tensor([[1, 2, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert baselines.features(data, 4).tolist() == [[0.0, 1.0, 2.0, 0.0]]


def test_score_all_gives_every_method_for_every_seller():
    rng = np.random.default_rng(1)
    sellers = {s: {"x": torch.randn(n, 3), "y": torch.zeros(n, dtype=torch.long)} for s, n in (("a", 4), ("b", 9))}
    grads = {s: rng.normal(size=(d["x"].shape[0], 6)) for s, d in sellers.items()}
    obj = {"x": torch.randn(5, 3), "y": torch.zeros(5, dtype=torch.long)}
    out = baselines.score_all(grads, rng.normal(size=(5, 6)), sellers, obj, seed=3)
    assert set(out) == set(baselines.METHODS) and all(set(v) == {"a", "b"} for v in out.values())
    assert out["data_size"] == {"a": 4.0, "b": 9.0}
    assert out["random"] == baselines.score_all(grads, rng.normal(size=(5, 6)), sellers, obj, seed=3)["random"]
