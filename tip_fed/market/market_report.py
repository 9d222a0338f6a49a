"""``report.md`` for replicated markets (healthcare, LLM corpus), from saved files only.

Reads ``manifest.json``, ``metrics.json``, ``scores.csv``, ``replicates.csv`` and ``payouts.csv``
so ``tip-fed report DIR`` re-renders any past run exactly as programs read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tip_fed.core.fidelity import describe as describe_fidelity
from tip_fed.files import write_private
from tip_fed.market import plots
from tip_fed.market.glossary import RULES, SCORE, absent_rules
from tip_fed.market.results import read_csv, read_json
from tip_fed.market.stats import MIN_BOOTSTRAP_REPLICATES

METHODS = ("tip", "gradient_cosine", "data_cosine", "random", "data_size")


def _f(x: Any, digits: int = 3) -> str:
    if x is None or x == "":
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return [*out, ""]


def _scaled_within(rows: list[dict[str, str]], key: str) -> list[float]:
    """Values divided by their replicate's root mean square: one plot for all replicates, signs kept."""
    rms: dict[str, float] = {}
    for rep in {r["replicate"] for r in rows}:
        same = np.asarray([float(x[key]) for x in rows if x["replicate"] == rep])
        rms[rep] = float(np.sqrt(np.mean(same**2))) or 1.0
    return [float(r[key]) / rms[r["replicate"]] for r in rows]


def _validity_section(m: dict[str, Any], out: Path) -> list[str]:
    v, b = m["validity"], m["baselines"]
    paper = m.get("paper_mean_abs_spearman", {})
    blocks = {"tip": v, **b}
    rows = []
    for name in METHODS:
        s, p = blocks[name]["spearman"], blocks[name]["pearson"]
        ci = f"[{_f(s['ci_low'])}, {_f(s['ci_high'])}]" if s.get("ci_low") is not None else "–"
        rows.append([name, s["pooled"], ci, s["mean_abs"],
                     _f(paper[name]) if name in paper else "–", p["pooled"]])
    parts = ["## Does the encrypted score predict realised benefit?", "",
             "Per replicate: signed correlation across sellers of each method's score with the realised benefit; "
             "pooled over replicates by Fisher z (weights n − 3), 95% CI by bootstrap over replicates "
             f"(shown only with ≥ {MIN_BOOTSTRAP_REPLICATES} replicates: fewer give too few distinct resamples). "
             "The paper's numbers (Maryland HSCRC, 50 replicates, §6.2) are mean **|Spearman|**, which hides the sign; "
             "ours are signed.", ""]
    parts += _table(["method", "pooled signed Spearman", "95% CI", "mean abs Spearman", "paper mean abs Spearman",
                     "pooled signed Pearson"], rows)
    pt = v["paired_vs_gradient_cosine"]["spearman"]
    n = pt["n_replicates"]
    boot = (f", 95% CI [{_f(pt['ci_low'])}, {_f(pt['ci_high'])}], bootstrap p = {_f(pt['p_bootstrap'])}"
            if pt.get("p_bootstrap") is not None else "")
    parts += [f"Paired test TIP vs gradient cosine (Spearman, per-replicate Δz of Fisher z; positive = TIP better): "
              f"Δz = {_f(pt['delta_z'])}{boot}; sign-flip p = {_f(pt.get('p_sign_flip'))}, "
              f"Wilcoxon p = {_f(pt['p_wilcoxon'])} over {n} replicates."
              + (f" With {n} replicates no two-sided test can give p below {_f(2 / 2**n)}." if n < 8 else ""), "",
              f"Top-1 agreement (highest score = highest benefit): TIP {_f(v['top1_rate'])}, "
              f"gradient cosine {_f(b['gradient_cosine'].get('top1_rate'))}.", ""]
    plots.method_bars(list(METHODS), [blocks[n]["spearman"]["pooled"] for n in METHODS],
                      [blocks[n]["spearman"]["ci_low"] for n in METHODS],
                      [blocks[n]["spearman"]["ci_high"] for n in METHODS], out / "methods.png", paper=paper)
    return [*parts, "![methods](methods.png)", ""]


