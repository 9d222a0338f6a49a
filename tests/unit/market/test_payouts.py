"""Payout rules against hand computations, budget balance, harmful-paid-zero, and Shapley axioms."""

import itertools
import math

import numpy as np
import pytest

from tip_fed.config import PayoutsConfig
from tip_fed.market import payouts as P


def _inputs(scores, records=None, utility=None, benefits=None):
    ids = list(scores)
    return P.PayoutInputs(ids, dict(scores), records or dict.fromkeys(ids, 1), utility=utility, benefits=benefits)


def test_flat_pays_per_record():
    paid = P.FlatPerRecord().pay(_inputs({"a": -5.0, "b": 9.0}, {"a": 10, "b": 30}), 100.0)
    assert paid == pytest.approx({"a": 25.0, "b": 75.0})


def test_proportional_pays_positive_part_and_harmful_zero():
    paid = P.ProportionalPositive().pay(_inputs({"a": 3.0, "b": 1.0, "c": -2.0}), 100.0)
    assert paid == pytest.approx({"a": 75.0, "b": 25.0, "c": 0.0})


def test_softmax_matches_hand_computation():
    scores = {"a": 2.0, "b": 1.0, "c": -1.0}
    sd = np.std(list(scores.values()))
    ea, eb = math.exp(2.0 / (sd * 0.5)), math.exp(1.0 / (sd * 0.5))
    paid = P.Softmax(temperature=0.5).pay(_inputs(scores), 10.0)
    assert paid == pytest.approx({"a": 10 * ea / (ea + eb), "b": 10 * eb / (ea + eb), "c": 0.0})


def test_budget_balanced_reserve_hand_computation_and_balance():
    rule = P.BudgetBalancedReserve(reserve=0.3, reserve_quantile=0.0)
    paid = rule.pay(_inputs({"a": 4.0, "b": 2.0, "c": -1.0}), 100.0)
    # reserve price 0.3 x 100/3 = 10; floor = 2 (lowest positive score); both accepted; surplus 80 by (4-2, 2-2)
    assert paid == pytest.approx({"a": 90.0, "b": 10.0, "c": 0.0})
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = {f"s{i}": float(x) for i, x in enumerate(rng.normal(size=12))}
        paid = P.BudgetBalancedReserve().pay(_inputs(scores), 250.0)
        assert sum(paid.values()) == pytest.approx(250.0)
        assert all(paid[s] == 0.0 for s, v in scores.items() if v <= 0)


def test_reserve_caps_the_number_of_accepted_sellers():
    scores = {f"s{i}": float(10 - i) for i in range(10)}
    paid = P.BudgetBalancedReserve(reserve=3.0, reserve_quantile=0.0).pay(_inputs(scores), 100.0)  # price 30
    assert sum(v > 0 for v in paid.values()) == 3 and sum(paid.values()) == pytest.approx(100.0)


def _game(coalition):
    """Non-additive: a and b are complements (worth 10 together), c adds 2, d harms (-1)."""
    v = 10.0 if {"a", "b"} <= coalition else 0.0
    return v + 2.0 * ("c" in coalition) - 1.0 * ("d" in coalition)


def _brute_shapley(ids, u):
    phi = dict.fromkeys(ids, 0.0)
    orders = list(itertools.permutations(ids))
    for order in orders:
        seen = frozenset()
        for s in order:
            phi[s] += (u(seen | {s}) - u(seen)) / len(orders)
            seen = seen | {s}
    return phi


def test_shapley_exact_matches_brute_force_and_axioms():
    ids = ["a", "b", "c", "d"]
    inputs = _inputs(dict.fromkeys(ids, 1.0), utility=_game)
    phi = P.shapley_values(inputs)
    assert phi == pytest.approx(_brute_shapley(ids, _game))
    assert phi == pytest.approx({"a": 5.0, "b": 5.0, "c": 2.0, "d": -1.0})
    assert sum(phi.values()) == pytest.approx(_game(frozenset(ids)))  # efficiency
    assert phi["a"] == pytest.approx(phi["b"])  # symmetry


