"""Reports a reader understands: every seller visible at any spread, every printed metric explained."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from tip_fed.market import plots
from tip_fed.market.glossary import absent_rules, explain
from tip_fed.market.results import flatten


def _bar_pixels(values):
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=120)
    bars = ax.bar(range(len(values)), values)
    ax.axhline(0)
    plots._symlog_if_wide(ax, np.asarray(values, float), "y")
    fig.canvas.draw()
    heights = [abs(np.subtract(*ax.transData.transform([(0, b.get_y() + b.get_height()), (0, b.get_y())])[:, 1]))
               for b in bars]
    plt.close(fig)
    return heights


@pytest.mark.parametrize("values", [
    [661_051, 330.9, 60.9, -299.1],                # the causal market's default run
    [1e7, 3.0, -0.5, 2e-3, 12.0, -4e4],            # nine orders of magnitude, both signs
    [5.0, 4.0, -3.0, 1.0],                          # narrow: stays linear
])
def test_every_seller_is_visible_at_any_spread(values):
    heights = _bar_pixels(values)
    assert min(heights) >= 8, f"a bar is {min(heights):.1f} px tall: {dict(zip(values, heights, strict=True))}"


def test_a_linear_axis_hides_small_sellers_which_is_why_the_signed_log_exists():
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=120)
    bars = ax.bar(range(4), [661_051, 330.9, 60.9, -299.1])
    fig.canvas.draw()
    px = abs(np.subtract(*ax.transData.transform([(0, bars[2].get_height()), (0, 0)])[:, 1]))
    plt.close(fig)
    assert px < 1  # the defect the signed-log axis fixes


def test_every_metric_a_report_prints_is_explained():
    metrics = {
        "fidelity": {"pearson": 1.0, "max_rel_error": 1e-9, "max_abs_error": 1e-4, "n_scores": 244},
        "payouts": {
            "reference": "benefit",
            "rules": {
                r: {"gini": 0.5, "l1_vs_reference": 0.1, "spearman_vs_reference": 1}
                for r in ("flat", "proportional", "softmax", "shapley")
            },
        },
        "run": {
            "expected_best": "a",
            "missing": [],
            "seconds": 1,
            "sellers": 4,
            "top_by_benefit": "a",
            "top_by_score": "a",
            "valuation_seconds": 0.3,
            "valuation_seconds_per_seller": 0.1,
        },
        "validity": {"n_sellers": 4, "pearson": 0.9, "spearman": 1.0, "top1_match": True, "top3_agreement": 1.0},
        "baselines": {"gradient_cosine": {"spearman": 0.8, "pearson": 0.7}},
        "distribution": {"gini": 0.7, "top10_share": 0.9, "fraction_negative": 0.25, "n_sellers": 4},
    }
    unexplained = [k for k in flatten(metrics) if not explain(k)]
    assert not unexplained
    assert explain("no.such.metric") == ""


def test_absent_coalition_rules_are_explained_not_dropped():
    [why, _] = absent_rules({"flat", "proportional"}, n_sellers=28, coalition_max=10)
    assert "`loo`, `shapley`" in why and "28" in why and "coalition-max" in why
    assert absent_rules({"flat", "loo", "shapley"}, 28, 10) == []
    [why, _] = absent_rules({"flat", "loo"}, 4, 10)
    assert "`shapley`" in why and "`loo`" not in why
