"""Payout rules: how a buyer's budget is split among sellers, all behind one interface.

Every rule maps a :class:`PayoutInputs` (seller ids, TIP scores, record counts, and in simulation
a coalition utility from ground truth) and a budget to a payout per seller. Rules that use
scores pay harmful (negative-score) sellers nothing. ``loo`` and ``shapley`` need the utility of
seller *coalitions*, which only a simulation can measure, so they are the ground-truth reference
the score-based rules are compared against.

Noise-aware: a seller that applied differential-privacy noise declares its std, and a score that is
mostly noise must not earn like an exact one (nor may a seller declare a small epsilon to make a
large forged total pass the buyer's range check and be paid for it). Score-based rules therefore
pay the *posterior mean* of each seller's total under a normal-normal empirical-Bayes model
(James-Stein / Efron-Morris shrinkage toward 0, "no value"): per-record mean scores
``m_i = θ_i + e_i`` with known noise ``e_i ~ N(0, s_i²)`` (``s_i`` = declared total std / n_i) and
prior ``θ_i ~ N(0, τ²)``; the payable total is ``B_i · total_i`` with ``B_i = τ² / (τ² + s_i²)``.
``τ²`` is estimated from the session's sellers by a median Paule-Mandel equation (the lower median of
``m_i² / (τ² + s_i²)`` equals the median of χ²₁), so one seller cannot inflate it. The buyer's range
check admits a per-record mean of at most ``b + 8 s_i`` (``b`` the score bound), so a forged total is
paid as at most ``n_i (b + 4τ)`` (``s τ² / (τ² + s²) ≤ τ / 2``), whatever noise it declares, where
the raw total grows with the declared noise. Exact scores (``s_i = 0``) are paid unchanged. When no
noisy score stands out of its noise (``τ² = 0``) the noisy sellers are paid nothing by these rules:
their scores say nothing the buyer could pay for (``flat`` still pays per record).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tip_fed.config import PayoutsConfig
from tip_fed.errors import ConfigError, DataError
from tip_fed.market.metrics import spearman
from tip_fed.market.stats import gini

if TYPE_CHECKING:
    from tip_fed.protocol.buyer import Valuation

Utility = Callable[[frozenset[str]], float]
#: Median of the chi-square distribution with one degree of freedom (scipy.stats.chi2(1).median()).
_CHI2_1_MEDIAN = 0.4549364231195724


@dataclass
class PayoutInputs:
    """What rules may use; ``utility`` (coalition -> realised benefit) exists only in simulation."""

    seller_ids: list[str]
    scores: dict[str, float]
    n_records: dict[str, int]  # as each seller declared it (capped by from_valuation's max_records): never proved
    utility: Utility | None = None
    benefits: dict[str, float] | None = None
    #: std of each seller's total from its declared DP noise (score units); absent or 0 = exact
    noise_std: dict[str, float] = field(default_factory=dict)
    _cache: dict[frozenset[str], float] = field(default_factory=dict, repr=False)

    @classmethod
    def from_valuation(cls, valuation: Valuation, utility: Utility | None = None,
                       benefits: dict[str, float] | None = None, *, max_records: int | None = None
                       ) -> PayoutInputs:
        """The inputs of one settled session: each seller's total, record count and declared noise.

        ``max_records`` caps the count any seller is paid on (its total and noise std scaled to
        ``mean x min(n, max_records)``): a declared count is not proved by a spot check, so a buyer
        that expects about m records per seller need not pay for more (the Offer's ``max_samples``
        only bounds what a seller may declare)."""
        if max_records is not None and max_records < 1:
            raise ConfigError(f"max_records must be at least 1 (or None for no cap), got {max_records}")
        sellers = valuation.sellers
        paid = {v.seller_id: v.n_samples if max_records is None else min(v.n_samples, max_records) for v in sellers}
        part = {v.seller_id: paid[v.seller_id] / max(1, v.n_samples) for v in sellers}
        return cls(seller_ids=[v.seller_id for v in sellers],
                   scores={v.seller_id: v.total * part[v.seller_id] for v in sellers},
                   n_records=paid, utility=utility, benefits=benefits,
                   noise_std={v.seller_id: float(v.noise.get("total_std", 0.0)) * part[v.seller_id]
                              for v in sellers if v.noise})

    def payable(self) -> dict[str, float]:
        """Scores as the score-based rules pay them: noised ones shrunk toward 0 (module docstring)."""
        factors = shrinkage(self)
        return {s: factors[s] * self.scores[s] for s in self.seller_ids}

    def value(self, coalition: frozenset[str]) -> float:
        """Utility of a coalition, memoised because ground-truth utilities cost a fine-tune each."""
        if self.utility is None:
            raise DataError("this payout rule needs a coalition utility (ground truth), available only in simulation")
        if coalition not in self._cache:
            self._cache[coalition] = 0.0 if not coalition else float(self.utility(coalition))
        return self._cache[coalition]


def shrinkage(inputs: PayoutInputs) -> dict[str, float]:
    """Empirical-Bayes factor ``B_i = τ² / (τ² + s_i²)`` per seller (1 for an exact score)."""
    ids = inputs.seller_ids
    std = {s: float(inputs.noise_std.get(s, 0.0)) for s in ids}
    if not any(v > 0 for v in std.values()):
        return dict.fromkeys(ids, 1.0)
    for s in ids:
        if not (math.isfinite(std[s]) and std[s] >= 0 and math.isfinite(inputs.scores[s])):
            raise DataError(f"seller {s}'s score {inputs.scores[s]!r} or noise std {std[s]!r} is not a finite number")
    n = np.asarray([max(1, inputs.n_records[s]) for s in ids], float)
    m2 = (np.asarray([inputs.scores[s] for s in ids]) / n) ** 2
    s2 = (np.asarray([std[s] for s in ids]) / n) ** 2
    tau2 = prior_variance(m2, s2)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(s2 == 0, 1.0, tau2 / (tau2 + s2))
    return {s: float(x) for s, x in zip(ids, b, strict=True)}


def prior_variance(m2: np.ndarray, s2: np.ndarray) -> float:
    """``τ²`` solving ``lower-median(m_i² / (τ² + s_i²)) = median(χ²₁)`` (0 when even τ² = 0 gives
    less): a median Paule-Mandel estimate of the spread of true per-record scores. The lower median
    keeps one outlying seller (a forged total, however noisy it claims to be) from moving it."""

    def median_ratio(t2: float) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(t2 + s2 > 0, m2 / (t2 + s2), np.where(m2 > 0, np.inf, 0.0))
        return float(np.quantile(z, 0.5, method="lower"))

    if median_ratio(0.0) <= _CHI2_1_MEDIAN:
        return 0.0
    lo, hi = 0.0, float(max(m2.max(), s2.max(), 1e-300))
    while median_ratio(hi) > _CHI2_1_MEDIAN:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if median_ratio(mid) > _CHI2_1_MEDIAN else (lo, mid)
        if hi - lo <= 1e-12 * hi:
            break
    return hi


class PayoutRule(Protocol):
    """A named way to split ``budget`` among sellers."""

    @property
    def name(self) -> str:
        """The rule's name in results files."""
        ...

    def pay(self, inputs: PayoutInputs, budget: float) -> dict[str, float]:
        """Payout per seller id; the sum never exceeds ``budget``."""
        ...


