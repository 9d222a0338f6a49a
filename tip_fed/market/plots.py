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


def _symlog_if_wide(ax, values: np.ndarray, axis: str) -> bool:  # type: ignore[no-untyped-def]
    """A signed-log axis when values span orders of magnitude, so small and negative ones stay visible.

    Linear within the smallest non-zero magnitude, logarithmic beyond it, in both directions.
    """
    mags = np.abs(values[np.isfinite(values)])
    mags = mags[mags > 0]
    if mags.size < 2 or mags.max() / np.median(mags) <= 100:
        return False
    linthresh = float(10 ** np.floor(np.log10(mags.min())))
    (ax.set_yscale if axis == "y" else ax.set_xscale)("symlog", linthresh=linthresh, linscale=0.5)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    (ax.set_ylim if axis == "y" else ax.set_xlim)(lo * 4 if lo < 0 else -linthresh, hi * 4 if hi > 0 else linthresh)
    return True


def sorted_values(values: Sequence[float], harmful: Sequence[bool], path: Path, *, ylabel: str, title: str,
                  labels: Sequence[str] | None = None,
                  legend: tuple[str, str] | None = None) -> None:
    """Bars of seller values sorted high to low; red = harmful. Every seller stays visible at any spread:
    the axis turns signed-log when values span more than 100x, and sellers are named up to 40 of them."""
    plt = _plt()
    order = np.argsort(-np.asarray(values, float), kind="stable")
    v = np.asarray(values, float)[order]
    colors = [RED if harmful[i] else BLUE for i in order]
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.45 * v.size + 2)) if v.size <= 40 else 8, 3.8))
    ax.bar(range(v.size), v, color=colors, width=1.0 if v.size > 60 else 0.8)
    ax.scatter(range(v.size), v, color=colors, s=10, zorder=3)  # a seller worth ~0 still shows as a dot
    ax.axhline(0, color="black", linewidth=0.8)
    wide = _symlog_if_wide(ax, v, "y")
    if labels is not None and v.size <= 40:
        ax.set_xticks(range(v.size), [labels[i] for i in order], rotation=40, ha="right", fontsize=8)
        ax.set_xlabel("sellers, sorted by value")
    else:
        ax.set_xlabel(f"{v.size} sellers, sorted by value")
    ax.set_ylabel(ylabel + (" (signed-log axis)" if wide else ""))
    ax.set_title(title)
    from matplotlib.patches import Patch

    legend = legend or ("helpful (realised benefit > 0)", "harmful (realised benefit <= 0)")
    ax.legend(handles=[Patch(color=BLUE, label=legend[0]), Patch(color=RED, label=legend[1])], fontsize=8,
              loc="best")
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


def scatter_fit(x: Sequence[float], y: Sequence[float], path: Path, *, xlabel: str, ylabel: str, title: str,
                labels: Sequence[str] | None = None) -> None:
    """Scatter with a least-squares line and the signed Pearson r; a signed-log x axis (and no line,
    which would be meaningless there) when x spans orders of magnitude; points named up to 30."""
    plt = _plt()
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.scatter(xa, ya, s=14, color=BLUE, alpha=0.7, zorder=3)
    if labels is not None and xa.size <= 30:
        for xi, yi, name in zip(xa, ya, labels, strict=True):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    wide = _symlog_if_wide(ax, xa, "x")
    if xa.size >= 2 and np.ptp(xa) > 0 and not wide:
        slope, intercept = np.polyfit(xa, ya, 1)
        xs = np.linspace(xa.min(), xa.max(), 50)
        r = float(np.corrcoef(xa, ya)[0, 1]) if np.ptp(ya) > 0 else float("nan")
        ax.plot(xs, slope * xs + intercept, color=RED, linestyle="--", label=f"least-squares fit (r = {r:+.2f})")
        ax.legend(fontsize=8, loc="upper left")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(xlabel + (" (signed-log axis)" if wide else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def identity_scatter(x: Sequence[float], y: Sequence[float], path: Path, *, xlabel: str, ylabel: str,
                     title: str) -> None:
    """Scatter of two measurements of the same quantity against the y = x line (e.g. fidelity)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(x, y, s=6, color=BLUE)
    lo, hi = min([*x, *y]), max([*x, *y])
    ax.plot([lo, hi], [lo, hi], color=GREY, linewidth=0.8, linestyle="--", label="y = x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
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
