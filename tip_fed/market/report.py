"""Render ``report.md`` and its PNG plots from a saved results directory (any number of sessions).

The report reads only the files in the directory (:func:`tip_fed.market.results.read_results`), so
``tip-fed report DIR`` re-renders any past run and the numbers a person reads are exactly the
numbers programs read. Every number printed is explained where it is printed, and the closing
table explains every entry of ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tip_fed.files import write_private
from tip_fed.market import plots
from tip_fed.market.glossary import FILES, RULES, SCORE, absent_rules, describe_fidelity, explain
from tip_fed.market.results import METHODS, RunResults, flatten, read_results
from tip_fed.market.stats import MIN_BOOTSTRAP_REPLICATES

MAX_TABLE = 40  # sellers listed one by one; beyond this, the best and worst ten


def _f(x: Any, digits: int = 3) -> str:
    """A number for people: fixed decimals near 1, significant digits otherwise; '–' when absent."""
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
    if not np.isfinite(v):
        return "–"
    if abs(v) < 1e-12:  # floating-point residue of an exact zero (e.g. the Gini of equal payouts)
        return "0"
    return f"{v:.{digits}f}" if 1e-2 <= abs(v) < 1e4 else f"{v:.{digits}g}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c if isinstance(c, str) else _f(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def _num(x: str | None) -> float:
    return float(x) if x not in ("", None) else float("nan")


def _scaled(values: list[float], sessions: list[str]) -> np.ndarray:
    """Values divided by their session's root mean square: sessions of different scales on one axis, signs kept."""
    v, s = np.asarray(values, float), np.asarray(sessions)
    out = v.copy()
    for rep in set(sessions):
        same = s == rep
        rms = float(np.sqrt(np.nanmean(v[same] ** 2)))
        out[same] = v[same] / (rms or 1.0)
    return out


def _header(r: RunResults) -> list[str]:
    run, n = r.metrics.get("run", {}), r.n_sessions
    name = r.manifest.get("scenario") or r.manifest.get("title", "run")
    what = ("one valuation session" if n == 1 else
            f"{n} sessions, one per replicate market (a fresh buyer, sellers and encryption keys each)")
    phase = run.get("valuation_seconds")
    parts = [f"# tip_fed valuation report: {name}", "",
             f"This run is {what}, with {run.get('sellers', '?')} sellers per session, carried over the "
             f"`{run.get('runtime') or 'inprocess'}` runtime; {_f(run.get('seconds'), 1)} s in all"
             + (f", of which {_f(phase, 1)} s were the encrypted valuation (Offer out to last reply settled)"
                if phase is not None else "") + ".", ""]
    if run.get("missing"):
        parts += [f"Sellers that did not reply and are not valued: {', '.join(map(str, run['missing']))}.", ""]
    if r.manifest.get("description"):
        parts += ["## The scenario", "", r.manifest["description"], ""]
    return [*parts, "## How to read a score", "", SCORE, ""]


