"""Per-layer projection ranks chosen from measured agreement with exact (unprojected) scores.

A projected score ``(P ḡ) · (P g_i)`` approximates the exact ``ḡ · g_i`` (``ḡ`` the mean
objective gradient, ``g_i`` a sample's gradient, weights and biases of every projected layer).
How well depends on the model, the data and each layer's rank, so the buyer measures it on its
own data before any seller sees the spec: exact per-sample scores of its training samples (every
layer at full size, where the projection is the identity) against projected ones, and raises
ranks until the per-sample Spearman correlation reaches a target or a size budget is spent.

Scores add up over layers, so each layer's contribution at each rank (1, 2, 4, ... per side,
clipped to the layer's size) comes from one gradient pass per rank, and any mix of per-layer
ranks is a sum of columns. Greedy: start every layer at rank 1 (a layer of at most
:data:`SMALL_LAYER` entries starts at its full size, exact), then double the rank of the layer
whose doubling raises the Spearman correlation most per added dimension (when no doubling raises
it: the one that most lowers the squared error of the scores per added dimension). A model
whose exact spec fits the budget is not projected at all.

Ranks are chosen on every other sample, raised until the one-sided 95 % lower confidence bound
of the Spearman correlation there reaches the target (a chance high on a few dozen samples does
not stop the search), and the agreement is reported on the other samples, so the figure is not
flattered by the choice. The budget is the projected dimension (what sellers
compute and the encrypted query's size grow with) and the projection matrices' memory on a
seller (costed as :mod:`tip_fed.protocol.resources` costs an Offer). What is measured is the
projection alone: identity-preconditioned scores (a curvature over every parameter is what the
projection exists to avoid).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from tip_fed.core.gradients import projected_grads
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import Task, batch_size, get_task
from tip_fed.errors import ConfigError

__all__ = ["SMALL_LAYER", "FidelityPlan", "plan_ranks", "projection_bytes", "score_agreement"]

#: A layer with at most this many weight + bias entries is taken at full size (exact) from the start.
SMALL_LAYER = 256
#: Largest projected-gradient chunk held at once while measuring (bytes).
CHUNK_BYTES = 64 << 20
#: Largest identity-matrix memory the exact reference may build on the buyer (bytes).
EXACT_REFERENCE_BYTES = 2 << 30

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class FidelityPlan:
    """The chosen spec and how well its scores agree with exact ones on the buyer's own samples."""

    spec: ProjectionSpec
    target: float
    spearman: float  # held-out samples (1.0 when exact)
    spearman_fit: float  # samples the ranks were chosen on
    exact: bool  # every layer at full size: the projection is the identity
    samples: int
    max_dim: int
    exact_dim: int  # projected dimension of the exact spec

    @property
    def reached(self) -> bool:
        """Whether the held-out agreement reaches the target."""
        return self.spearman >= self.target

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, for manifests and the prepared query."""
        return {
            "ranks": "auto",
            "measure": "per-sample Spearman, projected vs exact (unprojected) gradient scores, held-out samples",
            "target": self.target,
            "spearman": self.spearman,
            "spearman_fit": self.spearman_fit,
            "reached": self.reached,
            "exact": self.exact,
            "samples": self.samples,
            "dim": self.spec.dim,
            "max_dim": self.max_dim,
            "exact_dim": self.exact_dim,
            "layers": [
                {
                    "name": layer.name,
                    "rank_in": layer.rank_in,
                    "rank_out": layer.rank_out,
                    "in_dim": layer.in_dim,
                    "out_features": layer.out_features,
                    "exact": layer.rank_in == layer.in_dim and layer.rank_out == layer.out_features,
                }
                for layer in self.spec.layers
            ],
        }


def projection_bytes(spec: ProjectionSpec, element_bytes: int = 4) -> int:
    """Memory of a spec's projection matrices on a seller: float64 originals plus a model-dtype copy."""
    entries = sum(layer.rank_in * layer.in_dim + layer.rank_out * layer.out_features for layer in spec.layers)
    return entries * (8 + element_bytes)


def _chunks(data: Batch, rows: int) -> Iterator[dict[str, torch.Tensor]]:
    n = batch_size(data)
    for start in range(0, n, rows):
        yield {k: v[start : start + rows] for k, v in data.items()}


def _rows(data: Batch, index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in data.items()}


