"""Scenario-bound Flower apps, the components ``flwr run .`` loads (see ``[tool.flwr.app]``).

The ServerApp (buyer) rebuilds the scenario's market and buyer from the run config (the
``replicate`` key says which of a replicated scenario's markets) and writes ``valuation.json``
into ``out-dir``. The ClientApp (seller) finds its private data by
``--node-config data-path=...`` (deployment: one SuperNode per seller file); in a simulation, by
its ``partition-id``, in ``data-dir`` (files from ``tip-fed export-sellers``) or, when that is
empty, in the run config's replicate of the scenario rebuilt locally.

Run config (every key has a default, since ``run_simulation`` passes an empty one):
``config`` (TOML path, relative to the app directory; "" = built-in defaults), ``set``
(``key=value`` overrides separated by ``;``, as ``tip-fed simulate --set``), ``replicate`` (which
market of a replicated scenario, 0 for a single-market one), ``out-dir``, ``data-dir``,
``sellers`` (deployment: ``seller-id=node-id,...`` of the registered SuperNode keys; the buyer counts
a reply only from the node registered for its seller id) and ``app-signature`` (read by the
sellers' guard, :mod:`tip_fed.flower.trust`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from simulations.market import Market
from simulations.scenarios import SELLER_POLICY, build_market, make_buyer, max_samples
from simulations.settings import SimulationConfig, load_config
from tip_fed.errors import ConfigError
from tip_fed.flower.client_app import (
    DATA_PATH,
    SellerLoader,
    make_client_app,
    seller_from_node_config,
)
from tip_fed.flower.runs import files_loader, show_logs, write_valuation
from tip_fed.flower.server_app import Session, make_server_app, parse_bindings
from tip_fed.protocol import Seller
from tip_fed.runtimes.flower_deployment import FlowerApp

if TYPE_CHECKING:  # only tip_fed.flower imports flwr; a Context is all this module reads
    from flwr.app import Context

APP_DIR = Path(__file__).resolve().parents[1]
DEFAULTS = {"config": "configs/causal.toml", "set": "", "replicate": 0, "out-dir": "out/flower", "data-dir": "",
            "sellers": "", "app-signature": ""}


def _get(context: Context, key: str) -> str:
    return str(context.run_config.get(key, DEFAULTS[key]))


def run_config_overrides(config: SimulationConfig) -> list[str]:
    """``key=value`` overrides that rebuild exactly ``config`` from defaults (None values are defaults)."""
    def walk(prefix: str, node: object) -> list[str]:
        if isinstance(node, dict):
            return [item for k, v in node.items() for item in walk(f"{prefix}{k}.", v) if v is not None]
        return [f"{prefix[:-1]}={json.dumps(node)}"]

    return walk("", config.to_dict())


def config_from_context(context: Context) -> SimulationConfig:
    """The SimulationConfig a run config describes (``config`` file plus ``set`` overrides)."""
    path = _get(context, "config")
    overrides = [item.strip() for item in _get(context, "set").split(";") if item.strip()]
    return _load(path, tuple(overrides))


@functools.lru_cache(maxsize=4)
def _load(path: str, overrides: tuple[str, ...]) -> SimulationConfig:
    full = None if not path else (Path(path) if Path(path).is_absolute() else APP_DIR / path)
    return load_config(full, overrides)


def replicate_from_context(context: Context) -> int:
    """The run config's ``replicate``: which market of a replicated scenario this run values."""
    value = context.run_config.get("replicate", DEFAULTS["replicate"])
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"run config 'replicate' must be an integer >= 0, got {value!r}")
    return value


@functools.lru_cache(maxsize=2)
def _market(config: SimulationConfig, replicate: int) -> Market:
    """One market per process, config and replicate: simulated ClientApps share a worker process."""
    return build_market(config, replicate)


def _session(context: Context) -> Session:
    show_logs()
    config = config_from_context(context)
    market = _market(config, replicate_from_context(context))
    return Session(make_buyer(market, config), max_samples(market), list(market.sellers), config.flower,
                   nodes=parse_bindings(_get(context, "sellers")))


def scenario_app(config: SimulationConfig, replicate: int = 0) -> FlowerApp:
    """This app, with a run config that rebuilds exactly ``config``'s market ``replicate`` and its buyer."""
    return FlowerApp(
        APP_DIR, {"config": "", "set": ";".join(run_config_overrides(config)), "replicate": int(replicate)}
    )


def partition_loader(data_dir: str | Path | None) -> SellerLoader:
    """Seller loader for simulated nodes: the ``partition-id``-th seller file (sorted) in ``data_dir``.

    With ``data_dir`` None the run config's ``data-dir`` is used, and when that is empty too, the
    scenario is rebuilt in the worker. Nodes started with ``data-path`` always use their own file.
    """

    def load(context: Context, answered: dict[str, int]) -> Seller:
        if DATA_PATH in context.node_config:
            return seller_from_node_config(context, answered)
        directory = str(data_dir) if data_dir is not None else _get(context, "data-dir")
        if directory:
            files = {p.stem: p for p in sorted(Path(directory).glob("*.safetensors"))}
            return files_loader(files, SELLER_POLICY)(context, answered)
        index = context.node_config.get("partition-id")
        if not isinstance(index, int):
            raise ConfigError("this node has neither 'data-path' nor 'partition-id' in its node config")
        sellers = _market(config_from_context(context), replicate_from_context(context)).sellers
        if index >= len(sellers):
            raise ConfigError(f"partition {index} has no seller: the scenario has {len(sellers)} sellers")
        seller_id = list(sellers)[index]
        return Seller(seller_id, sellers[seller_id], answered=answered, policy=SELLER_POLICY)

    return load


server_app = make_server_app(_session, write_valuation)
client_app = make_client_app(partition_loader(None))
