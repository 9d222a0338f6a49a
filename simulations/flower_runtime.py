"""The Flower runtimes of ``tip-fed simulate``: ``flower-simulation`` and ``flower-deployment``.

``flower-simulation`` runs the ServerApp (around the buyer already built) and one virtual
ClientApp per seller under Flower's Ray simulation engine, in this process; seller data goes to
disk first so each virtual SuperNode loads only its own file (memory stays bounded with
thousands of sellers). Flower starts the ServerApp while Ray is still booting its workers, and
each worker imports torch and TenSEAL on its first message, so before the Offer goes out the
buyer sends one no-op warm-up wave: Ray's start-up (a fixed cost) stays out of the valuation
phase and out of the first wave's ``flower.timeout-s``. ``flower-deployment`` starts a real SuperLink and one SuperNode per seller
on 127.0.0.1 with TLS and node authentication, runs the app with ``flwr run``, reads the buyer's
``valuation.json`` back and stops every process it started, also on failure and Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from tip_fed.config import TipConfig
from tip_fed.errors import TipError
from tip_fed.flower.client_app import make_client_app
from tip_fed.flower.server_app import Session, run_session, wait_for_nodes
from tip_fed.protocol import Buyer, Valuation
from tip_fed.protocol.data import save_dataset

from simulations.flower_apps import APP_DIR, VALUATION_FILE, partition_loader, run_config_overrides
from simulations.flower_deploy import LocalDeployment, flower_env
from simulations.market import Market
from simulations.processes import PrivateRun
from simulations.runner import max_samples

WARM_UP_ACTION = "warm_up"


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def export_market(market: Market, directory: Path) -> dict[str, Path]:
    """Each seller's data as ``directory/<seller_id>.safetensors``."""
    return {sid: save_dataset(data, directory / f"{sid}.safetensors") for sid, data in market.sellers.items()}


def warm_up(grid: Grid, session: Session) -> None:
    """One no-op message to each of the first ``wave_size`` sellers, so every Ray worker has started
    and loaded the ClientApp before the Offer goes out; replies (errors included) are dropped."""
    cfg = session.flower
    nodes = wait_for_nodes(grid, max(cfg.min_sellers, len(session.expected)), cfg.node_wait_s)[: cfg.wave_size]
    messages = [Message(content=RecordDict(), dst_node_id=n, message_type=f"query.{WARM_UP_ACTION}") for n in nodes]
    list(grid.send_and_receive(messages, timeout=cfg.timeout_s))


def _warm_up_reply(msg: Message, context: Context) -> Message:
    """The ClientApp's answer to a warm-up message: an empty reply."""
    return Message(RecordDict(), reply_to=msg)


def exchange_flower_simulation(config: TipConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """One session under ``flwr.simulation.run_simulation`` (Ray), one virtual SuperNode per seller."""
    from flwr.simulation import run_simulation  # pulls in Ray

    result: dict[str, Valuation] = {}
    session = Session(buyer, max_samples(market), list(market.sellers), config.flower)
    with PrivateRun("tip-flower-sim-") as run:  # seller data deleted even if this process is killed
        tmp = run.root
        export_market(market, Path(tmp) / "sellers")
        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            warm_up(grid, session)
            result["valuation"] = run_session(grid, session)

        client = make_client_app(partition_loader(Path(tmp) / "sellers"))
        client.query(WARM_UP_ACTION)(_warm_up_reply)
        backend = {
            "client_resources": {"num_cpus": config.flower.num_cpus, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": progress},
        }
        with _environment(flower_env(Path(tmp) / "flwr-home")):
            run_simulation(server, client, num_supernodes=len(market.sellers), backend_config=backend,
                           verbose_logging=False)
    if "valuation" not in result:
        raise TipError("the Flower simulation ended without a valuation; the ServerApp failed (see the log above)")
    return result["valuation"]


def exchange_flower_deployment(config: TipConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """One session over a real loopback deployment (TLS, SuperNode auth), driven by ``flwr run``.

    The ServerApp runs in Flower's own process and rebuilds the buyer from the same config and
    the market's replicate index, so ``buyer`` here is unused: only the settled valuation comes
    back, through ``valuation.json``. Keys, seller data and every Flower process live in a
    :class:`PrivateRun`: gone when this returns, fails, or this process is killed.
    """
    with PrivateRun("tip-flower-dep-") as run:
        root = run.root
        deployment = LocalDeployment(root, reaper=run.reaper)
        with deployment.group:
            deployment.up(export_market(market, root / "sellers"))
            return run_app(deployment, config, root / "result", replicate=market.replicate or 0, stream=progress)


def run_app(
    deployment: LocalDeployment, config: TipConfig, out_dir: Path, *, replicate: int = 0, stream: bool = False
) -> Valuation:
    """``flwr run`` the scenario app on ``deployment`` for market ``replicate`` and return the buyer's valuation."""
    overrides = ";".join(run_config_overrides(config))
    run_config = deployment.write_run_config(APP_DIR, out_dir, {"config": "", "set": overrides, "replicate": int(replicate)})
    timeout = config.flower.node_wait_s + config.flower.timeout_s * (1 + len(deployment.nodes) // config.flower.wave_size) + 300
    output = deployment.flwr("run", str(APP_DIR), "tip-local", "--stream", "--run-config", str(run_config),
                             timeout_s=timeout, cwd=APP_DIR)
    if stream:
        print(output)
    path = out_dir / VALUATION_FILE
    if not path.is_file():
        raise TipError(f"the Flower run wrote no {VALUATION_FILE}; its output ends with:\n{output[-3000:]}")
    return Valuation.from_dict(json.loads(path.read_text()))
