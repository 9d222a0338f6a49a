"""Render ``report.md`` and its PNG plots from a saved results directory.

The report reads only the files in the directory, so ``tip-fed report DIR`` re-renders any past
run and the numbers a person reads are exactly the numbers programs read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tip_fed.core.fidelity import describe as describe_fidelity
from tip_fed.files import write_private
from tip_fed.market import plots
from tip_fed.market.glossary import RULES, SCORE, absent_rules, explain
from tip_fed.market.results import flatten, read_csv, read_json


def _num(x: str) -> float:
    return float(x) if x not in ("", None) else float("nan")


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


def _payouts_section(rows: list[dict[str, str]], summary: dict[str, Any], out: Path,
                     coalition_max: int | None) -> list[str]:
    """Payout shares per rule, side by side, and each rule against the ground-truth reference."""
    shares: dict[str, dict[str, float]] = {}
    for r in rows:
        shares.setdefault(r["rule"], {})[r["seller_id"]] = _num(r["share"])
    sellers = list(dict.fromkeys(r["seller_id"] for r in rows))
    plots.payout_shares(shares, sellers, out / "payout_shares.png", title="Payout shares per rule")
    comp = [{"rule": k, **v} for k, v in summary.get("rules", {}).items()]
    reference = summary.get("reference")
    parts = ["## Payouts", "", RULES, ""]
    parts += [f"Reference rule (ground truth): `{reference}`.", ""] if reference else \
        ["No reference rule: ground truth (realised benefit) exists only in simulation.", ""]
    if comp:
        parts += [_table(comp, ["rule", "spearman_vs_reference", "l1_vs_reference", "gini"]), ""]
    parts += absent_rules(set(shares) | set(summary.get("rules", {})), len(sellers), coalition_max)
    return [*parts, "![payout shares](payout_shares.png)", ""]


def render_report(out_dir: str | Path) -> Path:
    """Write ``report.md`` and plots into ``out_dir`` from its CSV/JSON files."""
    out = Path(out_dir)
    manifest = read_json(out / "manifest.json")
    if manifest.get("replicated"):
        from tip_fed.market.market_report import render_market_report

        return render_market_report(out)
    metrics = read_json(out / "metrics.json")
    valuations = read_csv(out / "valuations.csv")
    parts = [f"# tip_fed valuation report: {manifest.get('scenario') or manifest.get('title', 'run')}", ""]
    plaintext = any(r.get("score_plaintext") not in ("", None) for r in valuations)
    parts += [
        f"Session `{manifest.get('session', {}).get('session_id', '?')}`, "
        f"{len(valuations)} sellers valued, disclosure `{manifest.get('session', {}).get('disclosure', '?')}`, "
        f"seed {manifest.get('config', {}).get('seed', '?')}.",
        "",
        *([manifest["description"], ""] if manifest.get("description") else []),
        SCORE,
        "",
        "`score` was decrypted from the seller's encrypted reply; "
        + ("`score_plaintext` is the plaintext reference computed with both parties' data (simulation only); "
           if plaintext else "")
        + "`clipped` counts records whose gradient was clipped to the public norm bound.",
        "",
        "## Seller valuations",
        "",
        _table(sorted(valuations, key=lambda r: int(r["rank"])),
               ["rank", "seller_id", "n_samples", "score", *(["score_plaintext"] if plaintext else []), "mean_score",
                "clipped"]),
        "",
    ]
    truth = read_csv(out / "ground_truth.csv") if (out / "ground_truth.csv").is_file() else []
    benefit = {t["seller_id"]: _num(t["benefit"]) for t in truth}
    ids = [r["seller_id"] for r in valuations]
    scores = [_num(r["score"]) for r in valuations]
    by_truth = all(s in benefit for s in ids) and bool(ids)
    plots.sorted_values(scores, [benefit[s] <= 0 for s in ids] if by_truth else [v < 0 for v in scores],
                        out / "seller_values.png", ylabel="score (decrypted seller total)", labels=ids,
                        title="Seller value, sorted", legend=None if by_truth else
                        ("predicted helpful (score > 0)", "predicted harmful (score < 0)"))
    parts += ["![sorted seller values](seller_values.png)", ""]
    if truth:
        parts += ["## Ground truth (fine-tuning on each seller's data)", "",
                  "Realised benefit = the buyer's objective loss before − after fine-tuning a copy of its model on "
                  "that seller's data alone: what the score tries to predict.", ""]
        parts += [_table(truth, ["seller_id", "loss_before", "loss_after", "benefit"]), ""]
        common = [s for s in ids if s in benefit]
        if common:
            plots.scatter_fit([scores[ids.index(s)] for s in common], [benefit[s] for s in common],
                              out / "score_vs_benefit.png", xlabel="score (decrypted)", labels=common,
                              ylabel="realised benefit (loss before − after)", title="Predicted vs realised value")
            parts += ["![score vs benefit](score_vs_benefit.png)", ""]
    coalition_max = manifest.get("config", {}).get("payouts", {}).get("coalition_max")
    if (out / "payouts.csv").is_file():
        parts += _payouts_section(read_csv(out / "payouts.csv"), metrics.get("payouts", {}), out, coalition_max)
    if (out / "samples.csv").is_file():
        samples = read_csv(out / "samples.csv")
        if samples and plaintext:
            plots.identity_scatter([_num(s["score_plaintext"]) for s in samples], [_num(s["score"]) for s in samples],
                                   out / "fidelity.png", xlabel="plaintext score", ylabel="decrypted score",
                                   title="Encrypted vs plaintext per-sample scores")
            parts += ["## Encryption fidelity", "", "Every per-sample score decrypted by the buyer against the "
                      "plaintext reference: points on the line mean CKKS added no visible error.", "",
                      "![fidelity](fidelity.png)", ""]
    flat = flatten(metrics)
    parts += [
        "## Metrics",
        "",
        _table(
            [{"metric": k, "value": v, "meaning": explain(k)} for k, v in sorted(flat.items())],
            ["metric", "value", "meaning"],
        ),
        "",
    ]
    he = manifest.get("session", {}).get("he_params", {})
    parts += [
        "## Reproducibility",
        "",
        f"- model fingerprint: `{manifest.get('session', {}).get('model_fingerprint', '?')}`",
        f"- projection dimension: {manifest.get('projection_dim', '?')}",
        f"- {describe_fidelity([manifest.get('session', {}).get('projection_fidelity')])}",
        f"- CKKS: N = {he.get('poly_modulus_degree', '?')}, moduli {he.get('coeff_mod_bit_sizes', '?')}",
        f"- disclosure controls: {_controls(manifest.get('session', {}).get('disclosure_controls'))}",
        f"- versions: {manifest.get('versions', {})}",
        "",
        "Everything needed to re-derive these numbers is in `manifest.json`.",
        "",
    ]
    path = out / "report.md"
    write_private(path, "\n".join(parts))
    return path


def _controls(c: dict[str, Any] | None) -> str:
    """One line stating the differential-privacy guarantee and the rounding of released scores."""
    if not c:
        return "not recorded"
    dp, session = c.get("dp_requested"), c.get("dp_session_composed")
    noise = (
        f"Gaussian noise, (ε, δ) = ({dp['epsilon']:g}, {dp['delta']:g}) per query, "
        f"({session['epsilon']:g}, {session['delta']:g}) per session"
        if dp and session
        else "no noise requested"
    )
    return f"{noise}; released scores rounded to multiples of {c.get('release_quantum', 0):.3g}"
