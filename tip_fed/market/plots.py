"""PNG plots for market reports: value distribution, Lorenz curve, score vs benefit, payout shares.

Each function takes plain lists and a path, so reports can be re-rendered from saved CSVs alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tip_fed.market.stats import lorenz

BLUE, RED, GREY = "#2471a3", "#c0392b", "#7f8c8d"
MAX_BARS = 14


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sorted_values(values: Sequence[float], harmful: Sequence[bool], path: Path, *, ylabel: str, title: str) -> None:
    """Bars of seller values sorted high to low; red = harmful by realised benefit (ground truth)."""
    plt = _plt()
    order = np.argsort(-np.asarray(values, float))
    v = np.asarray(values, float)[order]
    colors = [RED if harmful[i] else BLUE for i in order]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(range(v.size), v, color=colors, width=1.0 if v.size > 60 else 0.8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("sellers, sorted by value")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=BLUE, label="helpful (realised benefit > 0)"),
                       Patch(color=RED, label="harmful (realised benefit <= 0)")], fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lorenz_curves(series: Mapping[str, Sequence[float]], path: Path) -> None:
    """Lorenz curves of non-negative amounts (e.g. positive value, payouts), with the equality line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color=GREY, linestyle="--", linewidth=0.8, label="equal split")
    for name, vals in series.items():
        x, y = lorenz(np.clip(np.asarray(vals, float), 0, None))
        ax.plot(x, y, label=name)
    ax.set_xlabel("share of sellers (poorest first)")
    ax.set_ylabel("cumulative share of value")
    ax.set_title("Lorenz curve")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scatter_fit(x: Sequence[float], y: Sequence[float], path: Path, *, xlabel: str, ylabel: str, title: str) -> None:
    """Scatter with a least-squares line and the signed Pearson r in the legend."""
    plt = _plt()
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.scatter(xa, ya, s=14, color=BLUE, alpha=0.7, zorder=3)
    if xa.size >= 2 and np.ptp(xa) > 0:
        slope, intercept = np.polyfit(xa, ya, 1)
        xs = np.linspace(xa.min(), xa.max(), 50)
        r = float(np.corrcoef(xa, ya)[0, 1]) if np.ptp(ya) > 0 else float("nan")
        ax.plot(xs, slope * xs + intercept, color=RED, linestyle="--", label=f"least-squares fit (r = {r:+.2f})")
        ax.legend(fontsize=8, loc="upper left")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def payout_shares(shares: Mapping[str, Mapping[str, float]], sellers: Sequence[str], path: Path, *, title: str) -> None:
    """Grouped bars: each seller's payout share under every rule, side by side."""
    plt = _plt()
    rules = list(shares)
    if len(sellers) > MAX_BARS:  # keep it readable: the sellers any rule pays most
        total = len(sellers)
        sellers = sorted(sellers, key=lambda s: -max(shares[r].get(s, 0.0) for r in rules))[:MAX_BARS]
        title = f"{title}: the {MAX_BARS} best-paid of {total} sellers"
    width = 0.8 / max(1, len(rules))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.8 * len(sellers) + 2)), 4.2))
    cmap = plt.get_cmap("tab10")
    for j, rule in enumerate(rules):
        xs = np.arange(len(sellers)) + (j - (len(rules) - 1) / 2) * width
        ax.bar(xs, [shares[rule].get(s, 0.0) for s in sellers], width=width, label=rule, color=cmap(j))
    ax.set_xticks(range(len(sellers)), sellers, rotation=40, ha="right", fontsize=8)
    top = max((shares[r].get(s, 0.0) for r in rules for s in sellers), default=1.0)
    ax.set_ylim(0, 1.35 * top or 1.0)  # headroom so the legend never hides a bar
    ax.set_ylabel("share of budget")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, len(rules)), loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def method_bars(names: Sequence[str], pooled: Sequence[float | None], lo: Sequence[float | None],
                hi: Sequence[float | None], path: Path, *, paper: Mapping[str, float] | None = None) -> None:
    """Pooled signed Spearman per method with 95% bootstrap CIs (and the paper's mean |Spearman|)."""
    plt = _plt()
    p = np.asarray([np.nan if v is None else v for v in pooled], float)
    err = np.asarray([[p[i] - (lo[i] if lo[i] is not None else p[i]), (hi[i] if hi[i] is not None else p[i]) - p[i]]
                      for i in range(len(names))]).T
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = np.arange(len(names))
    ax.bar(xs, p, yerr=err, color=BLUE, capsize=4, label="ours: pooled signed Spearman (95% CI)")
    if paper:
        pv = [paper.get(n, np.nan) for n in names]
        ax.scatter(xs, pv, color=RED, marker="D", zorder=4, label="paper: mean |Spearman|")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(xs, names, rotation=20)
    ax.set_ylim(min(-0.2, float(np.nanmin(p)) - 0.1), 1.05)
    ax.set_ylabel("Spearman with realised benefit")
    ax.set_title("Which method predicts realised benefit?")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
