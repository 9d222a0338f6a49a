"""Plaintext scores: formulas against numpy, and the sign convention against real SGD steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows, query_vector, scores, seller_total
from tip_fed.core.precondition import fit_preconditioner
from tip_fed.core.projection import LayerProjection, ProjectionSpec
from tip_fed.core.tasks import ClassificationTask
from tip_fed.errors import ConfigError, DataError

RNG = np.random.default_rng(1)


def flat_spec(dim: int) -> ProjectionSpec:
    """A spec whose only role is to carry ``dim`` (identity / raw ignore the layer layout)."""
    return ProjectionSpec(layers=(LayerProjection("all", dim, 1, dim, 1),), seed=0)


def test_clip_rows() -> None:
    g = RNG.normal(size=(6, 4)) * np.array([[0.1], [1], [3], [10], [0], [2]])
    clipped, factors = clip_rows(torch.tensor(g), 2.0)
    norms = np.linalg.norm(g, axis=1)
    expected = np.where(norms > 2.0, 2.0 / np.maximum(norms, 1e-300), 1.0)
    np.testing.assert_allclose(factors.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(clipped.numpy(), g * expected[:, None], rtol=1e-12)
    assert np.all(np.linalg.norm(clipped.numpy(), axis=1) <= 2.0 + 1e-12)
    assert clip_rows(torch.tensor(g, dtype=torch.float32), 1.0)[0].dtype == torch.float32
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError):
            clip_rows(torch.tensor(g), bad)
    with pytest.raises(DataError):
        clip_rows(torch.tensor(g[0]), 1.0)


def test_query_scores_and_total_match_numpy() -> None:
    dim = 8
    train = RNG.normal(size=(30, dim))
    objective = RNG.normal(size=(5, dim)) + 0.5
    seller = RNG.normal(size=(12, dim)).astype(np.float32)
    spec = flat_spec(dim)
    p = fit_preconditioner("raw", spec, torch.tensor(train), damping=0.1)

    v = query_vector(p, torch.tensor(objective))
    s = scores(v, torch.tensor(seller))
    total = seller_total(v, torch.tensor(seller))

    expected_v = np.linalg.solve(train.T @ train / 30 + 0.1 * np.eye(dim), objective.mean(0))
    np.testing.assert_allclose(v.numpy(), expected_v, rtol=1e-10)
    assert s.dtype == torch.float64 and v.dtype == torch.float64
    np.testing.assert_allclose(s.numpy(), seller.astype(np.float64) @ expected_v, rtol=1e-9)
    assert total == pytest.approx(float(seller.astype(np.float64).sum(0) @ expected_v), rel=1e-9)
    assert total == pytest.approx(float(s.sum()), rel=1e-9)


def test_influence_input_errors() -> None:
    spec = flat_spec(4)
    p = fit_preconditioner("identity", spec)
    v = query_vector(p, torch.randn(3, 4))
    with pytest.raises(DataError):
        query_vector(p, torch.randn(3, 5))
    with pytest.raises(DataError):
        query_vector(p, torch.randn(0, 4))
    with pytest.raises(DataError):
        scores(v, torch.randn(3, 5))
    with pytest.raises(DataError):
        scores(v[None], torch.randn(3, 4))
    with pytest.raises(DataError):
        seller_total(v, torch.full((2, 4), float("nan")))


# ----------------------------------------------------------------- sign convention


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()


def make_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    flip = torch.rand(n, generator=generator) < 0.3  # some harmful (mislabelled) samples
    return {"x": x, "y": torch.where(flip, (y + 1) % 3, y)}


def objective_loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return float(ClassificationTask().per_sample_loss(model, batch).mean())


def full_grads(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Unprojected per-sample gradients over all parameters, one sample at a time."""
    rows = []
    for i in range(batch["x"].shape[0]):
        loss = ClassificationTask().per_sample_loss(model, {k: v[i:i + 1] for k, v in batch.items()})[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def realised_benefit(
    model: torch.nn.Module, sample: dict, objective: dict, lr: float
) -> float:
    """loss_before - loss_after on the objective after one SGD step on ``sample``'s loss."""
    stepped = copy.deepcopy(model)
    params = list(stepped.parameters())
    loss = ClassificationTask().per_sample_loss(stepped, sample)[0]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for parameter, grad in zip(params, grads, strict=True):
            parameter -= lr * grad
    return objective_loss(model, objective) - objective_loss(stepped, objective)


def test_positive_score_means_one_sgd_step_lowers_the_objective_loss() -> None:
    model = mlp()
    train, objective = make_data(24, 1), make_data(40, 2)
    lr = 1e-4
    g_train, g_objective = full_grads(model, train), full_grads(model, objective)
    p = fit_preconditioner("identity", flat_spec(g_train.shape[1]))

    s = scores(query_vector(p, g_objective), g_train).numpy()
    benefit = np.array([
        realised_benefit(model, {k: v[i:i + 1] for k, v in train.items()}, objective, lr)
        for i in range(24)
    ])

    assert (s > 0).any() and (s < 0).any()
    # First order: benefit = lr * s_i + O(lr^2).
    np.testing.assert_allclose(benefit, lr * s, rtol=2e-2, atol=1e-3 * lr * np.abs(s).max())
    clear = np.abs(s) > 0.05 * np.abs(s).max()
    assert np.array_equal(np.sign(benefit[clear]), np.sign(s[clear]))


def test_projected_scores_track_realised_benefit() -> None:
    """Projected scores (weights and biases) estimate the full-gradient scores: each projection correlates
    positively with the realised benefit, and their average (JL is unbiased) closely."""
    model = mlp()
    train, objective = make_data(40, 3), make_data(60, 4)
    benefit = np.array([
        realised_benefit(model, {k: v[i:i + 1] for k, v in train.items()}, objective, 1e-4)
        for i in range(40)
    ])
    total = np.zeros(40)
    for seed in range(8):
        spec = ProjectionSpec.for_model(model, rank=12, seed=seed, kind=("gaussian", "rademacher")[seed % 2])
        g_train = projected_grads(model, spec, "classification", train)
        g_objective = projected_grads(model, spec, "classification", objective)
        s = scores(query_vector(fit_preconditioner("identity", spec), g_objective), g_train).numpy()
        assert np.corrcoef(s, benefit)[0, 1] > 0.4  # signed: positive score, positive benefit
        total += s
    assert np.corrcoef(total, benefit)[0, 1] > 0.9