def _seller_section(r: RunResults) -> list[str]:
    vals, benefit = r.rows("valuations.csv"), r.benefit()
    plain = any(v.get("score_plaintext") for v in vals)
    scores = [_num(v["score"]) for v in vals]
    truth = [benefit.get((v.get("session", "0"), v["seller_id"])) for v in vals]
    harmful = [b <= 0 if b is not None else s < 0 for s, b in zip(scores, truth, strict=True)]
    multi = r.n_sessions > 1
    plotted = _scaled(scores, [v.get("session", "0") for v in vals]) if multi else np.asarray(scores, float)
    mags = np.abs(plotted[np.isfinite(plotted)])
    mags = mags[mags > 0]
    measured = any(t is not None for t in truth)
    parts = ["## Seller values", "",
             f"Scores in this run range from {_f(min(scores, default=None))} to {_f(max(scores, default=None))}; "
             f"{sum(s < 0 for s in scores)} of {len(scores)} are negative (predicted harmful). "
             + (f"The largest magnitude {'plotted ' if multi else ''}is {_f(mags.max() / np.median(mags), 2)} times "
                "the median one, so the plot uses a signed-log axis (linear near 0, logarithmic beyond, both signs) "
                "to keep every seller visible. " if mags.size > 1 and mags.max() > 100 * np.median(mags) else "")
             + ("Red marks a harmful seller: realised benefit ≤ 0 where it was measured, otherwise a negative "
                "score." if measured else "Red marks a negative score."), ""]
    if not multi:
        order = sorted(range(len(vals)), key=lambda i: int(vals[i]["rank"]))
        shown = order if len(order) <= MAX_TABLE else [*order[:10], *order[-10:]]
        if len(order) > MAX_TABLE:
            parts += [f"The 10 highest and 10 lowest of {len(order)} sellers (all in `valuations.csv`):", ""]
        cols = ["rank", "seller", "records", "score", *(["plaintext score"] if plain else []), "score per record",
                "clipped", *(["realised benefit"] if any(t is not None for t in truth) else [])]
        parts += _table(cols, [[vals[i]["rank"], vals[i]["seller_id"], vals[i]["n_samples"], _num(vals[i]["score"]),
                                *([_num(vals[i]["score_plaintext"])] if plain else []), _num(vals[i]["mean_score"]),
                                vals[i]["clipped"], *([truth[i]] if any(t is not None for t in truth) else [])]
                               for i in shown])
        parts += ["`records`: the seller's sample count; `score`: decrypted from the seller's encrypted reply; "
                  + ("`plaintext score`: the same score computed in plaintext with both parties' data (simulation "
                     "only), to check the encryption; " if plain else "")
                  + "`score per record` = score ÷ records; `clipped`: records whose gradient norm exceeded the "
                  "public bound and was scaled down to it"
                  + ("; `realised benefit`: see the next section." if any(t is not None for t in truth) else "."), ""]
    else:
        parts += _sessions_table(r)
    plots.sorted_values(list(plotted), harmful,
                        r.out / "seller_values.png",
                        ylabel="score" + (" ÷ its session's RMS score" if multi else ", decrypted seller total"),
                        title=f"Seller values, sorted ({len(scores)} sellers"
                        + (f" over {r.n_sessions} sessions)" if multi else ")"),
                        labels=None if multi else [v["seller_id"] for v in vals],
                        legend=(("helpful (realised benefit > 0" + (", else score > 0)" if None in truth else ")"),
                                 "harmful (realised benefit ≤ 0" + (", else score < 0)" if None in truth else ")"))
                                if measured else ("predicted helpful (score > 0)", "predicted harmful (score < 0)")))
    return [*parts, "![sorted seller values](seller_values.png)", ""]


def _sessions_table(r: RunResults) -> list[str]:
    per = {s["session"]: s for s in r.metrics.get("sessions", [])}
    rows = {row["session"]: row for row in r.rows("sessions.csv")}
    parts = ["Scores of different sessions come from different buyers and keys and are not comparable, so the "
             "plot divides each score by its session's root-mean-square score. Per session (all scores in "
             "`valuations.csv`):", ""]
    table = []
    for i in range(r.n_sessions):
        run = per.get(i, {}).get("run", {})
        row = rows.get(str(i), {})
        table.append([str(i), run.get("sellers"), str(run.get("top_by_score", "–")),
                      str(run.get("top_by_benefit", "–")), _num(row.get("tip_spearman")),
                      _num(row.get("gradient_cosine_spearman"))])
    parts += _table(["session", "sellers", "top seller by score", "top seller by realised benefit",
                     "TIP signed Spearman", "gradient cosine signed Spearman"], table)
    return [*parts, "Signed Spearman: rank correlation across the session's sellers of the method's score with "
            "realised benefit (+1 = same order, 0 = unrelated, −1 = reversed).", ""]


