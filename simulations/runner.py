"""Run a market scenario end to end and write its results directory.

Steps: build the market; the buyer prepares its encrypted query; every seller answers the Offer;
the buyer settles; then, with the simulator's view of both sides, the plaintext reference and the
ground truth (fine-tuning on each seller's data) are computed and compared with what was decrypted.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tip_fed import __version__
from tip_fed.config import TipConfig
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows, scores as plain_scores
from tip_fed.errors import ConfigError
from tip_fed.market import metrics, payouts
from tip_fed.market.ground_truth import finetune_benefit
from tip_fed.market.report import render_report
from tip_fed.market.payouts import PayoutInputs, Utility
from tip_fed.market.results import (
    GROUND_TRUTH_COLUMNS, PAYOUT_COLUMNS, SAMPLE_COLUMNS, VALUATION_COLUMNS, write_csv, write_json,
)
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy, Valuation
from tip_fed.protocol.ledger import LedgerPolicy
from tip_fed.protocol.data import check_batch, iter_batches, save_dataset

from simulations import causal, healthcare, llm_corpus
from simulations.fidelity import check_session
from simulations.market import Market

# A builder returns one Market, or a list of Markets (one per replicate, each valued in its own session).
SCENARIOS: dict[str, Callable[[TipConfig], Market | list[Market]]] = {
    "causal": causal.build, "healthcare": healthcare.build, "llm_corpus": llm_corpus.build,
}

# A runtime carries one session: it gets the built market and buyer and returns the settled
# valuation. Every runtime must give the same valuations for the same config.
Exchange = Callable[[TipConfig, Market, Buyer, bool], Valuation]


@dataclass
class RunResult:
    """Where the results went and the headline metrics."""

    out_dir: Path
    metrics: dict[str, Any]
    valuation: Valuation | None  # None for replicated runs (one session per replicate)


def build_markets(config: TipConfig) -> Market | list[Market]:
    """Build the configured scenario: one market, or a list of replicate markets."""
    builder = SCENARIOS.get(config.scenario)
    if builder is None:
        raise ConfigError(f"unknown scenario {config.scenario!r}; available: {', '.join(sorted(SCENARIOS))}")
    return builder(config)


def build_market(config: TipConfig, replicate: int = 0) -> Market:
    """Build the configured scenario's market; for a replicated scenario, replicate ``replicate``'s.

    Every party that rebuilds a market from the config (a Flower ServerApp, a simulated ClientApp)
    must be told which replicate it is valuing, or it rebuilds replicate 0's buyer and sellers.
    """
    built = build_markets(config)
    markets = built if isinstance(built, list) else [built]
    if isinstance(replicate, bool) or not isinstance(replicate, int) or not 0 <= replicate < len(markets):
        raise ConfigError(
            f"replicate {replicate!r} does not exist: scenario {config.scenario!r} builds {len(markets)} "
            f"market(s) with this config; pass a replicate in 0..{len(markets) - 1}"
        )
    return markets[replicate]


def projection_seed(seed: int, replicate: int | None) -> int:
    """The buyer's projection seed: ``seed`` for a single market; for a replicate, one drawn from
    ``(seed, replicate)`` with numpy's SeedSequence, so replicates never share one projection."""
    if replicate is None:
        return seed
    state = np.random.SeedSequence(seed, spawn_key=(replicate,)).generate_state(1, np.uint64)
    return int(state[0]) >> 1  # projection seeds are at most 2**63 - 1


class TimedBuyer(Buyer):
    """A Buyer that notes when its Offer went out and when its last Reply was settled.

    That span is the valuation phase, the part of a run whose cost grows with the sellers; every
    runtime that drives this buyer object (all but ``flower-deployment``, which rebuilds the buyer in
    Flower's own process) gets it timed without the runtime knowing.
    """

    offered_at: float | None = None
    settled_at: float | None = None

    def offer(self, *args: Any, **kwargs: Any) -> bytes:
        data = super().offer(*args, **kwargs)
        self.offered_at, self.settled_at = time.perf_counter(), None
        return data

    def settle(self, *args: Any, **kwargs: Any) -> Valuation:
        valuation = super().settle(*args, **kwargs)
        self.settled_at = time.perf_counter()
        return valuation

    @property
    def valuation_seconds(self) -> float | None:
        """Seconds from the latest Offer to its settlement; None until both happened."""
        if self.offered_at is None or self.settled_at is None:
            return None
        return self.settled_at - self.offered_at