def _proportional(weights: Mapping[str, float], budget: float) -> dict[str, float]:
    """Split ``budget`` in proportion to the non-negative weights (nothing paid if all are zero)."""
    pos = {k: max(0.0, float(w)) for k, w in weights.items()}
    total = sum(pos.values())
    return {k: (budget * w / total if total > 0 else 0.0) for k, w in pos.items()}


@dataclass(frozen=True)
class FlatPerRecord:
    """Same price for every record, whatever its value: the status quo the paper calls inefficient."""

    name: str = "flat"

    def pay(self, inputs: PayoutInputs, budget: float) -> dict[str, float]:
        return _proportional({s: inputs.n_records[s] for s in inputs.seller_ids}, budget)


@dataclass(frozen=True)
class ProportionalPositive:
    """Budget in proportion to the positive part of the score; harmful data is paid zero."""

    name: str = "proportional"

    def pay(self, inputs: PayoutInputs, budget: float) -> dict[str, float]:
        return _proportional(inputs.payable(), budget)


@dataclass(frozen=True)
class Softmax:
    """Softmax of scores (scaled by their spread) at a temperature; harmful sellers are paid zero.

    Scores are divided by their standard deviation first so the temperature means the same thing
    whatever the scale of the influence scores.
    """

    temperature: float = 1.0
    name: str = "softmax"

    def pay(self, inputs: PayoutInputs, budget: float) -> dict[str, float]:
        if self.temperature <= 0:
            raise ConfigError("payouts.temperature must be > 0")
        scores = inputs.payable()
        ids = [s for s in inputs.seller_ids if scores[s] > 0]
        if not ids:
            return {s: 0.0 for s in inputs.seller_ids}
        x = np.asarray([scores[s] for s in ids], float)
        spread = float(np.std([scores[s] for s in inputs.seller_ids])) or 1.0
        e = np.exp((x - x.max()) / (spread * self.temperature))
        paid = dict(zip(ids, budget * e / e.sum(), strict=True))
        return {s: float(paid.get(s, 0.0)) for s in inputs.seller_ids}


