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
MAX_NAMED = 40  # sellers named on an axis; beyond, a rank view


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
    if axis == "x":  # one label per decade on each side: slanted and small so that they never overlap
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    return True


def sorted_values(values: Sequence[float], harmful: Sequence[bool], path: Path, *, ylabel: str, title: str,
                  labels: Sequence[str] | None = None,
                  legend: tuple[str, str] | None = None) -> None:
    """Bars of seller values sorted high to low; red = harmful. Every seller stays visible at any spread:
    the axis turns signed-log when values span more than 100x; up to 40 sellers are named bars, more are a
    rank view (one stem per seller)."""
    plt = _plt()
    order = np.argsort(-np.asarray(values, float), kind="stable")
    v = np.asarray(values, float)[order]
    colors = [RED if harmful[i] else BLUE for i in order]
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.45 * v.size + 2)) if v.size <= 40 else 9, 4.2))
    xs = np.arange(1, v.size + 1)  # rank 1 = highest value
    if v.size <= MAX_NAMED:
        ax.bar(xs, v, color=colors, width=0.8)
    else:  # a rank view: one stem per seller, too many to name
        ax.vlines(xs, 0, v, colors=colors, linewidth=0.6)
    ax.scatter(xs, v, color=colors, s=10 if v.size <= MAX_NAMED else 4, zorder=3)  # a seller worth ~0 still shows
    ax.axhline(0, color="black", linewidth=0.8)
    wide = _symlog_if_wide(ax, v, "y")
    if labels is not None and v.size <= MAX_NAMED:
        ax.set_xticks(xs, [labels[i] for i in order], rotation=40, ha="right", fontsize=8)
        ax.set_xlabel("sellers, sorted by value")
    else:
        ax.set_xlabel("rank of the seller by value (1 = highest"
                      + (f"; {v.size} sellers, too many to name)" if v.size > MAX_NAMED else ")"))
        ax.set_xlim(0.5, v.size + 0.5)
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
    for i, (name, vals) in enumerate(series.items()):  # distinct styles: identical curves stay visible
        x, y = lorenz(np.clip(np.asarray(vals, float), 0, None))
        ax.plot(x, y, label=name, linestyle=("-", "--", ":")[i % 3], linewidth=2.2 - 0.5 * i,
                marker="o" if x.size <= 41 else None, markersize=6 - 1.5 * i)
    ax.set_xlabel("share of sellers (least valuable first)")
    ax.set_ylabel("cumulative share of positive value")
    ax.set_title("Lorenz curve")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_vs_benefit(scores: Sequence[float], benefits: Sequence[float], sessions: Sequence[str], path: Path, *,
                     labels: Sequence[str] | None = None) -> None:
    """Two panels: score vs realised benefit (each session scaled by its RMS when there are several; signed-log
    where values span orders of magnitude), and within-session ranks, whose correlation is Spearman's."""
    plt = _plt()
    s, b, g = np.asarray(scores, float), np.asarray(benefits, float), np.asarray(sessions)
    multi = len(set(sessions)) > 1
    xs, ys, rx, ry = s.copy(), b.copy(), np.zeros_like(s), np.zeros_like(b)
    for rep in set(sessions):
        m = g == rep
        if multi:
            xs[m] /= float(np.sqrt(np.mean(s[m] ** 2))) or 1.0
            ys[m] /= float(np.sqrt(np.mean(b[m] ** 2))) or 1.0
        n = int(m.sum())
        rx[m] = (np.argsort(np.argsort(s[m])) + 0.5) / n  # ranks as quantiles, comparable across sessions
        ry[m] = (np.argsort(np.argsort(b[m])) + 0.5) / n
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.4))
    colors = [RED if v <= 0 else BLUE for v in b]
    ax.scatter(xs, ys, s=14, c=colors, alpha=0.75, zorder=3)
    if labels is not None and s.size <= 30:  # values cluster, so names there only for a few; ranks spread them
        for xi, yi, xr, yr, name in zip(xs, ys, rx, ry, labels, strict=True):
            if s.size <= 10:
                ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax2.annotate(name, (xr, yr), textcoords="offset points", xytext=(4, 4), fontsize=7)
    wide_x, wide_y = _symlog_if_wide(ax, xs, "x"), _symlog_if_wide(ax, ys, "y")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    unit = " ÷ session RMS" if multi else ""
    ax.set_xlabel(f"score{unit}" + (" (signed-log axis)" if wide_x else ""))
    ax.set_ylabel(f"realised benefit{unit}" + (" (signed-log)" if wide_y else ""))
    ax.set_title("Values (red: benefit ≤ 0)")
    rho = float(np.corrcoef(rx, ry)[0, 1]) if s.size > 1 and np.ptp(rx) > 0 and np.ptp(ry) > 0 else float("nan")
    if multi:  # sessions of equal size share the rank grid: a little jitter shows how many points sit on each
        jit = np.random.default_rng(0).uniform(-0.25, 0.25, size=(2, s.size)) / max(1, int((g == g[0]).sum()))
        rx, ry = rx + jit[0], ry + jit[1]
    ax2.scatter(rx, ry, s=14, c=colors, alpha=0.6 if multi else 0.75, zorder=3)
    ax2.plot([0, 1], [0, 1], color=GREY, linestyle="--", linewidth=0.8, label="same order")
    ax2.set_xlabel("rank of score within its session (0 = lowest, 1 = highest)")
    ax2.set_ylabel("rank of realised benefit within session")
    ax2.set_title(f"Ranks (correlation {rho:+.2f})" + (", jittered" if multi else ""))
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Score vs realised benefit ({s.size} sellers" + (f", {len(set(sessions))} sessions)" if multi
                                                                   else ")"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def identity_scatter(x: Sequence[float], y: Sequence[float], path: Path, *, xlabel: str, ylabel: str,
                     title: str) -> None:
    """Scatter of two measurements of the same quantity against the y = x line (e.g. fidelity)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.scatter(x, y, s=6, color=BLUE)
    lo, hi = min([*x, *y]), max([*x, *y])
    ax.plot(np.linspace(lo, hi, 200), np.linspace(lo, hi, 200), color=GREY, linewidth=0.8, linestyle="--",
            label="y = x")
    wide = _symlog_if_wide(ax, np.asarray([*x, *y], float), "x")
    if wide:
        _symlog_if_wide(ax, np.asarray([*x, *y], float), "y")
    ax.set_xlabel(xlabel + (" (signed-log axis)" if wide else ""))
    ax.set_ylabel(ylabel + (" (signed-log axis)" if wide else ""))
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def payout_shares(shares: Mapping[str, Mapping[str, float]], sellers: Sequence[str], path: Path, *, title: str) -> None:
    """Each seller's payout share under every rule: grouped bars up to :data:`MAX_BARS` sellers; beyond, each
    rule's shares sorted high to low as one curve (every seller a point, a signed-log axis for wide spreads)."""
    plt = _plt()
    rules = list(shares)
    cmap = plt.get_cmap("tab10")
    if len(sellers) > MAX_BARS:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        for j, rule in enumerate(rules):
            vals = np.sort([shares[rule].get(s, 0.0) for s in sellers])[::-1]
            ax.plot(np.arange(1, vals.size + 1), vals, label=rule, color=cmap(j), marker=".", markersize=3,
                    linewidth=1.0, linestyle=("-", "--", ":")[j % 3])
        # log beyond a tenth of the flat share 1/n, linear below it: the best-paid sellers of a peaked rule
        # (softmax) no longer flatten every other rule's curve, and sellers paid nothing stay visible at 0
        flat_tenth = 0.1 / len(sellers)
        ax.set_yscale("symlog", linthresh=flat_tenth, linscale=0.5)
        top = max((v for r in rules for v in shares[r].values()), default=1.0)
        ax.set_ylim(0, max(2.0 * top, 10 * flat_tenth))
        ax.set_xlabel(f"seller's rank under the rule (1 = best paid; {len(sellers)} sellers)")
        ax.set_ylabel(f"share of budget (log above {flat_tenth:.2g})")
        ax.set_title(f"{title}: every seller, sorted per rule")
        ax.legend(fontsize=8, ncol=min(4, len(rules)), loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    width = 0.8 / max(1, len(rules))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.8 * len(sellers) + 2)), 4.2))
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
                hi: Sequence[float | None], path: Path, *, paper: Mapping[str, float] | None = None,
                per_session: Sequence[Sequence[float]] = ()) -> None:
    """Pooled signed Spearman per method, 95% bootstrap CIs where there are any, every session's own value as a
    dot (what the pooled bar stands on, at any number of sessions), and the paper's mean |Spearman|."""
    plt = _plt()
    p = np.asarray([np.nan if v is None else v for v in pooled], float)
    err = np.asarray([[p[i] - (lo[i] if lo[i] is not None else p[i]), (hi[i] if hi[i] is not None else p[i]) - p[i]]
                      for i in range(len(names))]).T
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = np.arange(len(names))
    has_ci = any(v is not None for v in lo)
    ax.bar(xs, p, yerr=err if has_ci else None, color=BLUE, capsize=4, alpha=0.8,
           label=("pooled signed Spearman" if per_session and len(per_session[0]) > 1 else "signed Spearman")
           + (" (95% CI)" if has_ci else ""))
    if per_session and len(per_session[0]) > 1:
        for i, vals in enumerate(per_session):
            jitter = np.linspace(-0.25, 0.25, len(vals))
            ax.scatter(xs[i] + jitter, vals, s=9, color="black", alpha=0.6, zorder=4,
                       label="one session" if i == 0 else None)
    if paper:
        pv = [paper.get(n, np.nan) for n in names]
        ax.scatter(xs, pv, color=RED, marker="D", zorder=4, label="paper: mean |Spearman|")
    for x in xs[~np.isfinite(p)]:  # e.g. data size when every seller holds as many records: no correlation
        ax.text(x, 0.03, "undefined", ha="center", va="bottom", fontsize=8, color=GREY, rotation=90)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlim(-0.6, len(names) - 0.4)  # an undefined last method keeps its slot
    ax.set_xticks(xs, names, rotation=20)
    low = min([float(np.nanmin(p)), *(v for vals in per_session for v in vals if np.isfinite(v))])
    ax.set_ylim(min(-0.2, low - 0.1), 1.25)  # headroom for the legend
    ax.set_ylabel("signed Spearman with realised benefit")
    ax.set_title("Which method predicts realised benefit?")
    ax.legend(fontsize=7, loc="upper right", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