def _payout_section(m: dict[str, Any], payouts: list[dict[str, str]], out: Path,
                    coalition_max: int | None) -> list[str]:
    pm = m.get("payouts", {})
    parts = ["## Payouts", "", RULES, "", f"Reference: `{pm.get('reference')}`; numbers are averaged over replicates. "
             "Spearman vs reference: do the rules rank sellers alike; L1 of shares: 0 = same split of the budget, "
             "2 = disjoint; Gini: 0 = everyone paid the same.", ""]
    rules = pm.get("rules", {})
    if rules:
        parts += _table(
            ["rule", "Spearman vs reference", "L1 of shares vs reference", "Gini of payouts"],
            [[r, c.get("spearman_vs_reference"), c.get("l1_vs_reference"), c.get("gini")] for r, c in rules.items()],
        )
    else:
        parts += [
            "No comparison: the ground-truth rules (`benefit`, `loo`, `shapley`) need every seller's realised "
            "benefit, and this run measured it for a sample of the sellers only (or not at all).",
            "",
        ]
    per_rep = m.get("run", {}).get("sellers_per_replicate", 0)
    parts += absent_rules(set(rules), per_rep, coalition_max)
    if payouts:
        first = payouts[0].get("replicate", "")
        rep_rows = [r for r in payouts if r.get("replicate", "") == first]
        sellers = list(dict.fromkeys(r["seller_id"] for r in rep_rows))
        shares: dict[str, dict[str, float]] = {}
        for r in rep_rows:
            shares.setdefault(r["rule"], {})[r["seller_id"]] = float(r["share"])
        plots.payout_shares(
            shares, sellers, out / "payout_shares.png", title=f"Payout shares per rule (replicate {first or 0})"
        )
        parts += ["![payout shares](payout_shares.png)", ""]
    return parts