def _validity_section(r: RunResults) -> list[str]:
    m, n = r.metrics, r.n_sessions
    v, b = m["validity"], m.get("baselines", {})
    paper = m.get("paper_mean_abs_spearman", {})
    names = [x for x in METHODS if x == "tip" or x in b]
    blocks = {"tip": v, **b}
    parts = ["## Does the score predict realised benefit?", "",
             "Realised benefit = the buyer's objective loss before − after fine-tuning a copy of its model on that "
             "seller's data alone (simulation only): what the score tries to predict. Positive = the data helped.",
             ""]
    n_truth, n_all = len(r.benefit()), len(r.rows("valuations.csv"))
    if 0 < n_truth < n_all:
        parts += [f"Ground truth costs a fine-tune per seller, so it was measured for a random sample of "
                  f"{n_truth} of the {n_all} sellers; every correlation below uses that sample.", ""]
    rho = "signed Spearman" if n == 1 else "pooled signed Spearman"
    parts += [("Per session: signed rank correlation across sellers of each method's score with realised benefit. "
               if n == 1 else
               f"Per session: signed rank correlation across that session's sellers of each method's score with "
               f"realised benefit; pooled over the {n} sessions by Fisher's z weighted by (sellers − 3). ")
              + "+1 = the method orders sellers exactly as their realised benefit, 0 = no relation, −1 = reversed; "
              "a useful method is well above `random`. "
              + ("One session, so no interval: its sellers share one buyer and one objective, so they are not "
                 "independent draws, and the figure can change with the market's seed; a replicated run pools "
                 "sessions and gives intervals. " if n == 1 else
                 f"95% intervals resample whole sessions and are given only with ≥ {MIN_BOOTSTRAP_REPLICATES} "
                 f"sessions (this run has {n}: too few distinct resamples for an honest interval)."
                 if n < MIN_BOOTSTRAP_REPLICATES else "95% intervals resample whole sessions (bootstrap).")
              + (" `paper`: the paper's mean |Spearman| (Maryland HSCRC, 50 replicates, §6.2), which hides the sign."
                 if paper else ""), ""]
    table = []
    for name in names:
        s, p = blocks[name]["spearman"], blocks[name]["pearson"]
        ci = f"[{_f(s['ci_low'])}, {_f(s['ci_high'])}]" if s.get("ci_low") is not None else "–"
        table.append([name, s["pooled"], *([ci] if n > 1 else []), p["pooled"],
                      *([_f(paper[name]) if name in paper else "–"] if paper else [])])
    parts += _table(["method", rho, *(["95% CI"] if n > 1 else []), "signed Pearson" + (" (pooled)" if n > 1 else ""),
                     *(["paper mean abs Spearman"] if paper else [])], table)
    parts += ["Methods: `tip` = the encrypted score; `gradient_cosine` = cosine of the seller's mean gradient with "
              "the objective's (no curvature, no magnitude); `data_cosine` = cosine of mean input features; "
              "`random` = random scores (what chance looks like); `data_size` = number of records. Pearson "
              "correlates the values themselves and is dominated by the largest ones. – = undefined: a method "
              "that gives every seller the same score (e.g. `data_size` when all hold as many records) has no "
              "correlation.", ""
              ] if len(names) > 1 else []
    top = f"{_f(v.get('top1_rate'))}" if n > 1 else _f(bool(v.get("top1_rate")))
    among = " among the sellers whose benefit was measured" if 0 < n_truth < n_all else ""
    parts += [(f"Top seller by score{among} is the top seller by realised benefit: " + top
               + (" (fraction of sessions)." if n > 1 else ".")), ""]
    pt = v.get("paired_vs_gradient_cosine", {}).get("spearman")
    if pt and pt.get("delta_z") is not None:
        k = pt["n_replicates"]
        parts += [f"Is TIP better than gradient cosine? Per session Δz = z(TIP) − z(gradient cosine) of the Fisher z "
                  f"of their Spearman; weighted mean Δz = {_f(pt['delta_z'])} (positive = TIP closer to realised "
                  f"benefit). Sign-flip test p = {_f(pt.get('p_sign_flip'))}, Wilcoxon signed-rank p = "
                  f"{_f(pt.get('p_wilcoxon'))} over {k} sessions; p is the chance of a difference at least this "
                  "large if neither method were better (small = convincing)."
                  + (f" With {k} sessions no two-sided test can give p below {_f(2 / 2 ** k)}." if k < 8 else "")
                  + (f" Bootstrap p = {_f(pt['p_bootstrap'])}, 95% CI of Δz [{_f(pt['ci_low'])}, "
                     f"{_f(pt['ci_high'])}]." if pt.get("p_bootstrap") is not None else
                     f" No bootstrap p: it needs ≥ {MIN_BOOTSTRAP_REPLICATES} sessions."), ""]
    if len(names) > 1:
        per = r.rows("sessions.csv")
        plots.method_bars(names, [blocks[x]["spearman"]["pooled"] for x in names],
                          [blocks[x]["spearman"]["ci_low"] for x in names],
                          [blocks[x]["spearman"]["ci_high"] for x in names], r.out / "methods.png", paper=paper,
                          per_session=[[_num(row.get(f"{x}_spearman")) for row in per] for x in names])
        parts += ["![methods](methods.png)", ""]
    benefit = r.benefit()
    vals = [x for x in r.rows("valuations.csv") if (x.get("session", "0"), x["seller_id"]) in benefit]
    sess = [x.get("session", "0") for x in vals]
    plots.score_vs_benefit([_num(x["score"]) for x in vals], [benefit[(s, x["seller_id"])] for s, x in
                                                                zip(sess, vals, strict=True)], sess,
                           r.out / "score_vs_benefit.png", labels=[x["seller_id"] for x in vals] if n == 1 else None)
    return [*parts, "Left: values (each session's divided by its RMS when there are several); right: ranks within "
            "each session, where Spearman is the plain correlation of the points.", "",
            "![score vs benefit](score_vs_benefit.png)", ""]


