"""A simulated run's results: one :class:`~tip_fed.market.results.Session` per settled session, one writer.

A scenario with one market is a run of one session; a replicated scenario, of one per replicate.
Both write the same files (:mod:`tip_fed.market.results`) and the same report.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulations.market import Market
from simulations.scenarios import SCENARIOS, TimedBuyer
from simulations.settings import SimulationConfig
from tip_fed.market import metrics, payouts
from tip_fed.market.payouts import PayoutInputs, Utility
from tip_fed.market.pooling import run_metrics
from tip_fed.market.report import render_report
from tip_fed.market.results import Session, session_rows, versions, write_run_files
from tip_fed.protocol import Buyer, Valuation


@dataclass
class RunResult:
    """Where the results went, the headline metrics and, for a one-session run, its valuation."""

    out_dir: Path
    metrics: dict[str, Any]
    valuation: Valuation | None


def session_result(
    config: SimulationConfig,
    market: Market,
    buyer: Buyer,
    valuation: Valuation,
    plain: dict[str, np.ndarray],
    truth: dict[str, Any],
    seconds: float,
    *,
    utility: Utility | None = None,
    tolerance: dict[str, Any] | None = None,
    baselines: dict[str, dict[str, float]] | None = None,
    deciles: dict[str, Any] | None = None,
) -> Session:
    """Rows, payouts, per-session metrics and manifest entry of one settled simulated session.

    ``utility`` (coalition -> realised benefit, simulation only) enables the loo/shapley payouts;
    ``tolerance`` is what :func:`simulations.fidelity.check_session` passed the session with.
    """
    rows, samples = session_rows(valuation, plain, baselines)
    by_id = valuation.by_id()
    enc = [r["score"] for r in (*rows, *samples)]
    ref = [r["score_plaintext"] for r in (*rows, *samples)]
    phase = buyer.valuation_seconds if isinstance(buyer, TimedBuyer) else None
    top = max(rows, key=lambda r: r["score"])["seller_id"] if rows else None
    m: dict[str, Any] = {"fidelity": {**metrics.fidelity(enc, ref), **(tolerance or {})}, "run": {
        "seconds": seconds, "sellers": len(rows), "missing": valuation.missing, "rejected": valuation.rejected,
        "valuation_seconds": phase,
        "valuation_seconds_per_seller": phase / len(rows) if phase is not None and rows else None,
        "expected_best": market.expected_best, "top_by_score": top}}
    ids = [s for s in truth if s in by_id]
    if ids:
        m["validity"] = metrics.validity([by_id[s].total for s in ids], [truth[s].benefit for s in ids])
        m["run"]["top_by_benefit"] = max(ids, key=lambda s: truth[s].benefit)
    inputs = PayoutInputs.from_valuation(
        valuation, utility,
        # the benefit rule pays every seller, so it needs every seller's ground truth (not a sample's)
        benefits={s: truth[s].benefit for s in truth} if truth and len(truth) == len(valuation.sellers) else None,
    )
    pay_rows, comparison, reference = payouts.apply_payout_rules(config.payouts, inputs, seed=config.seed)
    m["payouts"] = {"reference": reference, "rules": comparison}
    if deciles:
        m["deciles"] = deciles
    manifest = {"market": market.info, "sellers": list(market.sellers), "valuation": valuation.manifest,
                "seeds": {"config": config.seed, "replicate": market.replicate, "projection": buyer.spec.seed},
                "projection_dim": buyer.spec.dim}
    truth_rows = [{"seller_id": s, "loss_before": b.loss_before, "loss_after": b.loss_after, "benefit": b.benefit}
                  for s, b in truth.items()]
    return Session(rows, manifest, m, samples, truth_rows, pay_rows)


def write_run(out: Path, config: SimulationConfig, scenario: str, sessions: list[Session], started: float,
              valuation: Valuation | None = None, extra: dict[str, Any] | None = None) -> RunResult:
    """Write a simulated run's files (pooled metrics over its sessions) and render its report."""
    m, per = run_metrics(sessions, runtime=config.runtime, seconds=time.perf_counter() - started, seed=config.seed,
                         extra=extra)
    manifest = {"scenario": scenario, "description": describe(config.scenario), "config": config.to_dict(),
                "versions": versions()}
    write_run_files(out, manifest, sessions, m, per)
    render_report(out)
    return RunResult(out, {**m, "sessions": [s.metrics for s in sessions]}, valuation)


def describe(scenario: str) -> str:
    """What the scenario simulates, in its own module's words (the docstring's opening paragraphs)."""
    builder = SCENARIOS.get(scenario)
    doc = inspect.getdoc(inspect.getmodule(builder)) if builder else None
    doc = re.sub(r":\w+:`", "`", re.sub(r"``", "`", doc or ""))  # Sphinx roles and literals as plain Markdown
    paras = [" ".join(p.split()).replace(" - **", "\n- **") for p in doc.split("\n\n")]
    return "\n\n".join(p for p in paras[:3] if p and not p.startswith("Scale mode"))
