"""Replicated markets: value each replicate in its own encrypted session, then pool.

Layout of the results directory: ``replicates/rep-NNN/`` holds each session's own files (the
same files a single-market run writes); the top level holds ``scores.csv`` (every method's score
and the realised benefit per replicate and seller), ``replicates.csv`` (per-replicate signed
correlations), ``payouts.csv`` (with a ``replicate`` column), ``metrics.json`` (pooled
``validity.*``, ``baselines.*``, ``payouts.*``, ``distribution.*``) and ``report.md``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from simulations.exchanges import EXCHANGES
from simulations.fidelity import check_session
from simulations.market import Market
from simulations.results import RunResult, versions, write_run
from simulations.scenarios import make_buyer, plaintext_reference, projection_seed, seller_gradients
from simulations.settings import SimulationConfig
from tip_fed.console import count, counted, phase, restart, step
from tip_fed.market import baselines, metrics, stats
from tip_fed.market.ground_truth import coalition_utility, finetune_benefit
from tip_fed.market.market_report import render_market_report
from tip_fed.market.results import read_csv, read_json, write_csv, write_json

METHODS = ("tip", *baselines.METHODS)
SCORE_COLUMNS = ("replicate", "seller_id", "n_samples", "tip", "tip_plaintext", *baselines.METHODS, "benefit")
REPLICATE_COLUMNS = ("replicate", "n_sellers", *(f"{m}_{c}" for m in METHODS for c in ("spearman", "pearson")),
                     "tip_top1", "gradient_cosine_top1", "tip_topk", "gradient_cosine_topk")
PAPER = {"tip": 0.900, "gradient_cosine": 0.855, "data_cosine": 0.311, "random": 0.352}  # mean |Spearman|, §6.2


def decile_check(scores: dict[str, float], utility: Any) -> dict[str, Any] | None:
    """Sign validation: fine-tune on the top and on the bottom 10% of sellers by score (>= 10 sellers).

    A valid score's top decile lowers the objective loss (benefit > 0) and its bottom decile,
    when the bottom scores are negative, raises it (benefit < 0); both signs are reported, as
    well as whether the top beats the bottom.
    """
    if len(scores) < 10:
        return None
    ranked = sorted(scores, key=lambda s: -scores[s])
    k = max(1, len(ranked) // 10)
    top, bottom = ranked[:k], ranked[-k:]
    tb, bb = utility(frozenset(top)), utility(frozenset(bottom))
    return {
        "top_n": k,
        "bottom_n": k,
        "top_sellers": top,
        "bottom_sellers": bottom,
        "top_benefit": tb,
        "bottom_benefit": bb,
        "top_beats_bottom": bool(tb > bb),
        "top_lowers_loss": bool(tb > 0),
        "bottom_raises_loss": bool(bb < 0),
        "top_score_sum": float(sum(scores[s] for s in top)),
        "bottom_score_sum": float(sum(scores[s] for s in bottom)),
    }


def value_replicate(
    config: SimulationConfig, market: Market, out: Path, rep: int, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One session: encrypted exchange, plaintext reference, baselines, ground truth, payouts, deciles."""
    gt = config.ground_truth
    t0 = time.perf_counter()
    phase("the buyer's preconditioner and query")
    buyer = make_buyer(market, config)
    phase(f"{len(market.sellers)} sellers scoring under encryption ({config.runtime})")
    valuation = EXCHANGES[config.runtime](config, market, buyer, progress)
    ids = [v.seller_id for v in valuation.sellers]
    grads = {s: seller_gradients(buyer, market, market.sellers[s]) for s in counted(ids, "plaintext gradients")}
    plain = {s: plaintext_reference(buyer, market, s, grads[s]) for s in ids}
    tolerance = check_session(buyer, valuation, plain)  # before the costly ground truth
    base = baselines.score_all(
        {s: g.numpy() for s, g in grads.items()},
        seller_gradients(buyer, market, market.objective).numpy(),
        {s: market.sellers[s] for s in ids},
        market.objective,
        seed=config.seed * 7919 + rep,
    )
    seed = config.seed * 1000 + rep
    sampled = market.info.get("truth_sellers", ids)  # a market may fine-tune on a random sample only
    finetune: dict[str, Any] = {
        "lr": gt.lr, "epochs": gt.epochs, "batch_size": gt.batch_size, "seed": seed, "layers": gt.layers,
    }
    truth = {
        s: finetune_benefit(market.model, market.task, market.sellers[s], market.objective, **finetune)
        for s in counted([s for s in ids if s in sampled], "ground-truth fine-tunes")
    }
    utility = coalition_utility(
        market.model, market.task, {s: market.sellers[s] for s in ids}, market.objective, **finetune
    )
    phase("payouts and results")
    with count("coalition fine-tunes (leave-one-out and Shapley payouts)", None) as coalitions:

        def counted_utility(coalition: frozenset[str]) -> float:
            coalitions.update()
            return utility(coalition)

        write_run(out, config, market, buyer, valuation, plain, truth, time.perf_counter() - t0,
                  utility=counted_utility, tolerance=tolerance, render=False)
    by_id = valuation.by_id()
    deciles = decile_check({s: by_id[s].total for s in ids}, utility)
    return [
        {
            "replicate": rep,
            "seller_id": s,
            "n_samples": by_id[s].n_samples,
            "tip": by_id[s].total,
            "tip_plaintext": float(plain[s].sum()),
            **{m: base[m][s] for m in baselines.METHODS},
            "benefit": truth[s].benefit if s in truth else None,
        }
        for s in ids
    ], deciles