def _distribution_section(r: RunResults) -> list[str]:
    d = r.metrics.get("distribution", {})
    if not d:
        return []
    vals = r.rows("valuations.csv")
    series = {"positive score": list(_scaled([_num(x["score"]) for x in vals], [x["session"] for x in vals]))}
    benefit = r.benefit()
    if benefit:
        series["positive realised benefit"] = list(_scaled(list(benefit.values()), [s for s, _ in benefit]))
    shap = [_num(x["payout"]) for x in r.rows("payouts.csv") if x["rule"] == "shapley"]
    if shap:
        series["shapley payouts"] = shap
    plots.lorenz_curves(series, r.out / "lorenz.png")
    avg = " (mean over sessions)" if r.n_sessions > 1 else ""
    parts = ["## How concentrated is the value?", "",
             f"Gini{avg}: inequality of the positive part of the scores, 0 = every seller equally valuable, "
             "near 1 = one seller holds all the value. Top-10% share: fraction of the total positive score held "
             "by the best 10 % of sellers (0.1 = no concentration). Fraction negative: sellers predicted harmful. "
             "The Lorenz curve draws the same: the further below the diagonal, the more concentrated.", ""]
    parts += _table(["Gini", "top-10% share", "fraction negative", "sellers (all sessions)"],
                    [[d.get("gini"), d.get("top10_share"), d.get("fraction_negative"), d.get("n_sellers")]])
    parts += ["![Lorenz curve](lorenz.png)", ""]
    if "deciles" in r.metrics:
        dec = r.metrics["deciles"]
        rate = " (fraction of sessions)" if r.n_sessions > 1 else ""
        parts += ["## Sign check on deciles", "",
                  "A copy of the buyer's model is fine-tuned on the pooled data of the 10 % of sellers with the "
                  "highest scores, and separately on the 10 % with the lowest; benefit = objective loss before − "
                  "after. A valid score's top decile helps (benefit > 0) and its bottom decile, if negative, hurts.",
                  ""]
        parts += _table(["decile", "sellers", "benefit"], [["top", dec.get("top_n"), dec.get("top_benefit")],
                                                           ["bottom", dec.get("bottom_n"), dec.get("bottom_benefit")]])
        parts += [f"Top decile beats the bottom one{rate}: **{_f(dec.get('top_beats_bottom'))}**; top decile lowers "
                  f"the loss{rate}: **{_f(dec.get('top_lowers_loss'))}**; bottom decile raises it{rate}: "
                  f"**{_f(dec.get('bottom_raises_loss'))}**.", ""]
    return parts


def _payout_section(r: RunResults) -> list[str]:
    pm = r.metrics.get("payouts", {})
    rules = pm.get("rules", {})
    reference = pm.get("reference")
    avg = "; averaged over sessions" if r.n_sessions > 1 else ""
    parts = ["## Payouts", "", RULES, ""]
    parts += ([f"Each rule is compared with the reference rule `{reference}` (computed from realised benefit){avg}: "
               "Spearman vs reference = do the two rules rank sellers alike (+1 = same order); L1 of shares = "
               "how differently they split the budget (0 = identical split, 2 = disjoint); Gini = inequality of "
               "the rule's own payouts (0 = everyone paid the same).", ""] if reference else
              ["No reference rule: a rule from realised benefit needs every seller's ground truth, which only a "
               "simulation measures" + (" and this run measured for a sample of sellers only." if r.benefit() else
                                         "."), ""])
    if rules:
        parts += _table(["rule", "Spearman vs reference", "L1 of shares vs reference", "Gini of payouts"],
                        [[k, c.get("spearman_vs_reference"), c.get("l1_vs_reference"), c.get("gini")]
                         for k, c in rules.items()])
    rows = r.rows("payouts.csv", 0)
    present = {x["rule"] for x in r.rows("payouts.csv")}
    sellers = list(dict.fromkeys(x["seller_id"] for x in rows))
    settings = r.manifest.get("config", {}).get("payouts", {})
    coalition_max = settings.get("coalition-max", settings.get("coalition_max"))  # as the config file spells it
    parts += absent_rules(present, len(sellers), coalition_max)
    if rows:
        shares: dict[str, dict[str, float]] = {}
        for x in rows:
            shares.setdefault(x["rule"], {})[x["seller_id"]] = _num(x["share"])
        plots.payout_shares(shares, sellers, r.out / "payout_shares.png",
                            title="Payout shares per rule" + (" (session 0)" if r.n_sessions > 1 else ""))
        parts += ["Share = the seller's payout ÷ the budget; no bar = the rule pays that seller nothing.", "",
                  "![payout shares](payout_shares.png)", ""]
    return parts