def test_shapley_monte_carlo_is_efficient_and_close():
    ids = ["a", "b", "c", "d"]
    phi = P.shapley_values(_inputs(dict.fromkeys(ids, 1.0), utility=_game), exact_max=0, permutations=400)
    assert sum(phi.values()) == pytest.approx(11.0)
    assert phi == pytest.approx({"a": 5.0, "b": 5.0, "c": 2.0, "d": -1.0}, abs=0.6)


def test_leave_one_out_and_ground_truth_rules_pay_zero_to_harmful():
    inputs = _inputs(dict.fromkeys("abcd", 1.0), utility=_game)
    assert P.leave_one_out(inputs) == pytest.approx({"a": 10.0, "b": 10.0, "c": 2.0, "d": -1.0})
    assert P.LeaveOneOut().pay(inputs, 22.0) == pytest.approx({"a": 10.0, "b": 10.0, "c": 2.0, "d": 0.0})
    assert P.Shapley().pay(inputs, 12.0) == pytest.approx({"a": 5.0, "b": 5.0, "c": 2.0, "d": 0.0})


def test_settle_writes_every_rule_and_compares_with_shapley():
    inputs = _inputs(
        {"a": 5.0, "b": 5.0, "c": 2.0, "d": -1.0}, utility=_game, benefits={"a": 1, "b": 1, "c": 1, "d": -1}
    )
    rows, comp, ref = P.apply_payout_rules(PayoutsConfig(), inputs)
    assert ref == "shapley"
    assert {r["rule"] for r in rows} == {
        "flat",
        "proportional",
        "softmax",
        "budget_balanced",
        "benefit",
        "loo",
        "shapley",
    }
    for rule in {r["rule"] for r in rows}:
        assert sum(r["share"] for r in rows if r["rule"] == rule) == pytest.approx(1.0)
    assert comp["shapley"]["l1_vs_reference"] == 0 and comp["shapley"]["spearman_vs_reference"] == pytest.approx(1.0)
    assert comp["proportional"]["l1_vs_reference"] == pytest.approx(0.0, abs=1e-12)  # scores equal the Shapley values
    _, _, ref = P.apply_payout_rules(PayoutsConfig(), _inputs({"a": 1.0, "b": 2.0}))
    assert ref is None


def test_rules_needing_ground_truth_say_so():
    with pytest.raises(P.DataError, match="simulation"):
        P.LeaveOneOut().pay(_inputs({"a": 1.0}), 1.0)


# ---- noise-aware payouts: empirical-Bayes shrinkage of declared-noise scores ----------------------
def _noisy(scores, std, records=None):
    ids = list(scores)
    return P.PayoutInputs(ids, dict(scores), records or dict.fromkeys(ids, 1), noise_std=dict(std))


def test_exact_scores_are_paid_unchanged():
    inputs = _inputs({"a": 3.0, "b": -1.0, "c": 0.5})
    assert inputs.payable() == inputs.scores and P.shrinkage(inputs) == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_prior_variance_solves_the_median_equation_against_scipy():
    """tau^2 from an independent root finder on the same equation: the lower median of
    m_i^2 / (tau^2 + s_i^2) equals the median of chi-square(1)."""
    from scipy import optimize, stats

    rng = np.random.default_rng(0)
    s = rng.uniform(0.2, 2.0, 9)
    m = rng.normal(0, np.sqrt(4.0 + s**2))
    target = stats.chi2(1).median()

    def gap(t2):
        return float(np.sort(m**2 / (t2 + s**2))[4]) - target

    assert gap(0.0) > 0  # a spread of true scores is there to find

    expected = optimize.brentq(gap, 0.0, 1e3, xtol=1e-14)
    assert P.prior_variance(m**2, s**2) == pytest.approx(expected, rel=1e-9)
    assert P.prior_variance(np.full(9, 0.01), s**2) == 0.0  # scores well inside their noise: nothing to pay for
    b = P.shrinkage(_noisy(dict(zip("abcdefghi", m, strict=True)), dict(zip("abcdefghi", s, strict=True))))
    assert [b[k] for k in "abcdefghi"] == pytest.approx(expected / (expected + s**2), rel=1e-9)


