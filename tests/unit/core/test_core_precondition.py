"""Preconditioners against dense inverses built independently with numpy.

Vec ordering: a layer block is G ``[rank_out, rank_in]`` flattened row-major, so the
Kronecker curvature ``G -> S G A`` is the matrix ``np.kron(S, A)`` in that ordering
(``A ⊗ S`` in the column-major convention).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from tip_fed.core.gradients import KfacStats
from tip_fed.core.precondition import DAMPING_FLOOR, fit_preconditioner
from tip_fed.core.projection import LayerProjection, ProjectionSpec
from tip_fed.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


def spec_of(*shapes: tuple[int, int]) -> ProjectionSpec:
    """Spec with layers of the given (rank_out, rank_in)."""
    layers = tuple(LayerProjection(f"l{i}", 2 * r_in, 2 * r_out, r_in, r_out)
                   for i, (r_out, r_in) in enumerate(shapes))
    return ProjectionSpec(layers=layers, seed=0)


def spd(size: int, eigenvalues: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random SPD matrix and its orthogonal eigenbasis."""
    basis, _ = np.linalg.qr(RNG.normal(size=(size, size)))
    if eigenvalues is None:
        eigenvalues = RNG.uniform(0.5, 3.0, size=size)
    return basis @ np.diag(eigenvalues) @ basis.T, basis


def stats_for(name: str, a: np.ndarray, s: np.ndarray, tokens: int = 10, samples: int = 4) -> KfacStats:
    return KfacStats(name, torch.tensor(a * tokens), torch.tensor(s * samples), tokens, samples)


def apply_np(preconditioner, v: np.ndarray) -> np.ndarray:
    return preconditioner.apply(torch.tensor(v)).numpy()


def test_identity_is_identity() -> None:
    spec = spec_of((2, 3))
    p = fit_preconditioner("identity", spec)
    v = torch.randn(4, spec.dim)
    assert torch.equal(p.apply(v), v.double()) and p.damping == 0.0 and p.kind == "identity"