@dataclass(frozen=True)
class BudgetBalancedReserve:
    """Pay exactly the budget to sellers valued at or above a reserve price.

    Sellers valued at or above the reserve value (the ``reserve_quantile`` of positive scores) are
    accepted, highest value first while the budget covers their reserve prices; each gets the
    reserve price (``reserve`` x an equal split of the budget) and the rest of the budget is split
    in proportion to value above the reserve value.
    """

    reserve: float = 0.5
    reserve_quantile: float = 0.25
    name: str = "budget_balanced"

    def pay(self, inputs: PayoutInputs, budget: float) -> dict[str, float]:
        if self.reserve < 0 or not 0 <= self.reserve_quantile <= 1:
            raise ConfigError("payouts.reserve must be >= 0 and the reserve quantile within [0, 1]")
        scores = inputs.payable()
        pos = [scores[s] for s in inputs.seller_ids if scores[s] > 0]
        out = {s: 0.0 for s in inputs.seller_ids}
        if not pos:
            return out
        floor = float(np.quantile(pos, self.reserve_quantile))
        ranked = sorted((s for s in inputs.seller_ids if scores[s] >= floor and scores[s] > 0),
                        key=lambda s: -scores[s])
        price = self.reserve * budget / len(inputs.seller_ids)
        accepted = ranked[: int(budget // price) if price > 0 else len(ranked)]
        surplus = budget - price * len(accepted)
        extra = _proportional({s: scores[s] - floor for s in accepted}, surplus)
        if sum(extra.values()) == 0 and accepted:  # all at the floor: split the surplus evenly
            extra = {s: surplus / len(accepted) for s in accepted}
        for s in accepted:
            out[s] = price + extra[s]
        return out


def leave_one_out(inputs: PayoutInputs) -> dict[str, float]:
    """Marginal utility of each seller against all the others: U(N) - U(N minus i)."""
    everyone = frozenset(inputs.seller_ids)
    return {s: inputs.value(everyone) - inputs.value(everyone - {s}) for s in inputs.seller_ids}


def shapley_values(
    inputs: PayoutInputs, *, exact_max: int = 10, permutations: int = 200, seed: int = 0
) -> dict[str, float]:
    """Seller-level Shapley values of the coalition utility.

    Exact (all 2^n coalitions) up to ``exact_max`` sellers; beyond that, the Monte Carlo
    permutation estimate (unbiased; efficiency holds exactly for every sampled permutation).
    """
    ids = list(inputs.seller_ids)
    n = len(ids)
    phi = dict.fromkeys(ids, 0.0)
    if n <= exact_max:
        fact = math.factorial
        for s in ids:
            rest = [t for t in ids if t != s]
            for k in range(n):
                weight = fact(k) * fact(n - k - 1) / fact(n)
                for combo in itertools.combinations(rest, k):
                    c = frozenset(combo)
                    phi[s] += weight * (inputs.value(c | {s}) - inputs.value(c))
        return phi
    rng = np.random.default_rng(seed)
    for _ in range(permutations):
        order = [ids[i] for i in rng.permutation(n)]
        prev, coalition = 0.0, frozenset[str]()
        for s in order:
            coalition = coalition | {s}
            cur = inputs.value(coalition)
            phi[s] += (cur - prev) / permutations
            prev = cur
    return phi


@dataclass(frozen=True)
class LeaveOneOut:
    """Budget in proportion to positive leave-one-seller-out marginal utility (ground truth)."""

    name: str = "loo"

    def pay(self, inputs: PayoutInputs, budget: float) -> dict[str, float]:
        return _proportional(leave_one_out(inputs), budget)


@dataclass(frozen=True)
class Shapley:
    """Budget in proportion to positive Shapley values of the realised coalition utility."""

    exact_max: int = 10
    permutations: int = 200
    seed: int = 0
    name: str = "shapley"

    def pay(self, inputs: PayoutInputs, budget: float) -> dict[str, float]:
        phi = shapley_values(inputs, exact_max=self.exact_max, permutations=self.permutations, seed=self.seed)
        return _proportional(phi, budget)


@dataclass(frozen=True)
class RealisedBenefit:
    """Budget in proportion to each seller's own positive realised benefit (ground truth, additive)."""

    name: str = "benefit"

    def pay(self, inputs: PayoutInputs, budget: float) -> dict[str, float]:
        if inputs.benefits is None:
            raise DataError("the 'benefit' payout rule needs realised benefits (ground truth), simulation only")
        return _proportional(inputs.benefits, budget)


def run_rules(rules: Sequence[PayoutRule], inputs: PayoutInputs, budget: float) -> list[dict[str, object]]:
    """Rows ``seller_id, rule, payout, share`` for every rule, as written to ``payouts.csv``."""
    rows: list[dict[str, object]] = []
    for rule in rules:
        paid = rule.pay(inputs, budget)
        total = sum(paid.values())
        for s in inputs.seller_ids:
            rows.append(
                {
                    "seller_id": s,
                    "rule": rule.name,
                    "payout": float(paid[s]),
                    "share": float(paid[s] / total) if total > 0 else 0.0,
                }
            )
    return rows


def compare_with_reference(rows: Sequence[Mapping[str, object]], reference: str) -> dict[str, dict[str, float | None]]:
    """Each rule's shares against the reference rule's: rank correlation, L1 distance, Gini."""
    shares: dict[str, dict[str, float]] = {}
    for r in rows:
        shares.setdefault(str(r["rule"]), {})[str(r["seller_id"])] = float(r["share"])  # type: ignore[arg-type]
    if reference not in shares:
        raise DataError(f"reference payout rule {reference!r} is not among {sorted(shares)}")
    ref = shares[reference]
    ids = sorted(ref)
    out: dict[str, dict[str, float | None]] = {}
    for rule, sh in shares.items():
        a, b = [sh[s] for s in ids], [ref[s] for s in ids]
        out[rule] = {
            "spearman_vs_reference": spearman(a, b),
            "l1_vs_reference": float(np.abs(np.subtract(a, b)).sum()),
            "gini": gini(a),
        }
    return out


def apply_payout_rules(
    cfg: PayoutsConfig, inputs: PayoutInputs, seed: int = 0
) -> tuple[list[dict[str, object]], dict[str, dict[str, float | None]], str | None]:
    """Run every applicable rule; compare with the ground-truth reference (shapley, else benefit).

    Returns (payouts.csv rows, comparison per rule, reference rule name or None without ground truth).
    """
    rules: list[PayoutRule] = [
        FlatPerRecord(),
        ProportionalPositive(),
        Softmax(cfg.temperature),
        BudgetBalancedReserve(cfg.reserve),
    ]
    reference = None
    if inputs.benefits is not None:
        rules.append(RealisedBenefit())
        reference = "benefit"
    if inputs.utility is not None and len(inputs.seller_ids) <= cfg.coalition_max:
        rules += [LeaveOneOut(), Shapley(cfg.shapley_exact_max, cfg.shapley_permutations, seed)]
        reference = "shapley"
    rows = run_rules(rules, inputs, cfg.budget)
    return rows, (compare_with_reference(rows, reference) if reference else {}), reference
