"""Render ``report.md`` and its PNG plots from a saved results directory.

The report reads only the files in the directory, so ``tip-fed report DIR`` re-renders any past
run and the numbers a person reads are exactly the numbers programs read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tip_fed.market.results import atomic_write, flatten, read_csv, read_json


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(x: str) -> float:
    return float(x) if x not in ("", None) else float("nan")


def plot_seller_values(rows: list[dict[str, str]], path: Path) -> None:
    """Bar chart of per-seller encrypted scores, sorted, harmful (negative) sellers in red."""
    plt = _plt()
    ordered = sorted(rows, key=lambda r: _num(r["score"]), reverse=True)
    values = [_num(r["score"]) for r in ordered]
    colors = ["#c0392b" if v < 0 else "#2471a3" for v in values]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(values) + 2), 3.6))
    ax.bar(range(len(values)), values, color=colors)
    ax.axhline(0, color="black", linewidth=0.8)
    if len(values) <= 30:
        ax.set_xticks(range(len(values)), [r["seller_id"] for r in ordered], rotation=45, ha="right")
    ax.set_ylabel("TIP score (encrypted, seller total)")
    ax.set_title("Seller value, sorted (red = predicted harmful)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_score_vs_benefit(scores: list[float], benefits: list[float], labels: list[str], path: Path) -> None:
    """Scatter of per-seller score against realised benefit, with a least-squares line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(scores, benefits, color="#2471a3", zorder=3)
    if len(scores) <= 30:
        for s, b, name in zip(scores, benefits, labels, strict=True):
            ax.annotate(name, (s, b), textcoords="offset points", xytext=(4, 4), fontsize=8)
    wide = _symlog_if_wide(ax, scores)
    if len(scores) >= 2 and np.ptp(scores) > 0 and not wide:
        slope, intercept = np.polyfit(scores, benefits, 1)
        xs = np.linspace(min(scores), max(scores), 50)
        ax.plot(xs, slope * xs + intercept, color="#7f8c8d", linestyle="--", label="least-squares fit")
        ax.legend(loc="best", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    if not wide:
        ax.set_xlabel("TIP score (encrypted)")
    ax.set_ylabel("realised benefit (loss before - after)")
    ax.set_title("Predicted vs realised value")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _symlog_if_wide(ax, values: list[float]) -> bool:  # type: ignore[no-untyped-def]
    """Use a symlog x axis when values span orders of magnitude, so small sellers stay visible.

    A straight-line fit is meaningless on that axis, so callers skip it when this returns True.
    """
    mags = np.abs(np.asarray(values, float))
    mags = mags[mags > 0]
    if mags.size >= 2 and mags.max() / np.median(mags) > 100:
        ax.set_xscale("symlog", linthresh=float(np.min(mags)))
        ax.set_xlabel("TIP score (encrypted, symlog axis)")
        return True
    return False


def plot_fidelity(encrypted: list[float], plaintext: list[float], path: Path) -> None:
    """Decrypted per-sample scores against the plaintext reference."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(plaintext, encrypted, s=6, color="#2471a3")
    lo, hi = min(plaintext + encrypted), max(plaintext + encrypted)
    ax.plot([lo, hi], [lo, hi], color="#7f8c8d", linewidth=0.8, linestyle="--")
    ax.set_xlabel("plaintext score")
    ax.set_ylabel("decrypted score")
    ax.set_title("Encrypted vs plaintext per-sample scores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if isinstance(value, str) and value.isdigit():
        return value
    return f"{f:.6g}"


def _payouts_section(rows: list[dict[str, str]], summary: dict[str, Any], out: Path) -> list[str]:
    """Payout shares per rule, side by side, and each rule against the ground-truth reference."""
    from tip_fed.market.plots import payout_shares

    shares: dict[str, dict[str, float]] = {}
    for r in rows:
        shares.setdefault(r["rule"], {})[r["seller_id"]] = _num(r["share"])
    sellers = list(dict.fromkeys(r["seller_id"] for r in rows))
    payout_shares(shares, sellers, out / "payout_shares.png", title="Payout shares per rule")
    comp = [{"rule": k, **v} for k, v in summary.get("rules", {}).items()]
    parts = ["## Payouts", "", f"Reference rule (ground truth): `{summary.get('reference')}`.", ""]
    if comp:
        parts += [_table(comp, ["rule", "spearman_vs_reference", "l1_vs_reference", "gini"]), ""]
    return parts + ["![payout shares](payout_shares.png)", ""]


def render_report(out_dir: str | Path) -> Path:
    """Write ``report.md`` and plots into ``out_dir`` from its CSV/JSON files."""
    out = Path(out_dir)
    manifest = read_json(out / "manifest.json")
    if manifest.get("replicated"):
        from tip_fed.market.market_report import render_market_report

        return render_market_report(out)
    metrics = read_json(out / "metrics.json")
    valuations = read_csv(out / "valuations.csv")
    parts = [f"# tip_fed valuation report: {manifest.get('scenario', 'run')}", ""]
    parts += [
        f"Session `{manifest.get('session', {}).get('session_id', '?')}`, "
        f"{len(valuations)} sellers valued, disclosure `{manifest.get('session', {}).get('disclosure', '?')}`, "
        f"seed {manifest.get('config', {}).get('seed', '?')}.",
        "",
        "Scores are `v · Σ g_i` for each seller: positive means the seller's data is predicted to lower "
        "the buyer's objective loss. `score` was decrypted from the seller's encrypted reply; "
        "`score_plaintext` is the plaintext reference computed with both parties' data (simulation only).",
        "",
        "## Seller valuations",
        "",
        _table(sorted(valuations, key=lambda r: int(r["rank"])), ["rank", "seller_id", "n_samples", "score", "score_plaintext", "mean_score", "clipped"]),
        "",
    ]
    plot_seller_values(valuations, out / "seller_values.png")
    parts += ["![sorted seller values](seller_values.png)", ""]
    if (out / "ground_truth.csv").is_file():
        truth = read_csv(out / "ground_truth.csv")
        by_id = {r["seller_id"]: r for r in valuations}
        common = [t for t in truth if t["seller_id"] in by_id]
        parts += ["## Ground truth (fine-tuning on each seller's data)", ""]
        parts += [_table(truth, ["seller_id", "loss_before", "loss_after", "benefit"]), ""]
        if common:
            scores = [_num(by_id[t["seller_id"]]["score"]) for t in common]
            benefits = [_num(t["benefit"]) for t in common]
            plot_score_vs_benefit(scores, benefits, [t["seller_id"] for t in common], out / "score_vs_benefit.png")
            parts += ["![score vs benefit](score_vs_benefit.png)", ""]
    if (out / "payouts.csv").is_file():
        parts += _payouts_section(read_csv(out / "payouts.csv"), metrics.get("payouts", {}), out)
    if (out / "samples.csv").is_file():
        samples = read_csv(out / "samples.csv")
        if samples:
            plot_fidelity([_num(s["score"]) for s in samples], [_num(s["score_plaintext"]) for s in samples],
                          out / "fidelity.png")
            parts += ["## Encryption fidelity", "", "![fidelity](fidelity.png)", ""]
    flat = flatten(metrics)
    parts += ["## Metrics", "", _table([{"metric": k, "value": v} for k, v in sorted(flat.items())], ["metric", "value"]), ""]
    he = manifest.get("session", {}).get("he_params", {})
    parts += [
        "## Reproducibility",
        "",
        f"- model fingerprint: `{manifest.get('session', {}).get('model_fingerprint', '?')}`",
        f"- projection dimension: {manifest.get('projection_dim', '?')}",
        f"- CKKS: N = {he.get('poly_modulus_degree', '?')}, moduli {he.get('coeff_mod_bit_sizes', '?')}",
        f"- disclosure controls: {_controls(manifest.get('session', {}).get('disclosure_controls'))}",
        f"- versions: {manifest.get('versions', {})}",
        "",
        "Everything needed to re-derive these numbers is in `manifest.json`.",
        "",
    ]
    path = out / "report.md"
    atomic_write(path, "\n".join(parts))
    return path


def _controls(c: dict[str, Any] | None) -> str:
    """One line stating the differential-privacy guarantee and the rounding of released scores."""
    if not c:
        return "not recorded"
    dp, session = c.get("dp_requested"), c.get("dp_session_composed")
    noise = (f"Gaussian noise, (ε, δ) = ({dp['epsilon']:g}, {dp['delta']:g}) per query, "
             f"({session['epsilon']:g}, {session['delta']:g}) per session" if dp and session else "no noise requested")
    return f"{noise}; released scores rounded to multiples of {c.get('release_quantum', 0):.3g}"
