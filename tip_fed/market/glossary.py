"""What every number in a report means, so that a reader never meets an unexplained metric.

Keys are the dotted names of ``metrics.json``; :func:`explain` matches a key by its most specific
pattern (``*`` stands for one name such as a payout rule or a baseline method).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

SCORE = (
    "A seller's score is the sum over its records of `v · g_i`: `g_i` is the record's projected loss gradient "
    "at the buyer's parameters and `v` the buyer's preconditioned objective gradient. Positive = one gradient "
    "step on the seller's data is predicted to lower the buyer's objective loss (helpful); negative = predicted "
    "harmful; near 0 = little effect. The unit is arbitrary: scores add over records and scale with the gradient "
    "and the preconditioner (an inverse curvature can make them large), so only the order and the relative sizes "
    "within one session mean something; compare sellers of one session, never numbers across sessions or models."
)

FILES = (
    "Every row names its `session` (0 for a run of one session). `valuations.csv`: per seller, the decrypted "
    "`score`, `score_plaintext` (simulation only), `mean_score`, `rank`, `clipped`, `commitment`, `seconds` and any "
    "baseline scores; `samples.csv`: per-sample scores (per-sample disclosure only); `ground_truth.csv`: loss "
    "before and after fine-tuning on the seller's data and the realised `benefit` (simulation only); "
    "`payouts.csv`: each rule's `payout` and `share`; `sessions.csv`: per-session correlations with realised "
    "benefit; `metrics.json`: everything tabled above plus per-session metrics; `manifest.json`: what is needed "
    "to re-derive them."
)

_MEANINGS: dict[str, str] = {
    "fidelity.pearson": "Pearson correlation of decrypted scores with the plaintext reference (1 = identical)",
    "fidelity.max_rel_error": "largest absolute difference decrypted − plaintext, relative to the largest plaintext "
        "magnitude: CKKS precision (far below the gaps between sellers = no effect on rankings)",
    "fidelity.max_abs_error": "largest absolute difference decrypted − plaintext, in score units",
    "fidelity.n_scores": "number of scores compared (per-sample scores and seller totals, all sessions)",
    "fidelity.within_tolerance": "whether every decrypted score lies within the error bound derived from the CKKS "
        "parameters",
    "fidelity.worst_error_over_tolerance": "the largest error as a fraction of its bound (≤ 1 required)",
    "validity.*.pooled": "signed correlation of the score with realised benefit across sellers; with several "
        "sessions, Fisher-z pooled (weights sellers − 3). +1 = same order, 0 = unrelated, −1 = reversed",
    "validity.*.ci_low": "lower end of the 95% bootstrap interval over sessions (empty below 10 sessions: too few "
        "resamples)",
    "validity.*.ci_high": "upper end of the 95% bootstrap interval over sessions (empty below 10 sessions)",
    "validity.*.mean": "plain mean over sessions of the per-session correlation",
    "validity.*.mean_abs": "mean over sessions of the absolute correlation (the paper's statistic; hides the sign)",
    "validity.*.n_replicates": "sessions in which the correlation was defined",
    "validity.top1_rate": "fraction of sessions whose highest-scored seller has the highest realised benefit",
    "validity.top*_agreement": "fraction of the k highest-scored sellers that are among the k highest-benefit ones "
        "(mean over sessions)",
    "validity.n_sellers": "sellers with measured realised benefit per session (mean)",
    "validity.paired_vs_gradient_cosine.*.delta_z": "weighted mean over sessions of z(TIP) − z(gradient cosine), "
        "Fisher z of each correlation; positive = TIP closer to realised benefit",
    "validity.paired_vs_gradient_cosine.*.p_sign_flip": "two-sided sign-flip randomisation p of Δz (cannot go "
        "below 2 / 2^sessions)",
    "validity.paired_vs_gradient_cosine.*.p_wilcoxon": "two-sided Wilcoxon signed-rank p of the per-session Δz",
    "validity.paired_vs_gradient_cosine.*.p_bootstrap": "bootstrap p over sessions (empty below 10 sessions)",
    "validity.paired_vs_gradient_cosine.*.ci_*": "95% bootstrap interval of Δz (empty below 10 sessions)",
    "validity.paired_vs_gradient_cosine.*.n_replicates": "sessions in the paired test",
    "baselines.*": "the same statistic for a baseline method that needs no encryption or curvature "
        "(gradient cosine, data cosine, random, data size), for comparison",
    "paper_mean_abs_spearman.*": "the paper's mean absolute Spearman for this method (Maryland HSCRC, 50 replicates, "
        "§6.2)",
    "payouts.reference": "the payout rule treated as ground truth (computed from realised benefit, simulation only)",
    "payouts.rules.*.gini": "Gini coefficient of the rule's payouts: 0 = everyone paid the same, near 1 = one seller "
        "paid all",
    "payouts.rules.*.l1_vs_reference": "L1 distance between the rule's payout shares and the reference rule's (0 = "
        "identical, 2 = disjoint)",
    "payouts.rules.*.spearman_vs_reference": "Spearman of the rule's payouts with the reference rule's (empty when a "
        "rule pays everyone alike)",
    "distribution.gini": "Gini coefficient of the positive part of seller scores: 0 = value spread equally, near 1 "
        "= one seller holds it all (mean over sessions)",
    "distribution.top10_share": "share of the total positive score held by the top 10 % of sellers (mean over "
        "sessions)",
    "distribution.fraction_negative": "fraction of sellers whose score is negative, predicted harmful (mean over "
        "sessions)",
    "distribution.n_sellers": "sellers over all sessions",
    "deciles.top_n": "sellers in the top decile by score",
    "deciles.bottom_n": "sellers in the bottom decile by score",
    "deciles.top_benefit": "realised benefit of fine-tuning on the top decile's pooled data (> 0 = helps)",
    "deciles.bottom_benefit": "realised benefit of fine-tuning on the bottom decile's pooled data (< 0 = hurts)",
    "deciles.top_beats_bottom": "whether the top decile helps more than the bottom (fraction of sessions when several)",
    "deciles.top_lowers_loss": "whether the top decile's benefit is positive (fraction of sessions when several)",
    "deciles.bottom_raises_loss": "whether the bottom decile's benefit is negative (fraction of sessions when "
        "several)",
    "deciles.*_score_sum": "sum of the decile's scores",
    "deciles.*_sellers": "the sellers in the decile",
    "run.seconds": "wall time of the whole run",
    "run.sessions": "valuation sessions in the run (one per replicate market)",
    "run.runtime": "how buyer and sellers exchanged messages (inprocess, grpc, flower-simulation, flower-deployment)",
    "run.valuation_seconds": "time from the first Offer to the last settled Reply, summed over sessions",
    "run.valuation_seconds_per_seller": "valuation-phase time divided by the number of sellers valued",
    "run.sellers": "sellers valued per session",
    "run.missing": "sellers that did not reply (timeout, refusal or crash); they are not valued",
    "run.rejected.*": "a seller whose reply the buyer rejected, and why",
    "run.rejected": "sellers whose reply the buyer rejected (none)",
    "run.expected_best": "the seller the scenario was built to be most valuable",
    "run.top_by_score": "the seller with the highest score",
    "run.top_by_benefit": "the seller with the highest realised benefit",
    "run.offer_bytes": "bytes of the Offers sent to all sellers",
    "run.sellers_sent_weights": "sellers whose Offer carried the model's weights (others had them cached)",
    "run.sellers_offered": "sellers an Offer was sent to",
}


def explain(key: str) -> str:
    """Meaning of a metrics key; exact names first, then the longest matching pattern."""
    if key in _MEANINGS:
        return _MEANINGS[key]
    matches = [p for p in _MEANINGS if "*" in p and fnmatchcase(key, p)]
    return _MEANINGS[max(matches, key=len)] if matches else ""


RULES = (
    "Rules: `flat` (per record), `proportional` (positive score; harmful sellers paid zero), `softmax` "
        "(temperature on spread-scaled scores), `budget_balanced` (reserve price, budget paid exactly), and from "
    "ground truth (simulation only): `benefit` (own realised benefit), `loo` (leave-one-seller-out), "
        "`shapley` (seller-level Shapley value of the coalition fine-tuning utility). Score-based rules pay a "
    "score that carries declared privacy noise shrunk toward 0 by its signal-to-noise (the posterior mean of "
    "the seller's total); exact scores are paid as they are."
)


def absent_rules(present: set[str], n_sellers: int, coalition_max: int | None) -> list[str]:
    """A sentence for each coalition rule that was not computed, saying why, so no rule vanishes silently."""
    missing = [r for r in ("loo", "shapley") if r not in present]
    if not missing:
        return []
    if coalition_max is not None and n_sellers > coalition_max:
        why = (
            f"they fine-tune on seller coalitions, which is done only up to `payouts.coalition-max` = "
            f"{coalition_max} sellers and this market has {n_sellers}; raise that setting to compute them"
        )
    else:
        why = (
            "they need the realised benefit of seller coalitions (a fine-tune per coalition), which this run "
            "did not measure"
        )
    return [f"Not computed: {', '.join(f'`{r}`' for r in missing)}: {why}.", ""]


def describe_fidelity(plans: Sequence[Mapping[str, Any] | None]) -> str:
    """One sentence for a report: how the projection ranks of one or more sessions were chosen (their
    :meth:`tip_fed.core.fidelity.FidelityPlan.to_dict`, None where set by hand) and how faithful they are."""
    known = [p for p in plans if p]
    if not known:
        return ("Projection ranks were set by hand (projection.rank), so their agreement with exact scores was not "
                "measured.")
    dims = sorted(int(p["dim"]) for p in known)
    spread = f"{dims[0]}" if dims[0] == dims[-1] else f"{dims[0]}-{dims[-1]}"
    where = "" if len(known) == 1 else f" in each of {len(known)} sessions"
    if all(p["exact"] for p in known):
        return (f"Projection fidelity: exact{where}. The buyer's model fits the size budget unprojected "
                f"(dimension {spread}), so scores are exact gradient dot products and nothing is lost to projection.")
    rho = sorted(float(p["spearman"]) for p in known)
    got = f"{rho[0]:.3f}" if len(rho) == 1 else f"{rho[0]:.3f}-{rho[-1]:.3f}"
    return (f"Projection fidelity: per-sample Spearman {got} (target {known[0]['target']:g}){where}, dimension "
            f"{spread} (budget {known[0]['max_dim']}). The buyer compared projected with exact (unprojected) gradient "
            "scores of its own training samples, chose per-layer ranks on half of them and measured this agreement "
            "on the other half: 1 means the projection ranks records exactly as the full gradients do.")