def per_replicate(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Signed correlations of every method with benefit, plus top-1 / top-k agreement, per replicate."""
    out = []
    for rep in sorted({r["replicate"] for r in rows}):
        rr = [r for r in rows if r["replicate"] == rep and r["benefit"] is not None]  # sellers with ground truth
        benefit = [r["benefit"] for r in rr]
        row: dict[str, Any] = {"replicate": rep, "n_sellers": len(rr)}
        for m in METHODS:
            vals = [r[m] for r in rr]
            row[f"{m}_spearman"], row[f"{m}_pearson"] = metrics.spearman(vals, benefit), metrics.pearson(vals, benefit)
        for m in ("tip", "gradient_cosine"):
            vals = [r[m] for r in rr]
            row[f"{m}_top1"] = metrics.top1_match(vals, benefit)
            row[f"{m}_topk"] = stats.topk_agreement(vals, benefit, k)
        out.append(row)
    return out


def pooled_metrics(reps: list[dict[str, Any]], rows: list[dict[str, Any]], k: int, seed: int) -> dict[str, Any]:
    """``validity.*`` for TIP and ``baselines.*`` for the others, each Fisher-z pooled with CIs."""
    ns = [r["n_sellers"] for r in reps]

    def block(m: str) -> dict[str, Any]:
        return {
            "spearman": stats.pool([r[f"{m}_spearman"] for r in reps], ns, seed=seed),
            "pearson": stats.pool([r[f"{m}_pearson"] for r in reps], ns, seed=seed),
        }

    validity = block("tip")
    validity["spearman_pooled"] = validity["spearman"]["pooled"]
    validity["pearson_pooled"] = validity["pearson"]["pooled"]
    validity["top1_rate"] = float(np.mean([r["tip_top1"] for r in reps]))
    validity[f"top{k}_agreement"] = float(np.mean([r["tip_topk"] for r in reps]))
    validity["paired_vs_gradient_cosine"] = {
        "spearman": stats.paired(
            [r["tip_spearman"] for r in reps], [r["gradient_cosine_spearman"] for r in reps], ns, seed=seed
        ),
        "pearson": stats.paired(
            [r["tip_pearson"] for r in reps], [r["gradient_cosine_pearson"] for r in reps], ns, seed=seed
        ),
    }
    base = {m: block(m) for m in baselines.METHODS}
    base["gradient_cosine"]["top1_rate"] = float(np.mean([r["gradient_cosine_top1"] for r in reps]))
    base["gradient_cosine"][f"top{k}_agreement"] = float(np.mean([r["gradient_cosine_topk"] for r in reps]))
    fid = metrics.fidelity([r["tip"] for r in rows], [r["tip_plaintext"] for r in rows])
    return {"validity": validity, "baselines": base, "fidelity": fid, "paper_mean_abs_spearman": PAPER}


def single_metrics(rep: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One market (no replicates to pool): the signed correlations across its sellers."""

    def block(m: str) -> dict[str, Any]:
        return {"spearman": rep[f"{m}_spearman"], "pearson": rep[f"{m}_pearson"]}

    validity = {**block("tip"), "top1_match": rep["tip_top1"], "n_sellers": rep["n_sellers"]}
    fid = metrics.fidelity([r["tip"] for r in rows], [r["tip_plaintext"] for r in rows])
    return {"validity": validity, "baselines": {m: block(m) for m in baselines.METHODS}, "fidelity": fid}


def pooled_payouts(out: Path, n_reps: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All replicates' payouts (with a replicate column) and each rule's comparison averaged over replicates."""
    rows: list[dict[str, Any]] = []
    per_rule: dict[str, dict[str, list[float]]] = {}
    reference = None
    for rep in range(n_reps):
        d = out / "replicates" / f"rep-{rep:03d}"
        rows += [{"replicate": rep, **r} for r in read_csv(d / "payouts.csv")]
        pm = read_json(d / "metrics.json").get("payouts", {})
        reference = pm.get("reference")
        for rule, comp in pm.get("rules", {}).items():
            for key, val in comp.items():
                if val is not None:
                    per_rule.setdefault(rule, {}).setdefault(key, []).append(val)
    summary = {rule: {k: float(np.mean(v)) for k, v in d.items()} for rule, d in per_rule.items()}
    return rows, {"reference": reference, "rules": summary}


def valuation_seconds(out: Path, n_reps: int) -> float | None:
    """Summed valuation-phase seconds of every replicate's session; None when a runtime could not time one."""
    phases = [
        read_json(out / "replicates" / f"rep-{rep:03d}" / "metrics.json")["run"].get("valuation_seconds")
        for rep in range(n_reps)
    ]
    return None if None in phases else float(sum(phases))


def run_replicated(
    config: SimulationConfig, markets: list[Market], out: Path, *, progress: bool, started: float
) -> RunResult:
    """Value every replicate market in its own session and write per-replicate and pooled results."""
    rows: list[dict[str, Any]] = []
    deciles = []
    restart("replicates", len(markets), unit="replicate")
    for rep, market in enumerate(markets):
        step(f"replicate {rep + 1}/{len(markets)}")
        rep_rows, dec = value_replicate(config, market, out / "replicates" / f"rep-{rep:03d}", rep, progress)
        rows += rep_rows
        deciles += [dec] if dec else []
    step("pooling the replicates")
    k = max(1, min(3, len(markets[0].sellers) // 3))
    reps = per_replicate(rows, k)
    write_csv(out / "scores.csv", SCORE_COLUMNS, rows)
    write_csv(out / "replicates.csv", REPLICATE_COLUMNS, reps)
    m = pooled_metrics(reps, rows, k, config.seed) if len(markets) > 1 else single_metrics(reps[0], rows)
    if deciles:
        m["deciles"] = (
            deciles[0]
            if len(deciles) == 1
            else {
                "top_n": deciles[0]["top_n"],
                "bottom_n": deciles[0]["bottom_n"],
                "top_benefit": float(np.mean([d["top_benefit"] for d in deciles])),
                "bottom_benefit": float(np.mean([d["bottom_benefit"] for d in deciles])),
                **{
                    key: float(np.mean([d[key] for d in deciles]))  # fraction of replicates
                    for key in ("top_beats_bottom", "top_lowers_loss", "bottom_raises_loss")
                },
            }
        )
    pay_rows, m["payouts"] = pooled_payouts(out, len(markets))
    write_csv(out / "payouts.csv", ("replicate", "seller_id", "rule", "payout", "share"), pay_rows)
    m["distribution"] = stats.value_distribution([r["tip"] for r in rows])
    m["run"] = {
        "seconds": time.perf_counter() - started,
        "replicates": len(markets),
        "sellers_per_replicate": len(markets[0].sellers),
        "runtime": config.runtime,
        "valuation_seconds": valuation_seconds(out, len(markets)),
    }
    write_json(
        out / "manifest.json",
        {
            "scenario": markets[0].name,
            "config": config.to_dict(),
            "replicated": True,
            "replicates": [mk.info for mk in markets],
            "versions": versions(),
            "projection_seeds": [projection_seed(config.seed, mk.replicate) for mk in markets],
        },
    )
    write_json(out / "metrics.json", m)
    render_market_report(out)
    return RunResult(out, m, None)
