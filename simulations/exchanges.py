"""The runtimes of ``tip-fed simulate``: one market session carried by each library driver.

An exchange gets the built market and its buyer and returns the settled valuation; every
runtime must give the same valuations for the same config. Seller data goes to files in a
:class:`~tip_fed.runtimes.PrivateRun` (deleted however the run ends) for the runtimes whose
sellers are separate processes or virtual nodes. The gRPC and Flower drivers are imported when
their runtime is chosen, so an in-process run loads neither grpcio nor Flower and Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from simulations.market import Market
from simulations.scenarios import SELLER_POLICY, max_samples, write_seller_files
from simulations.settings import SimulationConfig
from tip_fed.protocol import Buyer, Seller, Valuation
from tip_fed.runtimes.inprocess import value_inprocess
from tip_fed.runtimes.processes import PrivateRun

Exchange = Callable[[SimulationConfig, Market, Buyer, bool], Valuation]

#: ``tip-fed seller serve`` flags of a simulated seller: the counterpart of :data:`SELLER_POLICY`.
SERVE_ARGS = ("--exact-per-sample", "--max-exact", "-1", "--total-max-exact", "-1")


@contextmanager
def seller_files(market: Market, prefix: str) -> Iterator[tuple[PrivateRun, dict[str, Path]]]:
    """A private run holding every seller's data file (seller id -> file) for the duration of a block."""
    with PrivateRun(prefix) as run:
        yield run, write_seller_files(market, run.root / "sellers")


def exchange_inprocess(config: SimulationConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """Buyer and sellers as objects in this process, exchanging protobuf bytes."""
    sellers = {sid: Seller(sid, data, seed=config.seed + i, policy=SELLER_POLICY)
               for i, (sid, data) in enumerate(market.sellers.items())}
    return value_inprocess(buyer, sellers, max_samples(market), progress=progress)


def exchange_grpc(config: SimulationConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """Sellers as ``tip-fed seller serve`` processes on 127.0.0.1 over mutual TLS."""
    from tip_fed.runtimes.grpc_sellers import (  # grpcio only for this runtime
        local_seller_fleet,
        value_grpc,
    )

    with seller_files(market, "tip-fed-grpc-") as (run, files), local_seller_fleet(
        files, settings=config.grpc, query_budget=config.protocol.query_budget, seller_args=SERVE_ARGS, run=run,
        progress=progress,
    ) as fleet:
        return value_grpc(buyer, fleet.endpoints, fleet.tls, config.grpc, max_samples(market), progress=progress)


def exchange_flower_simulation(config: SimulationConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """Sellers as virtual Flower SuperNodes under Ray, each loading only its own data file."""
    from tip_fed.runtimes.flower_simulation import (
        value_flower_simulation,  # flwr only for this runtime
    )

    with seller_files(market, "tip-flower-sim-") as (run, files):
        return value_flower_simulation(buyer, files, max_samples(market), flower=config.flower, policy=SELLER_POLICY,
                                       progress=progress, run=run)


def exchange_flower_deployment(config: SimulationConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """A loopback SuperLink and one SuperNode per seller (TLS, node auth) running the scenario app.

    The ServerApp runs in Flower's own process and rebuilds the buyer from the same config and the
    market's replicate index, so ``buyer`` here is unused: only the settled valuation comes back.
    """
    from simulations.flower_apps import scenario_app  # flwr only for this runtime
    from tip_fed.runtimes.flower_deployment import value_flower_deployment

    with seller_files(market, "tip-flower-dep-") as (run, files):
        return value_flower_deployment(files, scenario_app(config, market.replicate or 0), flower=config.flower,
                                       exact_per_sample=True, progress=progress, run=run)


EXCHANGES: dict[str, Exchange] = {
    "inprocess": exchange_inprocess,
    "grpc": exchange_grpc,
    "flower-simulation": exchange_flower_simulation,
    "flower-deployment": exchange_flower_deployment,
}