@pytest.mark.parametrize("damping", [None, 0.3])
def test_raw_equals_dense_solve(damping: float | None) -> None:
    spec = spec_of((2, 3), (3, 2))
    g = RNG.normal(size=(40, spec.dim)) * RNG.uniform(0.1, 5, size=spec.dim)
    fisher = g.T @ g / 40
    lam = 0.1 * np.trace(fisher) / spec.dim if damping is None else damping
    v = RNG.normal(size=(3, spec.dim))

    p = fit_preconditioner("raw", spec, train_grads=torch.tensor(g), damping=damping)

    assert p.damping == pytest.approx(lam, rel=1e-12)
    expected = np.linalg.solve(fisher + lam * np.eye(spec.dim), v.T).T
    np.testing.assert_allclose(apply_np(p, v), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(apply_np(p, v[0]), expected[0], rtol=1e-9, atol=1e-12)
    assert p.to_dict()["kind"] == "raw" and p.to_dict()["num_samples"] == 40


@pytest.mark.parametrize("damping", [None, 0.05])
def test_kfac_single_layer_equals_kronecker_inverse(damping: float | None) -> None:
    spec = spec_of((2, 3))
    a, _ = spd(3)
    s, _ = spd(2)
    lam = 0.1 * np.trace(s) * np.trace(a) / 6 if damping is None else damping  # mean of λ_S λ_Aᵀ
    v = RNG.normal(size=(5, 6))

    p = fit_preconditioner("kfac", spec, kfac_stats={"l0": stats_for("l0", a, s)}, damping=damping)

    assert p.damping["l0"] == pytest.approx(lam, rel=1e-12)
    expected = np.linalg.solve(np.kron(s, a) + lam * np.eye(6), v.T).T
    np.testing.assert_allclose(apply_np(p, v), expected, rtol=1e-9, atol=1e-12)


def test_kfac_is_block_diagonal_over_layers() -> None:
    spec = spec_of((2, 3), (3, 3), (1, 2))
    stats, blocks = {}, []
    for layer in spec.layers:
        a, _ = spd(layer.rank_in)
        s, _ = spd(layer.rank_out)
        stats[layer.name] = stats_for(layer.name, a, s)
        blocks.append(np.kron(s, a) + 0.2 * np.eye(layer.dim))
    v = RNG.normal(size=spec.dim)
    p = fit_preconditioner("kfac", spec, kfac_stats=stats, damping=0.2)
    expected = np.linalg.solve(scipy.linalg.block_diag(*blocks), v)
    np.testing.assert_allclose(apply_np(p, v), expected, rtol=1e-9, atol=1e-12)


def eigenbasis_grads(basis_s: np.ndarray, basis_a: np.ndarray, second_moments: np.ndarray) -> np.ndarray:
    """Per-sample grads ±c Q_S e_j e_kᵀ Q_Aᵀ whose Fisher is exactly diagonal in the Kronecker
    eigenbasis with eigenvalues ``second_moments[j, k]``."""
    r_out, r_in = second_moments.shape
    n = 2 * r_out * r_in
    rows = []
    for j in range(r_out):
        for k in range(r_in):
            c = np.sqrt(second_moments[j, k] * n / 2)
            g = c * np.outer(basis_s[:, j], basis_a[:, k])
            rows += [g.reshape(-1), -g.reshape(-1)]
    return np.array(rows)


@pytest.mark.parametrize("damping", [None, 0.01])
def test_ekfac_with_exact_eigenvalues_equals_raw(damping: float | None) -> None:
    spec = spec_of((2, 3))
    a, basis_a = spd(3, np.array([0.5, 1.5, 4.0]))
    s, basis_s = spd(2, np.array([0.3, 2.0]))
    moments = RNG.uniform(0.1, 3.0, size=(2, 3))  # not of Kronecker form: EKFAC's refit
    g = eigenbasis_grads(basis_s, basis_a, moments)
    stats = {"l0": stats_for("l0", a, s)}
    v = RNG.normal(size=6)

    ekfac = fit_preconditioner("ekfac", spec, torch.tensor(g), stats, damping)
    raw = fit_preconditioner("raw", spec, torch.tensor(g), damping=damping)

    lam = 0.1 * moments.mean() if damping is None else damping
    assert ekfac.damping["l0"] == pytest.approx(lam, rel=1e-10)
    expected = np.linalg.solve(g.T @ g / len(g) + lam * np.eye(6), v)
    np.testing.assert_allclose(apply_np(ekfac, v), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(apply_np(raw, v), expected, rtol=1e-9, atol=1e-12)


def test_ekfac_reduces_to_kfac_when_moments_are_kronecker() -> None:
    spec = spec_of((3, 2))
    eig_a, eig_s = np.array([0.7, 2.5]), np.array([0.2, 1.0, 3.0])
    a, basis_a = spd(2, eig_a)
    s, basis_s = spd(3, eig_s)
    g = eigenbasis_grads(basis_s, basis_a, np.outer(eig_s, eig_a))
    stats = {"l0": stats_for("l0", a, s)}
    v = RNG.normal(size=(2, 6))
    kfac = fit_preconditioner("kfac", spec, kfac_stats=stats)
    ekfac = fit_preconditioner("ekfac", spec, torch.tensor(g), stats)
    np.testing.assert_allclose(apply_np(ekfac, v), apply_np(kfac, v), rtol=1e-9)
    lam = 0.1 * np.outer(eig_s, eig_a).mean()
    expected = np.linalg.solve(np.kron(s, a) + lam * np.eye(6), v.T).T
    np.testing.assert_allclose(apply_np(kfac, v), expected, rtol=1e-9)


def test_default_damping_is_relative_to_the_spectrum() -> None:
    c = 7.0
    spec = spec_of((2, 3))
    g = RNG.normal(size=(20, 6))
    a, _ = spd(3)
    s, _ = spd(2)
    v = RNG.normal(size=6)
    raw, raw_c = (fit_preconditioner("raw", spec, torch.tensor(x)) for x in (g, c * g))
    assert raw_c.damping == pytest.approx(c**2 * raw.damping)
    np.testing.assert_allclose(apply_np(raw_c, v), apply_np(raw, v) / c**2, rtol=1e-9)
    for kind in ("kfac", "ekfac"):
        base = fit_preconditioner(kind, spec, torch.tensor(g), {"l0": stats_for("l0", a, s)})
        scaled = fit_preconditioner(kind, spec, torch.tensor(c * g), {"l0": stats_for("l0", a, c**2 * s)})
        assert scaled.damping["l0"] == pytest.approx(c**2 * base.damping["l0"])
        np.testing.assert_allclose(apply_np(scaled, v), apply_np(base, v) / c**2, rtol=1e-9)


def test_errors() -> None:
    spec = spec_of((2, 3))
    g = torch.randn(10, 6, dtype=torch.float64)
    a, _ = spd(3)
    s, _ = spd(2)
    stats = {"l0": stats_for("l0", a, s)}
    with pytest.raises(ConfigError, match="unknown preconditioner"):
        fit_preconditioner("shampoo", spec, g)
    for bad in (-1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ConfigError):
            fit_preconditioner("raw", spec, g, damping=bad)
    with pytest.raises(DataError):
        fit_preconditioner("raw", spec)
    with pytest.raises(DataError):
        fit_preconditioner("raw", spec, torch.randn(10, 5))
    with pytest.raises(DataError):
        fit_preconditioner("raw", spec, torch.randn(0, 6))
    with pytest.raises(DataError, match="zero"):
        fit_preconditioner("raw", spec, torch.zeros(10, 6))
    with pytest.raises(ConfigError, match="below the floor"):
        fit_preconditioner("raw", spec, g[:3], damping=0.0)  # rank 3 < dim 6
    with pytest.raises(DataError):
        fit_preconditioner("kfac", spec)
    with pytest.raises(DataError, match="no entry"):
        fit_preconditioner("kfac", spec, kfac_stats={"other": stats["l0"]})
    with pytest.raises(DataError):
        fit_preconditioner("kfac", spec, kfac_stats={"l0": stats_for("l0", s, a)})
    with pytest.raises(DataError):
        fit_preconditioner("ekfac", spec, kfac_stats=stats)
    p = fit_preconditioner("kfac", spec, kfac_stats=stats)
    with pytest.raises(DataError):
        p.apply(torch.randn(5))
    with pytest.raises(DataError):
        p.apply(torch.randn(2, 2, 6))


@pytest.mark.parametrize("kind", ["raw", "kfac", "ekfac"])
def test_damping_floor_keeps_a_noise_layer_out_of_the_query(kind: str) -> None:
    """A layer whose gradients are noise-sized got λ ~ 1e-19 and dominated the query.

    Without the floor this setup gives the noise layer's query block norm 2.5e8 next to 0.31
    for the signal layer; with it, 4.9e-4.
    """
    # Prepare: layer l0 carries the signal; l1's gradients are 1e-9 noise (curvature ~1e-18).
    spec = spec_of((3, 2), (2, 2))
    torch.manual_seed(0)
    g = torch.randn(50, spec.dim, dtype=torch.float64)
    g[:, 6:] *= 1e-9
    stats = {}
    for layer, start in zip(spec.layers, spec.offsets(), strict=True):
        block = g[:, start:start + layer.dim].reshape(50, layer.rank_out, layer.rank_in)
        a = torch.einsum("noi,noj->ij", block, block) / 50  # one token, Kronecker-shaped factors
        s = torch.einsum("noi,npi->op", block, block) / (50 * float(a.trace()))
        stats[layer.name] = stats_for(layer.name, a.numpy(), s.numpy())
    objective = g.mean(dim=0)
    # Execute
    p = fit_preconditioner(kind, spec, g, stats if kind != "raw" else None)
    query = p.apply(objective)
    # Assert: λ is at least the floor, and the noise block stays below the signal block.
    mean_eigenvalue = float((g.T @ g / 50).trace()) / spec.dim
    used = p.damping if kind == "raw" else min(p.damping.values())
    assert used >= 0.99 * DAMPING_FLOOR * mean_eigenvalue
    assert float(query[6:].norm()) < float(query[:6].norm())
    with pytest.raises(ConfigError, match="below the floor"):
        fit_preconditioner(kind, spec, g, stats if kind != "raw" else None, damping=7.8e-17)
