"""A scenario's market and buyer, built deterministically from the config.

Every party that rebuilds a market from the config (the in-process run, a Flower ServerApp in
its own process, a simulated ClientApp in a Ray worker) calls :func:`build_market` and
:func:`make_buyer` here, so all of them value the same buyer against the same sellers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulations import causal, healthcare, llm_corpus
from simulations.market import Market
from simulations.settings import SimulationConfig
from tip_fed.core.influence import clip_rows
from tip_fed.core.influence import scores as plain_scores
from tip_fed.errors import ConfigError
from tip_fed.protocol import Buyer, SellerPolicy, Valuation
from tip_fed.protocol.data import Batch, check_batch, dataset_gradients, save_dataset
from tip_fed.protocol.ledger import LedgerPolicy

# A builder returns one Market, or a list of Markets (one per replicate, each valued in its own session).
SCENARIOS: dict[str, Callable[[SimulationConfig], Market | list[Market]]] = {
    "causal": causal.build, "healthcare": healthcare.build, "llm_corpus": llm_corpus.build,
}

#: A simulation's sellers hold no one's private data and answer one query each: exact per-sample
#: scores are allowed, and any per-query epsilon (the lifetime ledger is a deployment control). Their
#: Offers always carry the weights (in-process, Flower simulation): no model cache to fill.
SELLER_POLICY = SellerPolicy(exact_per_sample=True, model_cache_mb=0, lifetime=LedgerPolicy(
    epsilon=1e6, total_epsilon=1e6, max_exact=None, total_max_exact=None))


def build_markets(config: SimulationConfig) -> Market | list[Market]:
    """Build the configured scenario: one market, or a list of replicate markets."""
    builder = SCENARIOS.get(config.scenario)
    if builder is None:
        raise ConfigError(f"unknown scenario {config.scenario!r}; available: {', '.join(sorted(SCENARIOS))}")
    return builder(config)


def build_market(config: SimulationConfig, replicate: int = 0) -> Market:
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


def make_buyer(market: Market, config: SimulationConfig) -> TimedBuyer:
    """The market's buyer with the run's settings, timing its valuation phase.

    Deterministic in (market, config): a runtime that rebuilds the buyer elsewhere gets this one.
    """
    settings = config.buyer_settings(seed=projection_seed(config.seed, market.replicate))
    return TimedBuyer(market.model, market.task, market.objective, market.train, settings)


def max_samples(market: Market) -> int:
    """Largest seller in the market: the Offer's ``max_samples``."""
    return max(check_batch(d) for d in market.sellers.values())


def write_seller_files(market: Market, out_dir: str | Path) -> dict[str, Path]:
    """Each seller's data as ``out_dir/<seller_id>.safetensors``, keyed by seller id."""
    out = Path(out_dir)
    return {sid: save_dataset(data, out / f"{sid}.safetensors") for sid, data in market.sellers.items()}


def export_sellers(config: SimulationConfig, out_dir: str | Path, replicate: int = 0) -> list[Path]:
    """Write every seller's private data of the scenario (its ``replicate``-th market, for a replicated
    one) to ``out_dir/<seller_id>.safetensors``.

    This is how a simulated market is turned into separate seller processes (gRPC services or
    Flower SuperNodes), each given only its own file; the buyer must be told the same replicate.
    """
    return list(write_seller_files(build_market(config, replicate), out_dir).values())


def seller_gradients(buyer: Buyer, market: Market, data: Batch) -> torch.Tensor:
    """Float64 per-sample gradients of ``data`` under the buyer's projection: the simulator's plaintext view."""
    return dataset_gradients(market.model, buyer.spec, market.task, data, 64)


def plaintext_reference(buyer: Buyer, market: Market, seller_id: str, grads: torch.Tensor | None = None) -> np.ndarray:
    """Per-sample plaintext scores of one seller (clipped exactly as the seller clips); ``grads`` are
    its :func:`seller_gradients` when already computed."""
    if grads is None:
        grads = seller_gradients(buyer, market, market.sellers[seller_id])
    clipped, _ = clip_rows(grads, buyer.grad_norm_bound)
    return plain_scores(buyer.query, clipped).numpy()
