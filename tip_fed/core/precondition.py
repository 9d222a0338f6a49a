"""Preconditioners ``P`` (inverse damped curvature) in projected-gradient space.

The buyer fits ``P`` on its own projected training gradients; the query is ``v = P ḡ_obj``.
Kinds (math as in LogIX, which TIP builds on):

* ``identity``: ``P = I``.
* ``raw``: damped empirical Fisher ``F = GᵀG / n`` over the whole projected vector,
  ``P = (F + λI)⁻¹``; default ``λ = 0.1 · trace(F) / dim``. Costs ``dim²`` memory.
* ``kfac``: per layer ``F_l ≈ S ⊗ A`` (row-major vec of ``G``: ``np.kron(S, A)``; factors from
  :class:`tip_fed.core.gradients.KfacStats`); with
  ``A = Q_A diag(λ_A) Q_Aᵀ`` and ``S = Q_S diag(λ_S) Q_Sᵀ``,
  ``P G = Q_S [(Q_Sᵀ G Q_A) ⊘ (λ_S λ_Aᵀ + λ)] Q_Aᵀ`` for a layer block ``G``
  (``[rank_out, rank_in]``); default ``λ = 0.1 · mean(λ_S λ_Aᵀ)`` per layer.
* ``ekfac``: the KFAC eigenbasis with eigenvalues refitted to the per-sample gradients,
  ``Λ*_jk = mean_i (Q_Sᵀ G_i Q_A)_jk²``; default ``λ = 0.1 · mean(Λ*)`` per layer.

Defaults are relative to the spectrum, so scaling all gradients by ``c`` scales ``λ`` by
``c²`` and leaves the scores' ranking unchanged. A given ``damping`` is absolute and used for
every layer.

**Floor.** ``λ`` is never below ``1e-6 ×`` the mean eigenvalue of the *whole* curvature (all
layers together). A per-layer default can fall under it only when one layer's curvature is
a millionth of the rest (e.g. a layer whose gradients are rounding noise): ``0.1 ×`` its own
mean would then be ~1e-17 and ``P`` would amplify that noise by ~1e16 into the query (a
query block of norm 1e7 next to blocks of norm 1e3). Such a default is lifted to the floor
(``to_dict`` reports the λ used); an explicit ``damping`` below the floor is refused with a
ConfigError that states the floor. Everything is float64; ``apply`` returns float64.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tip_fed.core.gradients import KfacStats
from tip_fed.core.projection import ProjectionSpec
from tip_fed.errors import ConfigError, DataError
from tip_fed.kinds import PRECONDITIONER_KINDS

__all__ = ["DAMPING_FLOOR", "KINDS", "Preconditioner", "fit_preconditioner", "load_preconditioner"]

KINDS = PRECONDITIONER_KINDS  # declared with the setting that chooses one (tip_fed.kinds)
_RELATIVE_DAMPING = 0.1
DAMPING_FLOOR = 1e-6  # smallest λ relative to the mean eigenvalue over all layers
_SINGULAR = 1e-12  # smallest allowed denominator relative to the largest


class Preconditioner(ABC):
    """``P``: maps a projected gradient (``[dim]`` or ``[m, dim]``) to ``P`` times it."""

    kind: str
    dim: int

    @property
    @abstractmethod
    def damping(self) -> float | dict[str, float]:
        """λ actually used: one float (identity, raw) or one per layer (kfac, ekfac)."""

    @abstractmethod
    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        """``P`` applied to the rows of a float64 ``[m, dim]`` matrix."""

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``P v`` in float64, same shape as ``v``."""
        matrix = _as_rows(v, self.dim, "the vector to precondition")
        out = self._apply(matrix)
        return (out[0] if v.dim() == 1 else out).to(v.device)

    def to_dict(self) -> dict[str, Any]:
        """Summary for reports and manifests; with :meth:`tensors`, what :func:`load_preconditioner` rebuilds from."""
        return {"kind": self.kind, "dim": self.dim, "damping": self.damping}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted float64 factors by name (none for ``identity``), for saving next to :meth:`to_dict`."""
        return {}


def _as_rows(v: Any, dim: int, what: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.shape[-1] != dim:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise DataError(f"{what} must be a tensor [{dim}] or [m, {dim}], got {shape}.")
    if not torch.isfinite(v).all():
        raise DataError(f"{what} contains NaN or infinite values.")
    return v.detach().to("cpu", torch.float64).reshape(-1, dim)


class _Identity(Preconditioner):
    kind = "identity"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    @property
    def damping(self) -> float:
        return 0.0

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        return v.clone()


class _Eigen(Preconditioner):
    """``P = U diag(1/denominator) Uᵀ`` over the whole vector (the ``raw`` kind)."""

    kind = "raw"

    def __init__(self, dim: int, basis: torch.Tensor, denominator: torch.Tensor,
                 damping: float, num_samples: int, eigenvalues: torch.Tensor) -> None:
        self.dim = dim
        self._basis = basis
        self._denominator = denominator
        self._damping = damping
        self._num_samples = num_samples
        self._eig_range = (float(eigenvalues.min()), float(eigenvalues.max()))

    @property
    def damping(self) -> float:
        return self._damping

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        return ((v @ self._basis) / self._denominator) @ self._basis.T

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "num_samples": self._num_samples,
                "eigenvalue_range": list(self._eig_range)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"basis": self._basis, "denominator": self._denominator}


@dataclass(frozen=True)
class _Block:
    name: str
    start: int
    rank_out: int
    rank_in: int
    basis_out: torch.Tensor  # Q_S [rank_out, rank_out]
    basis_in: torch.Tensor  # Q_A [rank_in, rank_in]
    denominator: torch.Tensor  # [rank_out, rank_in], eigenvalues + damping
    damping: float


class _Kronecker(Preconditioner):
    """Per-layer Kronecker-eigenbasis preconditioner (the ``kfac`` and ``ekfac`` kinds)."""

    def __init__(self, kind: str, dim: int, blocks: list[_Block], num_samples: int | None) -> None:
        self.kind = kind
        self.dim = dim
        self._blocks = blocks
        self._num_samples = num_samples

    @property
    def damping(self) -> dict[str, float]:
        return {block.name: block.damping for block in self._blocks}

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(v)
        for b in self._blocks:
            size = b.rank_out * b.rank_in
            g = v[:, b.start:b.start + size].reshape(-1, b.rank_out, b.rank_in)
            z = b.basis_out.T @ g @ b.basis_in / b.denominator
            out[:, b.start:b.start + size] = (b.basis_out @ z @ b.basis_in.T).reshape(-1, size)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "num_samples": self._num_samples,
                "layers": [block.name for block in self._blocks]}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{part}": getattr(b, part) for i, b in enumerate(self._blocks)
                for part in ("basis_out", "basis_in", "denominator")}


def _check_damping(damping: float | None) -> float | None:
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise ConfigError(f"damping must be a number >= 0 or None, got {damping!r}.")
    if not math.isfinite(damping) or damping < 0:
        raise ConfigError(
            f"damping must be finite and >= 0, got {damping}; leave it None for the default "
            "relative to the curvature spectrum."
        )
    return float(damping)


def _check_grads(grads: torch.Tensor | None, spec: ProjectionSpec, kind: str) -> torch.Tensor:
    if grads is None:
        raise DataError(f"the {kind!r} preconditioner needs train_grads [n, {spec.dim}].")
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[1] != spec.dim:
        shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
        raise DataError(f"train_grads must be [n, {spec.dim}] (the spec's dim), got {shape}.")
    if grads.shape[0] == 0:
        raise DataError("train_grads has no rows; pass the buyer's projected training gradients.")
    return _as_rows(grads, spec.dim, "train_grads")


def _symmetric_eig(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clipped at 0: curvature is PSD up to rounding) and eigenvectors."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values.clamp(min=0.0), vectors


def _floor(total: float, count: int, where: str) -> float:
    """Smallest λ allowed: DAMPING_FLOOR × mean eigenvalue over everything preconditioned."""
    mean = total / max(count, 1)
    if not mean > 0.0:
        raise DataError(f"{where}: the curvature is zero (all gradients zero?); "
                        "check the training data and the loss.")
    return DAMPING_FLOOR * mean


def _denominator(
    eigenvalues: torch.Tensor, damping: float | None, floor: float, where: str
) -> tuple[torch.Tensor, float]:
    """``eigenvalues + λ``: λ relative by default, lifted to ``floor``; explicit λ >= floor."""
    if damping is None:
        damping = max(_RELATIVE_DAMPING * float(eigenvalues.mean()), floor)
    elif damping < floor:
        raise ConfigError(
            f"{where}: damping {damping:.3g} is below the floor {floor:.3g} "
            f"({DAMPING_FLOOR:g} x the mean curvature eigenvalue {floor / DAMPING_FLOOR:.3g}); "
            "so small a damping lets P amplify rounding noise into the query. Use damping >= "
            f"{floor:.3g}, or leave it unset for {_RELATIVE_DAMPING:g} x the mean eigenvalue."
        )
    denominator = eigenvalues + damping
    if float(denominator.min()) <= _SINGULAR * float(denominator.max()):
        raise ConfigError(
            f"{where}: the damped curvature is singular (smallest eigenvalue + damping = "
            f"{float(denominator.min()):.3g}); use a larger damping or None (relative default)."
        )
    return denominator, damping


def _check_stats(
    stats: Mapping[str, KfacStats] | None, spec: ProjectionSpec, kind: str
) -> Mapping[str, KfacStats]:
    if not isinstance(stats, Mapping):
        raise DataError(
            f"the {kind!r} preconditioner needs kfac_stats, a mapping layer name -> KfacStats "
            "(from kfac_statistics)."
        )
    for layer in spec.layers:
        entry = stats.get(layer.name)
        if entry is None:
            raise DataError(f"kfac_stats has no entry for layer {layer.name!r} of the spec.")
        if (tuple(entry.activation_sum.shape) != (layer.rank_in,) * 2
                or tuple(entry.gradient_sum.shape) != (layer.rank_out,) * 2):
            raise DataError(
                f"kfac_stats for {layer.name!r} have shapes {tuple(entry.activation_sum.shape)} / "
                f"{tuple(entry.gradient_sum.shape)}; the spec needs ({layer.rank_in},)*2 / "
                f"({layer.rank_out},)*2. Recompute them with this spec."
            )
        if entry.num_tokens <= 0 or entry.num_samples <= 0:
            raise DataError(f"kfac_stats for {layer.name!r} were computed from no data.")
    return stats


def _fit_kronecker(kind: str, spec: ProjectionSpec, grads: torch.Tensor | None,
                   stats: Mapping[str, KfacStats], damping: float | None) -> _Kronecker:
    fitted = []
    for layer, start in zip(spec.layers, spec.offsets(), strict=True):
        entry = stats[layer.name]
        eig_a, basis_a = _symmetric_eig(entry.activation_cov.to(torch.float64).cpu())
        eig_s, basis_s = _symmetric_eig(entry.gradient_cov.to(torch.float64).cpu())
        if grads is None:
            eigenvalues = torch.outer(eig_s, eig_a)
        else:
            block = grads[:, start:start + layer.dim].reshape(-1, layer.rank_out, layer.rank_in)
            eigenvalues = (basis_s.T @ block @ basis_a).pow(2).mean(dim=0)
        fitted.append((layer, start, basis_s, basis_a, eigenvalues))
    floor = _floor(sum(float(f[4].sum()) for f in fitted), spec.dim, kind)
    blocks = []
    for layer, start, basis_s, basis_a, eigenvalues in fitted:
        denominator, used = _denominator(eigenvalues, damping, floor, f"{kind} layer {layer.name!r}")
        blocks.append(_Block(layer.name, start, layer.rank_out, layer.rank_in,
                             basis_s, basis_a, denominator, used))
    return _Kronecker(kind, spec.dim, blocks, None if grads is None else grads.shape[0])


def fit_preconditioner(
    kind: str,
    spec: ProjectionSpec,
    train_grads: torch.Tensor | None = None,
    kfac_stats: Mapping[str, KfacStats] | None = None,
    damping: float | None = None,
) -> Preconditioner:
    """Fit ``P`` of ``kind`` from the buyer's projected training data.

    ``raw`` needs ``train_grads`` ``[n, spec.dim]``; ``kfac`` needs ``kfac_stats``; ``ekfac``
    needs both. ``damping=None`` picks λ relative to the spectrum (module docstring).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown preconditioner {kind!r}; use one of {list(KINDS)}.")
    if not isinstance(spec, ProjectionSpec):
        raise ConfigError(f"expected a ProjectionSpec, got {type(spec).__name__}.")
    damping = _check_damping(damping)
    if kind == "identity":
        return _Identity(spec.dim)
    if kind == "raw":
        grads = _check_grads(train_grads, spec, kind)
        fisher = grads.T @ grads / grads.shape[0]
        eigenvalues, basis = _symmetric_eig(fisher)
        floor = _floor(float(eigenvalues.sum()), spec.dim, "raw")
        denominator, used = _denominator(eigenvalues, damping, floor, "raw")
        return _Eigen(spec.dim, basis, denominator, used, grads.shape[0], eigenvalues)
    stats = _check_stats(kfac_stats, spec, kind)
    ekfac_grads = _check_grads(train_grads, spec, kind) if kind == "ekfac" else None
    return _fit_kronecker(kind, spec, ekfac_grads, stats, damping)


