"""The results directory of one settled session of a simulated market.

Manifest, valuations (encrypted and plaintext), per-sample scores, ground truth, metrics and
payouts, then the report; a replicated run writes one such directory per replicate.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulations.market import Market
from simulations.scenarios import TimedBuyer
from simulations.settings import SimulationConfig
from tip_fed import __version__
from tip_fed.market import metrics, payouts
from tip_fed.market.payouts import PayoutInputs, Utility
from tip_fed.market.report import render_report
from tip_fed.market.results import (
    GROUND_TRUTH_COLUMNS,
    PAYOUT_COLUMNS,
    SAMPLE_COLUMNS,
    VALUATION_COLUMNS,
    write_csv,
    write_json,
)
from tip_fed.protocol import Buyer, Valuation


@dataclass
class RunResult:
    """Where the results went and the headline metrics."""

    out_dir: Path
    metrics: dict[str, Any]
    valuation: Valuation | None  # None for replicated runs (one session per replicate)


def write_run(
    out: Path,
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
    render: bool = True,
) -> RunResult:
    """Write manifest, CSVs, metrics, payouts and report for one settled session.

    ``utility`` (coalition -> realised benefit, simulation only) enables the loo/shapley payouts;
    ``tolerance`` is what :func:`simulations.fidelity.check_session` passed the session with.
    """
    ranked = sorted(valuation.sellers, key=lambda v: v.total, reverse=True)
    rank = {v.seller_id: i + 1 for i, v in enumerate(ranked)}
    rows: list[dict[str, Any]] = [
        {
            "seller_id": v.seller_id, "n_samples": v.n_samples, "score": v.total,
            "score_plaintext": float(plain[v.seller_id].sum()), "mean_score": v.mean, "rank": rank[v.seller_id],
            "clipped": v.clipped, "commitment": v.commitment, "seconds": v.timings.get("total_s"),
        }
        for v in valuation.sellers
    ]
    write_csv(out / "valuations.csv", VALUATION_COLUMNS, rows)

    enc_all: list[float] = [r["score"] for r in rows]
    plain_all: list[float] = [r["score_plaintext"] for r in rows]
    samples: list[dict[str, Any]] = []
    for v in valuation.sellers:
        if v.per_sample is not None:
            for i, (e, p) in enumerate(zip(v.per_sample, plain[v.seller_id], strict=True)):
                samples.append(
                    {"seller_id": v.seller_id, "sample_index": i, "score": float(e), "score_plaintext": float(p)}
                )
    if samples:
        write_csv(out / "samples.csv", SAMPLE_COLUMNS, samples)
        enc_all += [s["score"] for s in samples]
        plain_all += [s["score_plaintext"] for s in samples]

    m: dict[str, Any] = {"fidelity": {**metrics.fidelity(enc_all, plain_all), **(tolerance or {})}}
    phase = buyer.valuation_seconds if isinstance(buyer, TimedBuyer) else None
    m["run"] = {
        "seconds": seconds,
        "sellers": len(valuation.sellers),
        "missing": valuation.missing,
        "valuation_seconds": phase,
        "valuation_seconds_per_seller": phase / len(valuation.sellers)
        if phase is not None and valuation.sellers
        else None,
        "rejected": valuation.rejected,
        "expected_best": market.expected_best,
        "top_by_score": ranked[0].seller_id if ranked else None,
    }
    if truth:
        truth_rows = [
            {"seller_id": sid, "loss_before": b.loss_before, "loss_after": b.loss_after, "benefit": b.benefit}
            for sid, b in truth.items()
        ]
        write_csv(out / "ground_truth.csv", GROUND_TRUTH_COLUMNS, truth_rows)
        by_id = valuation.by_id()
        ids = [sid for sid in truth if sid in by_id]
        m["validity"] = metrics.validity([by_id[s].total for s in ids], [truth[s].benefit for s in ids])
        m["run"]["top_by_benefit"] = max(ids, key=lambda s: truth[s].benefit) if ids else None
    inputs = PayoutInputs(
        seller_ids=[v.seller_id for v in valuation.sellers],
        scores={v.seller_id: v.total for v in valuation.sellers},
        n_records={v.seller_id: v.n_samples for v in valuation.sellers},
        utility=utility,
        # the benefit rule pays every seller, so it needs every seller's ground truth (not a sample's)
        benefits={s: truth[s].benefit for s in truth} if truth and len(truth) == len(valuation.sellers) else None,
    )
    pay_rows, comparison, reference = payouts.apply_payout_rules(config.payouts, inputs, seed=config.seed)
    write_csv(out / "payouts.csv", PAYOUT_COLUMNS, pay_rows)
    m["payouts"] = {"reference": reference, "rules": comparison}
    manifest = {
        "scenario": market.name,
        "config": config.to_dict(),
        "market": market.info,
        "sellers": list(market.sellers),
        "session": valuation.manifest,
        "seeds": {"config": config.seed, "replicate": market.replicate, "projection": buyer.spec.seed},
        "projection_dim": buyer.spec.dim,
        "versions": versions(),
    }
    write_json(out / "manifest.json", manifest)
    write_json(out / "metrics.json", m)
    if render:
        render_report(out)
    return RunResult(out, m, valuation)


def versions() -> dict[str, str]:
    """Versions of what computed the results, for the manifest."""
    return {
        "tip_fed": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "tenseal": _installed("tenseal"),
        "numpy": np.__version__,
    }


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
