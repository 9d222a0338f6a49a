"""What every number in a report means, so that a reader never meets an unexplained metric.

Keys are the dotted names of ``metrics.json``; :func:`explain` matches a key by its most specific
pattern (``*`` stands for one name such as a payout rule or a baseline method).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

SCORE = (
    "A seller's score is the sum over its records of `v · g_i`: `g_i` is the record's projected loss gradient "
        "at the buyer's parameters and `v` the buyer's preconditioned objective gradient. Positive = one gradient "
    "step on the seller's data is predicted to lower the buyer's objective loss; negative = predicted harmful. "
    "Scores add over records, so they grow with the number of records and with the gradient scale: compare "
        "sellers of one session, not numbers across sessions or models. `mean_score` is the score per record."
)

_MEANINGS: dict[str, str] = {
    "fidelity.pearson": "Pearson correlation of decrypted scores with the plaintext reference (1 = identical ranking "
        "and scale)",
    "fidelity.max_rel_error": "largest |decrypted − plaintext| relative to the largest plaintext magnitude: CKKS "
        "precision",
    "fidelity.max_abs_error": "largest |decrypted − plaintext| in score units",
    "fidelity.n_scores": "number of scores compared (per-sample scores and seller totals)",
    "validity.spearman": "signed Spearman rank correlation across sellers of the score with realised benefit (+1 = "
        "same order)",
    "validity.spearman.*": "signed Spearman with realised benefit, pooled over replicates by Fisher z (see the "
        "validity section)",
    "validity.spearman_pooled": "signed Spearman with realised benefit, Fisher-z pooled over replicates",
    "validity.pearson": "signed Pearson correlation of the score with realised benefit (sensitive to scale, unlike "
        "Spearman)",
    "validity.pearson.*": "signed Pearson with realised benefit, pooled over replicates by Fisher z",
    "validity.pearson_pooled": "signed Pearson with realised benefit, Fisher-z pooled over replicates",
    "validity.top1_match": "whether the highest-scored seller is also the one with the highest realised benefit",
    "validity.top1_rate": "fraction of replicates whose highest-scored seller has the highest realised benefit",
    "validity.top*_agreement": "fraction of the k highest-scored sellers that are among the k highest-benefit ones",
    "validity.n_sellers": "sellers in the market",
    "validity.paired_vs_gradient_cosine.*": "paired test of TIP against gradient cosine over replicates "
        "(Δz of Fisher z; sign-flip and Wilcoxon p-values; bootstrap only with ≥ 10 replicates)",
    "baselines.*": "the same correlation for a baseline method that needs no encryption or curvature "
        "(gradient cosine, data cosine, random, data size), for comparison",
    "payouts.reference": "the payout rule treated as ground truth (computed from realised benefit, simulation only)",
    "payouts.rules.*.gini": "Gini coefficient of the rule's payouts: 0 = everyone paid the same, near 1 = one seller "
        "paid all",
    "payouts.rules.*.l1_vs_reference": "L1 distance between the rule's payout shares and the reference rule's (0 = "
        "identical, 2 = disjoint)",
    "payouts.rules.*.spearman_vs_reference": "Spearman of the rule's payouts with the reference rule's (empty when a "
        "rule pays everyone alike)",
    "distribution.gini": "Gini coefficient of the positive part of seller scores: how concentrated value is",
    "distribution.top10_share": "share of the total positive score held by the top 10 % of sellers",
    "distribution.fraction_negative": "fraction of sellers whose score is negative (predicted harmful)",
    "distribution.n_sellers": "sellers over all replicates",
    "deciles.*": "sign validation: benefit of fine-tuning on the top vs the bottom 10 % of sellers by score",
    "run.seconds": "wall time of the whole run",
    "run.valuation_seconds": "time from the first Offer to the last settled Reply (the encrypted valuation phase)",
    "run.valuation_seconds_per_seller": "valuation-phase time divided by the number of sellers",
    "run.sellers": "sellers valued",
    "run.missing": "sellers that did not reply (timeout, refusal or crash); they are not valued",
    "run.expected_best": "the seller the scenario was built to be most valuable",
    "run.top_by_score": "the seller with the highest score",
    "run.top_by_benefit": "the seller with the highest realised benefit",
    "run.*": "run bookkeeping (replicates, sellers per replicate, runtime)",
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
        "`shapley` (seller-level Shapley value of the coalition fine-tuning utility)."
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