def make_buyer(market: Market, config: TipConfig) -> TimedBuyer:
    """The market's buyer with the run's settings, timing its valuation phase.

    Deterministic in (market, config): a runtime that rebuilds the buyer elsewhere gets this one.
    """
    settings = BuyerSettings(
        projection=config.projection,
        preconditioner=config.preconditioner,
        crypto=config.crypto,
        protocol=config.protocol,
        seed=projection_seed(config.seed, market.replicate),
    )
    return TimedBuyer(market.model, market.task, market.objective, market.train, settings)


def max_samples(market: Market) -> int:
    """Largest seller in the market: the Offer's ``max_samples``."""
    return max(check_batch(d) for d in market.sellers.values())


def exchange_inprocess(config: TipConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """Buyer and sellers as objects in this process, exchanging protobuf bytes."""
    offer = buyer.offer(max_samples=max_samples(market))
    # a simulation's sellers hold no one's private data and answer one query each: exact per-sample
    # scores are allowed, and any per-query epsilon (the lifetime ledger is a deployment control)
    policy = SellerPolicy(exact_per_sample=True, lifetime=LedgerPolicy(epsilon=1e6, total_epsilon=1e6, max_exact=None,
                                                                       total_max_exact=None))
    sellers = [Seller(sid, data, seed=config.seed + i, policy=policy) for i, (sid, data) in enumerate(market.sellers.items())]
    replies = [s.respond(offer) for s in tqdm(sellers, desc="sellers", leave=False, disable=not progress)]
    return buyer.settle(replies, expected=list(market.sellers))


def exchange_grpc(config: TipConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """Sellers as ``tip-fed seller serve`` processes on 127.0.0.1 over mTLS (see simulations/grpc_runtime.py)."""
    from simulations.grpc_runtime import exchange_grpc as run_grpc  # grpcio is loaded only for this runtime

    return run_grpc(config, market, buyer, progress)


def exchange_flower_simulation(config: TipConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """Sellers as virtual Flower SuperNodes under Ray (see simulations/flower_runtime.py)."""
    from simulations.flower_runtime import exchange_flower_simulation as run  # flwr is loaded only for this runtime

    return run(config, market, buyer, progress)


def exchange_flower_deployment(config: TipConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """A loopback SuperLink and one SuperNode per seller, TLS and node auth (see simulations/flower_runtime.py)."""
    from simulations.flower_runtime import exchange_flower_deployment as run

    return run(config, market, buyer, progress)


EXCHANGES: dict[str, Exchange] = {
    "inprocess": exchange_inprocess,
    "grpc": exchange_grpc,
    "flower-simulation": exchange_flower_simulation,
    "flower-deployment": exchange_flower_deployment,
}


def export_sellers(config: TipConfig, out_dir: str | Path, replicate: int = 0) -> list[Path]:
    """Write every seller's private data of the scenario (its ``replicate``-th market, for a replicated
    one) to ``out_dir/<seller_id>.safetensors``.

    This is how a simulated market is turned into separate seller processes (gRPC services or
    Flower SuperNodes), each given only its own file; the buyer must be told the same replicate.
    """
    return list(write_seller_files(build_market(config, replicate), out_dir).values())


def write_seller_files(market: Market, out_dir: str | Path) -> dict[str, Path]:
    """Each seller's data as ``out_dir/<seller_id>.safetensors``, keyed by seller id."""
    out = Path(out_dir)
    return {sid: save_dataset(data, out / f"{sid}.safetensors") for sid, data in market.sellers.items()}


def plaintext_reference(buyer: Buyer, market: Market, seller_id: str) -> np.ndarray:
    """Per-sample plaintext scores of one seller (clipped exactly as the seller clips)."""
    grads = torch.cat(
        [projected_grads(market.model, buyer.spec, market.task, b) for b in iter_batches(market.sellers[seller_id], 64)]
    ).double()
    clipped, _ = clip_rows(grads, buyer.grad_norm_bound)
    return plain_scores(buyer.query, clipped).numpy()


def run_scenario(config: TipConfig, out_dir: str | Path, *, progress: bool = True) -> RunResult:
    """Run the configured scenario in-process and write every result file into ``out_dir``."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    bar = tqdm(total=4, desc="tip-fed", disable=not progress, unit="phase")
    bar.set_postfix_str("building market and buyer")
    built = build_markets(config)
    if isinstance(built, list):
        bar.close()
        from simulations.replicates import run_replicated

        return run_replicated(config, built, out, progress=progress, started=t0)
    market = built
    buyer = make_buyer(market, config)
    bar.update()

    bar.set_postfix_str(f"sellers scoring under encryption ({config.runtime})")
    valuation = EXCHANGES[config.runtime](config, market, buyer, progress)
    bar.update()

    bar.set_postfix_str("plaintext reference and ground truth")
    plain = {v.seller_id: plaintext_reference(buyer, market, v.seller_id) for v in valuation.sellers}
    tolerance = check_session(buyer, valuation, plain)
    truth = {}
    if config.ground_truth.enabled:
        gt = config.ground_truth
        for i, sid in enumerate(tqdm(list(plain), desc="fine-tuning", leave=False, disable=not progress)):
            truth[sid] = finetune_benefit(
                market.model, market.task, market.sellers[sid], market.objective,
                lr=gt.lr, epochs=gt.epochs, batch_size=gt.batch_size, seed=config.seed + i, layers=gt.layers,
            )
    bar.update()

    bar.set_postfix_str("writing results")
    result = write_run(out, config, market, buyer, valuation, plain, truth, time.perf_counter() - t0, tolerance=tolerance)
    bar.update()
    bar.close()
    return result


def write_run(
    out: Path,
    config: TipConfig,
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
    rows = [
        {
            "seller_id": v.seller_id, "n_samples": v.n_samples, "score": v.total,
            "score_plaintext": float(plain[v.seller_id].sum()), "mean_score": v.mean, "rank": rank[v.seller_id],
            "clipped": v.clipped, "commitment": v.commitment, "seconds": v.timings.get("total_s"),
        }
        for v in valuation.sellers
    ]
    write_csv(out / "valuations.csv", VALUATION_COLUMNS, rows)

    enc_all = [r["score"] for r in rows]
    plain_all = [r["score_plaintext"] for r in rows]
    samples = []
    for v in valuation.sellers:
        if v.per_sample is not None:
            for i, (e, p) in enumerate(zip(v.per_sample, plain[v.seller_id], strict=True)):
                samples.append({"seller_id": v.seller_id, "sample_index": i, "score": float(e), "score_plaintext": float(p)})
    if samples:
        write_csv(out / "samples.csv", SAMPLE_COLUMNS, samples)
        enc_all += [s["score"] for s in samples]
        plain_all += [s["score_plaintext"] for s in samples]

    m: dict[str, Any] = {"fidelity": {**metrics.fidelity(enc_all, plain_all), **(tolerance or {})}}
    phase = buyer.valuation_seconds if isinstance(buyer, TimedBuyer) else None
    m["run"] = {
        "seconds": seconds, "sellers": len(valuation.sellers), "missing": valuation.missing,
        "valuation_seconds": phase,
        "valuation_seconds_per_seller": phase / len(valuation.sellers) if phase is not None and valuation.sellers else None,
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
        seller_ids=[v.seller_id for v in valuation.sellers], scores={v.seller_id: v.total for v in valuation.sellers},
        n_records={v.seller_id: v.n_samples for v in valuation.sellers}, utility=utility,
        benefits={s: truth[s].benefit for s in truth} if truth else None,
    )
    pay_rows, comparison, reference = payouts.settle(config.payouts, inputs, seed=config.seed)
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
        "versions": _versions(),
    }
    write_json(out / "manifest.json", manifest)
    write_json(out / "metrics.json", m)
    if render:
        render_report(out)
    return RunResult(out, m, valuation)


def _versions() -> dict[str, str]:
    import tenseal

    return {
        "tip_fed": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "tenseal": getattr(tenseal, "__version__", "?"),
        "numpy": np.__version__,
    }
