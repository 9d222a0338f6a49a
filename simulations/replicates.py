"""Replicated markets: value each replicate in its own encrypted session, then pool.

Each replicate is one session of the run; the results directory has the same files as a
one-market run (:mod:`tip_fed.market.results`), every row naming its session, and the metrics
pool the sessions' correlations (:mod:`tip_fed.market.pooling`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.exchanges import EXCHANGES
from simulations.fidelity import check_session
from simulations.market import Market
from simulations.results import RunResult, session_result, write_run
from simulations.scenarios import make_buyer, plaintext_reference, seller_gradients
from simulations.settings import SimulationConfig
from tip_fed.console import count, counted, phase, restart, step
from tip_fed.market import baselines
from tip_fed.market.ground_truth import FineTune, coalition_utility, finetune_benefit
from tip_fed.market.results import Session
from tip_fed.protocol import Valuation

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
    config: SimulationConfig, market: Market, rep: int, progress: bool
) -> tuple[Session, Valuation]:
    """One session: encrypted exchange, plaintext reference, baselines, ground truth, payouts, deciles.

    Without ground truth (``ground-truth.enabled = false``) no fine-tune runs: no benefit, loo, shapley or deciles.
    """
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
    sampled = market.info.get("truth_sellers", ids)  # a market may fine-tune on a random sample only
    tune = FineTune(gt.lr, gt.epochs, gt.batch_size, seed=config.seed * 1000 + rep, layers=gt.layers)
    truth = {
        s: finetune_benefit(market.model, market.task, market.sellers[s], market.objective, tune)
        for s in counted([s for s in ids if s in sampled and gt.enabled], "ground-truth fine-tunes")
    }
    phase("payouts and results")
    with count("coalition fine-tunes (leave-one-out, Shapley and decile payouts)", None) as coalitions:
        utility: Callable[[frozenset[str]], float] | None = None
        if gt.enabled:  # coalition payouts and deciles fine-tune; without ground truth there are none
            pooled = coalition_utility(market.model, market.task, {s: market.sellers[s] for s in ids},
                                       market.objective, tune)

            def utility(coalition: frozenset[str]) -> float:
                coalitions.update()
                return pooled(coalition)

        by_id = valuation.by_id()
        deciles = decile_check({s: by_id[s].total for s in ids}, utility) if utility else None
        session = session_result(config, market, buyer, valuation, plain, truth, time.perf_counter() - t0,
                                 utility=utility, tolerance=tolerance, baselines=base, deciles=deciles)
    return session, valuation


def run_replicated(
    config: SimulationConfig, markets: list[Market], out: Path, *, progress: bool, started: float
) -> RunResult:
    """Value every replicate market in its own session and write per-replicate and pooled results."""
    sessions, valuations = [], []
    restart("sessions", len(markets), unit="session")
    for rep, market in enumerate(markets):
        step(f"session {rep + 1}/{len(markets)}" + (f" (replicate market {rep})" if len(markets) > 1 else ""))
        session, valuation = value_replicate(config, market, rep, progress)
        sessions.append(session)
        valuations.append(valuation)
    step("writing results")
    return write_run(out, config, markets[0].name, sessions, started, valuations[0] if len(markets) == 1 else None,
                     extra={"paper_mean_abs_spearman": PAPER} if len(markets) > 1 else None)
