"""Payout rules: how a buyer's budget is split among sellers, all behind one interface.

Every rule maps a :class:`PayoutInputs` (seller ids, TIP scores, record counts, and in simulation
a coalition utility from ground truth) and a budget to a payout per seller. Rules that use
scores pay harmful (negative-score) sellers nothing. ``loo`` and ``shapley`` need the utility of
seller *coalitions*, which only a simulation can measure, so they are the ground-truth reference
the score-based rules are compared against.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tip_fed.config import PayoutsConfig
from tip_fed.errors import ConfigError, DataError
from tip_fed.market.metrics import spearman
from tip_fed.market.stats import gini

Utility = Callable[[frozenset[str]], float]


@dataclass
class PayoutInputs:
    """What rules may use; ``utility`` (coalition -> realised benefit) exists only in simulation."""

    seller_ids: list[str]
    scores: dict[str, float]
    n_records: dict[str, int]
    utility: Utility | None = None
    benefits: dict[str, float] | None = None
    _cache: dict[frozenset[str], float] = field(default_factory=dict, repr=False)

    def value(self, coalition: frozenset[str]) -> float:
        """Utility of a coalition, memoised because ground-truth utilities cost a fine-tune each."""
        if self.utility is None:
            raise DataError("this payout rule needs a coalition utility (ground truth), available only in simulation")
        if coalition not in self._cache:
            self._cache[coalition] = 0.0 if not coalition else float(self.utility(coalition))
        return self._cache[coalition]


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
        return _proportional({s: inputs.scores[s] for s in inputs.seller_ids}, budget)


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
        ids = [s for s in inputs.seller_ids if inputs.scores[s] > 0]
        if not ids:
            return {s: 0.0 for s in inputs.seller_ids}
        x = np.asarray([inputs.scores[s] for s in ids], float)
        spread = float(np.std([inputs.scores[s] for s in inputs.seller_ids])) or 1.0
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
        pos = [inputs.scores[s] for s in inputs.seller_ids if inputs.scores[s] > 0]
        out = {s: 0.0 for s in inputs.seller_ids}
        if not pos:
            return out
        floor = float(np.quantile(pos, self.reserve_quantile))
        ranked = sorted((s for s in inputs.seller_ids if inputs.scores[s] >= floor and inputs.scores[s] > 0),
                        key=lambda s: -inputs.scores[s])
        price = self.reserve * budget / len(inputs.seller_ids)
        accepted = ranked[: int(budget // price) if price > 0 else len(ranked)]
        surplus = budget - price * len(accepted)
        extra = _proportional({s: inputs.scores[s] - floor for s in accepted}, surplus)
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