def _fidelity_section(r: RunResults) -> list[str]:
    fid = r.metrics.get("fidelity")
    if not fid:
        return []
    parts = ["## Encryption fidelity", "",
             f"Every decrypted score against the plaintext score computed with both parties' data (simulation only; "
             f"{fid.get('n_scores')} scores: seller totals and any per-sample scores). Pearson "
             f"{_f(fid.get('pearson'), 9)} (1 = identical); largest error {_f(fid.get('max_abs_error'))} in score "
             f"units, {_f(fid.get('max_rel_error'))} relative to the largest score: CKKS is approximate, and "
             "errors far below the gaps between sellers cannot change a ranking."]
    if "within_tolerance" in fid:
        parts[-1] += (f" Every score within the tolerance derived from the CKKS parameters: "
                      f"{_f(fid['within_tolerance'])}; the worst error is {_f(fid.get('worst_error_over_tolerance'))} "
                      "of its tolerance (must be ≤ 1).")
    samples = r.rows("samples.csv")
    pts = samples if any(s.get("score_plaintext") for s in samples) else r.rows("valuations.csv")
    pts = [p for p in pts if p.get("score_plaintext")]
    if pts:
        plots.identity_scatter([_num(p["score_plaintext"]) for p in pts], [_num(p["score"]) for p in pts],
                               r.out / "fidelity.png", xlabel="plaintext score", ylabel="decrypted score",
                               title="Encrypted vs plaintext scores")
        parts += ["", "![fidelity](fidelity.png)"]
    return [*parts, ""]


def _metrics_section(r: RunResults) -> list[str]:
    flat = flatten({k: v for k, v in r.metrics.items() if k != "sessions"})
    rows = [[f"`{k}`", _cell(v), explain(k)] for k, v in sorted(flat.items())]
    return ["## Every number in `metrics.json`", "",
            "Pooled over the run's sessions; each session's own figures are under `sessions` in the file.", "",
            *_table(["metric", "value", "meaning"], rows)]


def _cell(v: Any) -> Any:
    """A metric as a table cell: numbers as numbers, long lists counted (they are in full in metrics.json)."""
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, list):
        shown = ", ".join(map(str, v[:8])) or "none"
        return shown if len(v) <= 8 else f"{len(v)} entries: {shown}, …"
    return "–" if v is None else str(v)


def _reproducibility(r: RunResults) -> list[str]:
    sess = r.manifest.get("sessions", [])
    first = sess[0] if sess else {}
    val = first.get("valuation", {})
    he = val.get("he_params", {})
    ids = ", ".join(f"`{str(s.get('valuation', {}).get('session_id', '?'))[:8]}`" for s in sess[:20])
    return ["## Reproducibility", "",
            f"- session ids: {ids}{' …' if len(sess) > 20 else ''}",
            f"- model fingerprint (session 0): `{val.get('model_fingerprint', '?')}`",
            f"- projected dimension: {first.get('projection_dim', '?')}; seeds (session 0): {first.get('seeds', '?')}",
            f"- {describe_fidelity([s.get('valuation', {}).get('projection_fidelity') for s in sess])}",
            f"- CKKS: N = {he.get('poly_modulus_degree', '?')}, moduli {he.get('coeff_mod_bit_sizes', '?')}; "
            f"disclosure `{val.get('disclosure', '?')}`",
            f"- disclosure controls: {_controls(val.get('disclosure_controls'))}",
            f"- versions: {r.manifest.get('versions', {})}", "",
            "Everything needed to re-derive these numbers is in `manifest.json` (run settings, and per session "
            "its seeds, projection, CKKS parameters and sellers).", "", "## Files", "", FILES, ""]


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


def render_report(out_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots into ``out_dir`` from its results files."""
    r = read_results(out_dir)
    parts = [*_header(r), *_seller_section(r)]
    if "validity" in r.metrics:
        parts += _validity_section(r)
    parts += [*_distribution_section(r), *_payout_section(r), *_fidelity_section(r), *_metrics_section(r),
              *_reproducibility(r)]
    path = r.out / "report.md"
    write_private(path, "\n".join(parts))
    return path