def test_shrinkage_lowers_the_error_of_noisy_scores():
    """Posterior means under the fitted prior are closer to the true scores than the noisy scores are
    (the James-Stein effect), over 200 sellers with mixed noise."""
    rng = np.random.default_rng(0)
    theta = rng.normal(0, 1.0, 200)
    s = rng.choice([0.0, 0.5, 3.0], 200)
    observed = theta + rng.normal(0, 1, 200) * s
    ids = [f"s{i}" for i in range(200)]
    inputs = _noisy(dict(zip(ids, observed, strict=True)), dict(zip(ids, s, strict=True)))
    paid = np.asarray([inputs.payable()[k] for k in ids])
    assert np.mean((paid - theta) ** 2) < 0.5 * np.mean((observed - theta) ** 2)
    exact = s == 0
    assert np.array_equal(paid[exact], observed[exact])


def test_one_liar_cannot_buy_payout_with_declared_noise():
    """Whatever noise a liar declares, a total at the edge of the buyer's range check (8 declared stds)
    is paid at most n (4 tau) beyond the honest bound, and the honest sellers' prior is not moved."""
    honest = {f"h{i}": float(x) for i, x in enumerate(np.random.default_rng(1).normal(0.5, 1.0, 7))}
    tau_honest = math.sqrt(P.prior_variance(np.asarray(list(honest.values())) ** 2, np.zeros(7)))
    for declared in (0.1, 1.0, 10.0, 1e3, 1e6):
        scores = {**honest, "liar": 8 * declared}
        inputs = _noisy(scores, {"liar": declared})
        payable = inputs.payable()["liar"]
        tau = math.sqrt(P.prior_variance(np.asarray(list(scores.values())) ** 2,
                                         np.asarray([0.0] * 7 + [declared]) ** 2))
        assert payable <= 4 * tau + 1e-12 and tau <= 1.5 * tau_honest
        assert P.ProportionalPositive().pay(inputs, 1.0)["liar"] < 0.6


def test_noise_aware_payouts_scale_with_records():
    """Noise is compared per record: the same declared total std hurts a small seller more."""
    inputs = _noisy({"small": 10.0, "big": 1000.0, "x": 20.0, "y": 500.0}, {"small": 30.0, "big": 30.0},
                    {"small": 10, "big": 1000, "x": 10, "y": 500})
    b = P.shrinkage(inputs)
    assert b["big"] > b["small"] and b["x"] == b["y"] == 1.0


def test_max_records_caps_the_count_each_seller_is_paid_on():
    """Each seller is paid on mean x min(n, m): its total and noise std scale by min(n, m) / n, so its
    mean, and its noise relative to it, are unchanged; a cap below 1 is refused."""
    from tip_fed.errors import ConfigError
    from tip_fed.protocol.buyer import SellerValuation, Valuation

    def seller(sid, n, total, std=None):
        noise = None if std is None else {"total_std": std}
        return SellerValuation(sid, n, total, None, "00", 0, {}, noise=noise)

    valuation = Valuation("s", [seller("a", 40, 8.0), seller("liar", 9940, 1988.0, std=99.4)], {}, [], {})
    inputs = P.PayoutInputs.from_valuation(valuation, max_records=100)
    assert inputs.n_records == {"a": 40, "liar": 100}
    assert inputs.scores == pytest.approx({"a": 8.0, "liar": 20.0})  # both 0.2 per record
    assert inputs.noise_std == pytest.approx({"liar": 1.0})
    assert P.FlatPerRecord().pay(inputs, 1.0) == pytest.approx({"a": 40 / 140, "liar": 100 / 140})
    assert P.PayoutInputs.from_valuation(valuation).n_records["liar"] == 9940
    with pytest.raises(ConfigError, match="max_records"):
        P.PayoutInputs.from_valuation(valuation, max_records=0)
