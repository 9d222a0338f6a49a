"""Reports a reader understands: every seller visible at any spread, absent payout rules explained.

That every printed metric is explained is tested on a rendered report in ``test_results.py``.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from tip_fed.market import plots
from tip_fed.market.glossary import absent_rules


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


def test_absent_coalition_rules_are_explained_not_dropped():
    [why, _] = absent_rules({"flat", "proportional"}, n_sellers=28, coalition_max=10)
    assert "`loo`, `shapley`" in why and "28" in why and "coalition-max" in why
    assert absent_rules({"flat", "loo", "shapley"}, 28, 10) == []
    [why, _] = absent_rules({"flat", "loo"}, 4, 10)
    assert "`shapley`" in why and "`loo`" not in why
