"""Plaintext influence scores: the reference every encrypted path is checked against.

``s_i = v · g_i`` with ``v = P ḡ_obj``. ``s_i > 0`` means predicted helpful: one SGD step of
size ``η`` on sample ``i`` changes the objective loss by about ``-η s_i`` (with ``P = I``).
All results are float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tip_fed.core.precondition import Preconditioner
from tip_fed.errors import ConfigError, DataError

__all__ = ["clip_rows", "query_vector", "released_rows", "scores", "seller_total"]


def _matrix(grads: torch.Tensor, what: str, dim: int | None = None) -> torch.Tensor:
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2:
        shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
        raise DataError(f"{what} must be a 2-d tensor [n, dim], got {shape}.")
    if dim is not None and grads.shape[1] != dim:
        raise DataError(
            f"{what} has dimension {grads.shape[1]} but the query has {dim}; both must come "
            "from the same projection spec."
        )
    if not torch.isfinite(grads).all():
        raise DataError(f"{what} contains NaN or infinite values.")
    return grads


def _query(query: torch.Tensor) -> torch.Tensor:
    if not isinstance(query, torch.Tensor) or query.dim() != 1:
        shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise DataError(f"the query must be a 1-d tensor [dim], got {shape}.")
    if not torch.isfinite(query).all():
        raise DataError("the query contains NaN or infinite values.")
    return query.to(torch.float64)


def clip_rows(grads: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale rows whose L2 norm exceeds ``bound`` down to ``bound``.

    The public norm bound stops a seller inflating its scores by scaling gradients. Returns
    ``(clipped, scale_factors)`` with ``clipped = grads * scale_factors[:, None]`` and factors
    in ``(0, 1]``, in ``grads``' dtype.
    """
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (
        math.isfinite(bound) and bound > 0
    ):
        raise ConfigError(f"the gradient norm bound must be a finite number > 0, got {bound!r}.")
    grads = _matrix(grads, "gradients to clip")
    norms = torch.linalg.vector_norm(grads.to(torch.float64), dim=1)
    factors = torch.where(norms > bound, bound / norms.clamp(min=1e-300), torch.ones_like(norms))
    factors = factors.to(grads.dtype)
    return grads * factors[:, None], factors


def query_vector(preconditioner: Preconditioner, objective_grads: torch.Tensor) -> torch.Tensor:
    """``v = P · mean(objective_grads)``, shape ``[dim]``, float64."""
    grads = _matrix(objective_grads, "objective_grads", preconditioner.dim)
    if grads.shape[0] == 0:
        raise DataError("objective_grads has no rows; pass at least one objective sample.")
    return preconditioner.apply(grads.to(torch.float64).mean(dim=0))


def scores(query: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Per-sample scores ``s_i = v · g_i``, shape ``[n]``, float64."""
    query = _query(query)
    grads = _matrix(grads, "grads", query.shape[0])
    return grads.to(device=query.device, dtype=torch.float64) @ query


def seller_total(query: torch.Tensor, grads: torch.Tensor) -> float:
    """``v · Σ_i g_i``: a seller's aggregate score (equals ``scores(...).sum()``)."""
    query = _query(query)
    grads = _matrix(grads, "grads", query.shape[0])
    return float(grads.to(device=query.device, dtype=torch.float64).sum(dim=0) @ query)


def released_rows(rows: np.ndarray, per_sample: bool) -> np.ndarray:
    """The rows whose scores a seller releases (before noise): every row, then their mean, whose score
    times n is the seller's total; or the mean alone (aggregate disclosure). Float64."""
    rows = np.asarray(rows, dtype=np.float64)
    mean = rows.mean(axis=0, keepdims=True)
    return np.vstack([rows, mean]) if per_sample else mean