def load_preconditioner(summary: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                        spec: ProjectionSpec) -> Preconditioner:
    """Rebuild a fitted ``P`` for ``spec`` from :meth:`Preconditioner.to_dict` and
    :meth:`Preconditioner.tensors`; DataError on anything that does not fit (shapes, dtypes,
    non-positive or non-finite denominators), since saved factors may have been edited."""
    kind, dim = summary.get("kind"), spec.dim
    if kind not in KINDS or summary.get("dim") != dim:
        raise DataError(f"preconditioner summary {{kind: {kind!r}, dim: {summary.get('dim')!r}}} does not fit "
                        f"a projection of dimension {dim}.")

    def tensor(name: str, shape: tuple[int, ...], positive: bool = False) -> torch.Tensor:
        t = tensors.get(name)
        if t is None or t.dtype != torch.float64 or tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
            raise DataError(f"preconditioner factor {name!r} must be a finite float64 tensor of shape {shape}.")
        if positive and float(t.min()) <= 0.0:
            raise DataError(f"preconditioner factor {name!r} must be > 0 (damped eigenvalues).")
        return t

    loaded = _rebuild(str(kind), summary, spec, tensor)
    if len(tensors) != len(loaded.tensors()):
        raise DataError(f"the {kind} preconditioner has {len(loaded.tensors())} factors, not {len(tensors)}.")
    return loaded


def _rebuild(kind: str, summary: Mapping[str, Any], spec: ProjectionSpec, tensor: Any) -> Preconditioner:
    dim = spec.dim
    if kind == "identity":
        return _Identity(dim)
    if kind == "raw":
        return _Eigen(dim, tensor("basis", (dim, dim)), tensor("denominator", (dim,), positive=True),
                      float(summary["damping"]), int(summary["num_samples"]),
                      torch.tensor(summary["eigenvalue_range"], dtype=torch.float64))
    damping = summary.get("damping")
    if summary.get("layers") != [layer.name for layer in spec.layers] or not isinstance(damping, Mapping):
        raise DataError("the preconditioner's layers are not the projection spec's layers.")
    blocks = [
        _Block(layer.name, start, layer.rank_out, layer.rank_in,
               tensor(f"{i}.basis_out", (layer.rank_out, layer.rank_out)),
               tensor(f"{i}.basis_in", (layer.rank_in, layer.rank_in)),
               tensor(f"{i}.denominator", (layer.rank_out, layer.rank_in), positive=True), float(damping[layer.name]))
        for i, (layer, start) in enumerate(zip(spec.layers, spec.offsets(), strict=True))
    ]
    return _Kronecker(kind, dim, blocks, summary.get("num_samples"))