def render_market_report(out_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots for a replicated run directory."""
    out = Path(out_dir)
    manifest, m = read_json(out / "manifest.json"), read_json(out / "metrics.json")
    scores = read_csv(out / "scores.csv")
    payouts = read_csv(out / "payouts.csv") if (out / "payouts.csv").is_file() else []
    run = m.get("run", {})
    parts = [
        f"# tip_fed market report: {manifest.get('scenario', 'market')}",
        "",
        f"{run.get('replicates', '?')} replicate(s) × {run.get('sellers_per_replicate', '?')} sellers, each replicate "
        f"valued in its own encrypted session (runtime `{run.get('runtime', '?')}`); "
        f"{_f(run.get('seconds'), 1)} s in all. "
        "Realised benefit = objective loss before − after fine-tuning a copy of the buyer's model on that seller's "
        "data alone: what the score tries to predict.",
        "",
        *([manifest["description"], ""] if manifest.get("description") else []),
        SCORE,
        "",
    ]
    fid = m.get("fidelity", {})
    parts += [
        f"Encryption fidelity over all sellers (decrypted vs plaintext scores; CKKS precision): Pearson "
        f"{_f(fid.get('pearson'), 8)}, max relative error {_f(fid.get('max_rel_error'))}.",
        "",
        describe_fidelity([read_json(p).get("session", {}).get("projection_fidelity")
                           for p in sorted(out.glob("replicates/rep-*/manifest.json"))]),
        "",
    ]
    if isinstance(m.get("validity", {}).get("spearman"), dict):
        parts += _validity_section(m, out)
    elif "validity" in m:
        blocks = {"tip": m["validity"], **m.get("baselines", {})}
        parts += [
            "## Does the encrypted score predict realised benefit?",
            "",
            "Signed correlations across this market's sellers of each method's score with realised benefit.",
            "",
        ]
        parts += _table(
            ["method", "signed Spearman", "signed Pearson"],
            [[k, v.get("spearman"), v.get("pearson")] for k, v in blocks.items()],
        )
    tip = [float(r["tip"]) for r in scores]
    truthed = [r for r in scores if r["benefit"] != ""]  # a market may fine-tune on a sample of its sellers only
    sampled = len(truthed) < len(scores)
    harmful = [float(r["benefit"]) <= 0 if r["benefit"] != "" else float(r["tip"]) < 0 for r in scores]
    multi = run.get("replicates", 1) > 1
    plots.sorted_values(
        _scaled_within(scores, "tip") if multi else tip,
        harmful,
        out / "seller_values.png",
        ylabel="TIP score" + (" (÷ replicate RMS)" if multi else ""),
        title="Seller values, sorted",
        labels=None if multi else [r["seller_id"] for r in scores],
        legend=(
            "helpful (benefit > 0; score > 0 where not fine-tuned)",
            "harmful (benefit <= 0; score < 0 where not fine-tuned)",
        )
        if sampled
        else None,
    )
    unit = " (÷ replicate RMS)" if multi else ""
    plots.scatter_fit(
        _scaled_within(truthed, "tip") if multi else [float(r["tip"]) for r in truthed],
        _scaled_within(truthed, "benefit") if multi else [float(r["benefit"]) for r in truthed],
        out / "score_vs_benefit.png",
        xlabel="TIP score (encrypted)" + unit,
        ylabel="realised benefit (loss before − after)" + unit,
        title="Encrypted score vs realised benefit",
        labels=None if multi else [r["seller_id"] for r in truthed],
    )
    if sampled:
        parts += [
            f"Ground truth (a fine-tune per seller) was computed for a random sample of {len(truthed)} of the "
            f"{len(scores)} sellers; correlations and the score-vs-benefit plot use that sample.",
            "",
        ]
    dist = m.get("distribution", {})
    series = {
        "positive TIP value" + (" (÷ replicate RMS)" if multi else ""): _scaled_within(scores, "tip") if multi else tip
    }
    series["positive realised benefit" + unit] = (
        _scaled_within(truthed, "benefit") if multi else [float(r["benefit"]) for r in truthed]
    )
    shap = [float(r["payout"]) for r in payouts if r["rule"] == "shapley"]
    if shap:
        series["shapley payouts"] = shap
    plots.lorenz_curves(series, out / "lorenz.png")
    parts += [
        "## Distribution of value",
        "",
        "Gini: 0 = value spread equally, near 1 = one seller holds all of it (positive scores only). "
        "Top-10% share: fraction of the positive score held by the best 10 % of sellers. "
        "The Lorenz curve plots the same: the further below the diagonal, the more concentrated.",
        "",
    ]
    parts += _table(
        ["Gini (positive part)", "top-10% share", "fraction with negative score", "sellers"],
        [[dist.get("gini"), dist.get("top10_share"), dist.get("fraction_negative"), dist.get("n_sellers")]],
    )
    parts += [
        "![sorted seller values](seller_values.png)",
        "",
        "![Lorenz curve](lorenz.png)",
        "",
        "![score vs benefit](score_vs_benefit.png)",
        "",
    ]
    if "deciles" in m:
        d = m["deciles"]
        parts += [
            "## Sign validation by fine-tuning on deciles",
            "",
            "A copy of the buyer's model is fine-tuned on the pooled data of the top 10% of sellers by TIP score, "
            "and separately on the bottom 10%; benefit = objective loss before − after.",
            "",
        ]
        parts += _table(
            ["decile", "sellers", "benefit"],
            [["top", d["top_n"], d["top_benefit"]], ["bottom", d["bottom_n"], d["bottom_benefit"]]],
        )
        parts += [f"Top decile lowers the objective loss more than the bottom decile: **{_f(d['top_beats_bottom'])}**."]
        if "top_lowers_loss" in d:
            parts += [
                f"Top decile lowers the objective loss (benefit > 0): **{_f(d['top_lowers_loss'])}**; bottom decile "
                f"raises it (benefit < 0): **{_f(d['bottom_raises_loss'])}**."
            ]
        parts += [""]
    parts += _payout_section(m, payouts, out, manifest.get("config", {}).get("payouts", {}).get("coalition_max"))
    parts += [
        "## Files",
        "",
        "`scores.csv` (every method's score and the benefit, per replicate and seller), "
        "`replicates.csv` (per-replicate correlations), `payouts.csv`, `metrics.json`, and per-session results "
        "under `replicates/rep-NNN/` (valuations, ground truth, payouts, manifest).",
        "",
    ]
    path = out / "report.md"
    write_private(path, "\n".join(parts))
    return path
