"""How a host process gets one valuation out of Flower: a Ray simulation here, or a ``flwr run``'s file.

``simulate_session`` runs the buyer's ServerApp around a buyer object already built in this
process, and one virtual ClientApp per seller data file, under Flower's Ray simulation engine.
Flower starts the ServerApp while Ray is still booting its workers, and each worker imports torch
and TenSEAL on its first message, so before the Offer goes out the buyer sends one no-op warm-up
wave: Ray's start-up (a fixed cost) stays out of the valuation phase and out of the first wave's
``flower.timeout-s``.

In a deployment the ServerApp runs in Flower's own process; it hands its valuation back to
whoever started ``flwr run`` as :data:`VALUATION_FILE` in the run config's ``out-dir``
(:func:`write_valuation`, the ``on_done`` hook of :func:`~tip_fed.flower.server_app.make_server_app`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecordValues, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from tip_fed.config import FlowerConfig
from tip_fed.console import count, phase, quiet_third_party
from tip_fed.errors import ConfigError, TipError
from tip_fed.files import write_private
from tip_fed.flower.client_app import (
    DATA_PATH,
    SellerLoader,
    make_client_app,
    seller_from_node_config,
)
from tip_fed.flower.server_app import Session, exchange, run_session, wait_for_nodes
from tip_fed.protocol import Seller, SellerPolicy, Valuation
from tip_fed.protocol.records import load_seller_data

WARM_UP_ACTION = "warm_up"
VALUATION_FILE = "valuation.json"
OUT_DIR = "out-dir"


def warm_up(grid: Grid, session: Session, *, progress: bool = False) -> None:
    """One no-op message to each of the first ``wave_size`` sellers, so every Ray worker has started
    and loaded the ClientApp before the Offer goes out; replies (errors included) are counted, then dropped."""
    cfg = session.flower
    nodes = wait_for_nodes(grid, max(cfg.min_sellers, len(session.expected)), cfg.node_wait_s)[: cfg.wave_size]
    with count("virtual SuperNodes warmed up", len(nodes), enabled=progress) as warmed:
        for _ in exchange(grid, nodes, RecordDict(), cfg, message_type=f"query.{WARM_UP_ACTION}"):
            warmed.update()


def _warm_up_reply(msg: Message, context: Context) -> Message:
    """The ClientApp's answer to a warm-up message: an empty reply."""
    return Message(RecordDict(), reply_to=msg)


def files_loader(files: Mapping[str, Path], policy: SellerPolicy, ledger_dir: Path | None = None) -> SellerLoader:
    """Seller loader for simulated nodes: node ``partition-id`` i is the i-th seller of ``files``
    (seller id -> data file: tensors or raw records), answering under ``policy``. A ClientApp's memory
    does not outlive its message, so unless ``policy.ledger`` names a file, each seller keeps its ledger
    in ``ledger_dir``/<seller id>.json (in memory, per message, without one). Nodes started with
    ``data-path`` use their own file."""
    sellers = list(files.items())

    def load(context: Context, answered: dict[str, int]) -> Seller:
        if DATA_PATH in context.node_config:
            return seller_from_node_config(context, answered)
        index = context.node_config.get("partition-id")
        if not isinstance(index, int) or not 0 <= index < len(sellers):
            raise ConfigError(f"node partition {index!r} has no seller file: the simulation has {len(sellers)}")
        seller_id, path = sellers[index]
        own = policy
        if not policy.ledger and ledger_dir is not None:
            own = replace(policy, ledger=str(ledger_dir / f"{seller_id}.json"))
        return Seller(seller_id, load_seller_data(path), answered=answered, policy=own)

    return load


def simulate_session(session: Session, loader: SellerLoader, num_sellers: int, *, progress: bool = False) -> Valuation:
    """One session under ``flwr.simulation.run_simulation`` (Ray), ``num_sellers`` virtual SuperNodes
    whose sellers ``loader`` builds; the caller sets Flower's environment (FLWR_HOME)."""
    from flwr.simulation import (
        run_simulation,  # pulls in Ray: loaded only when a simulation runs
    )

    result: dict[str, Valuation] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        phase(f"{num_sellers} virtual SuperNodes under Ray: workers starting (warm-up wave)", enabled=progress)
        warm_up(grid, session, progress=progress)
        phase(f"the Offer out, at most {session.flower.wave_size} sellers at a time", enabled=progress)
        result["valuation"] = run_session(grid, replace(session, progress=progress))

    client = make_client_app(loader)
    client.query(WARM_UP_ACTION)(_warm_up_reply)
    cfg: FlowerConfig = session.flower
    backend: dict[str, dict[str, ConfigRecordValues]] = {
        "client_resources": {"num_cpus": cfg.num_cpus, "num_gpus": 0.0},
        "init_args": {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False},
    }
    quiet_third_party()
    phase("starting Ray and Flower's simulation engine", enabled=progress)
    run_simulation(server, client, num_supernodes=num_sellers, backend_config=backend, verbose_logging=False)
    if "valuation" not in result:
        raise TipError("the Flower simulation ended without a valuation; the ServerApp failed (see the log above)")
    return result["valuation"]


def show_logs() -> None:
    """Let tip_fed's INFO lines reach ``flwr run --stream`` / ``flwr log`` (Flower configures only its own logger)."""
    package = logging.getLogger("tip_fed")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def write_valuation(valuation: Valuation, context: Context) -> Path:
    """Write the settled valuation to the run config's ``out-dir``/:data:`VALUATION_FILE` for the host."""
    out = context.run_config.get(OUT_DIR)
    if not isinstance(out, str) or not out:
        raise ConfigError(f"the run config has no '{OUT_DIR}': where should the ServerApp write {VALUATION_FILE}?")
    path = Path(out).resolve() / VALUATION_FILE
    write_private(path, json.dumps(valuation.to_dict(), indent=2) + "\n")  # the buyer's private result
    logging.getLogger("tip_fed").info("valuation of %d sellers written to %s", len(valuation.sellers), path)
    return path