def _contributions(
    model: torch.nn.Module, task: Task, spec: ProjectionSpec, samples: Batch, objective: Batch
) -> torch.Tensor:
    """``[n, layers]``: each layer's share of every sample's score ``(P ḡ) · (P g_i)`` under ``spec``."""
    rows = max(1, CHUNK_BYTES // (8 * spec.dim))
    sizes = [layer.dim for layer in spec.layers]
    total = torch.zeros(spec.dim, dtype=torch.float64)
    for chunk in _chunks(objective, rows):
        total += projected_grads(model, spec, task, chunk).double().sum(0).cpu()
    mean = total / batch_size(objective)
    parts = []
    for chunk in _chunks(samples, rows):
        grads = projected_grads(model, spec, task, chunk).double().cpu()
        parts.append(torch.stack([block.sum(1) for block in (grads * mean).split(sizes, dim=1)], dim=1))
    return torch.cat(parts)


def score_agreement(projected: torch.Tensor | np.ndarray, exact: torch.Tensor | np.ndarray) -> float:
    """Spearman correlation of projected with exact per-sample scores (0 when undefined)."""
    rho = stats.spearmanr(np.asarray(projected, dtype=np.float64), np.asarray(exact, dtype=np.float64)).statistic
    return float(rho) if math.isfinite(rho) else 0.0


def _lower_bound(rho: float, n: int) -> float:
    """One-sided 95 % lower confidence bound of a Spearman correlation over ``n`` samples (Fisher z,
    Fieller's variance 1.06 / (n - 3)): ranks are raised until even this reaches the target, so the
    agreement on samples the choice never saw reaches it too."""
    if n <= 3 or rho >= 1.0:
        return rho
    return float(math.tanh(math.atanh(rho) - 1.645 * math.sqrt(1.06 / (n - 3))))


def _full_rank(layer_in: int, layer_out: int) -> int:
    return max(layer_in, layer_out)


def plan_ranks(
    model: torch.nn.Module,
    task: Task | str,
    samples: Batch,
    objective: Batch,
    *,
    seed: int,
    kind: str = "rademacher",
    include: Sequence[str] | None = None,
    target: float = 0.95,
    max_dim: int = 16384,
    max_projection_bytes: int = 512 << 20,
    max_samples: int = 512,
) -> FidelityPlan:
    """Per-layer ranks whose scores agree with exact ones to ``target`` (per-sample Spearman).

    ``samples``: the buyer's own training samples (scored against the mean gradient of
    ``objective``); at most ``max_samples`` of them, drawn with ``seed``, are measured, half to
    choose ranks and half to report. The spec's projected dimension stays at most ``max_dim`` and
    its projection matrices within ``max_projection_bytes`` on a seller; when the target cannot be
    reached within that, the plan says so (``reached`` false) with the best ranks found.
    """
    task = get_task(task)
    if not 0 < target <= 1:
        raise ConfigError(f"projection.fidelity-target must be in (0, 1], got {target!r}.")
    if max_dim < 1:
        raise ConfigError(f"projection.max-dim must be >= 1, got {max_dim!r}.")
    base = ProjectionSpec.for_model(model, rank=1, seed=seed, kind=kind, include=include)
    full = base.at_rank(max(_full_rank(layer.in_dim, layer.out_features) for layer in base.layers))

    def fits(spec: ProjectionSpec) -> bool:
        return spec.dim <= max_dim and projection_bytes(spec) <= max_projection_bytes

    if fits(full):
        return FidelityPlan(full, target, 1.0, 1.0, True, 0, max_dim, full.dim)
    ranks = {
        layer.name: _full_rank(layer.in_dim, layer.out_features) if layer.in_dim * layer.out_features <= SMALL_LAYER
        else 1
        for layer in full.layers
    }
    if not fits(full.with_ranks({k: (r, r) for k, r in ranks.items()})):
        raise ConfigError(
            f"projection.max-dim = {max_dim} is below the smallest spec over these layers (rank 1 each, small "
            "layers exact); raise projection.max-dim or narrow projection.include."
        )
    if projection_bytes(full, 8) > EXACT_REFERENCE_BYTES:
        raise ConfigError(
            f"the exact reference of the fidelity planner would build {projection_bytes(full, 8) >> 20} MiB of "
            "identity matrices (a very wide layer); set projection.rank to an integer or leave that layer out "
            "with projection.include."
        )
    n = batch_size(samples)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed % 2**63))[:max_samples]
    picked = _rows(samples, order)
    fit = torch.arange(len(order)) % 2 == 0
    check = ~fit if len(order) >= 8 else fit  # too few samples to hold any out: report on all of them
    names = [layer.name for layer in full.layers]
    exact_parts = _contributions(model, task, full, picked, objective)
    exact = exact_parts.sum(1)
    cache: dict[tuple[str, int], torch.Tensor] = {}
    sides = {layer.name: (layer.in_dim, layer.out_features) for layer in full.layers}

    def column(name: str, rank: int) -> torch.Tensor:
        if rank >= _full_rank(*sides[name]):
            return exact_parts[:, names.index(name)]
        if (name, rank) not in cache:  # one pass for every layer that needs this rank next
            group = [k for k, r in ranks.items() if 2 * r == rank and r < _full_rank(*sides[k])] or [name]
            if name not in group:
                group.append(name)
            spec = ProjectionSpec(tuple(full.layer(k) for k in group), full.seed, full.kind).at_rank(rank)
            for k, col in zip(group, _contributions(model, task, spec, picked, objective).T, strict=True):
                cache[(k, rank)] = col
        return cache[(name, rank)]

    def layer_dim(name: str, rank: int) -> int:
        return min(rank, sides[name][0]) * min(rank, sides[name][1])

    score = sum((column(k, r) for k, r in ranks.items()), torch.zeros(len(order), dtype=torch.float64))
    while _lower_bound(current := score_agreement(score[fit], exact[fit]), int(fit.sum())) < target:
        error = float(((score - exact)[fit] ** 2).sum())
        best: tuple[tuple[float, float], str, torch.Tensor] | None = None
        for name, rank in ranks.items():
            if rank >= _full_rank(*sides[name]):
                continue
            added = layer_dim(name, 2 * rank) - layer_dim(name, rank)
            if not fits(full.with_ranks({**{k: (r, r) for k, r in ranks.items()}, name: (2 * rank, 2 * rank)})):
                continue
            trial = score - column(name, rank) + column(name, 2 * rank)
            gain = (score_agreement(trial[fit], exact[fit]) - current) / added
            lowered = (error - float(((trial - exact)[fit] ** 2).sum())) / added
            key = (max(gain, 0.0), lowered)
            if best is None or key > best[0]:
                best = (key, name, trial)
        if best is None:
            break  # every further doubling leaves the budget
        _, name, score = best
        ranks[name] *= 2
    spec = full.with_ranks({k: (r, r) for k, r in ranks.items()})
    held_out = score_agreement(score[check], exact[check])
    exact_spec = all(layer_dim(k, r) == sides[k][0] * sides[k][1] for k, r in ranks.items())
    return FidelityPlan(spec, target, 1.0 if exact_spec else held_out, current, exact_spec, len(order), max_dim,
                        full.dim)
