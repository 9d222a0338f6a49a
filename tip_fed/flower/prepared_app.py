"""The Flower App of a buyer of its own: a prepared query valued against seller SuperNodes.

``flwr run`` loads these components from the app directory :data:`APP_DIR` (a ``pyproject.toml``
shipped inside tip_fed, whose ``[tool.flwr.app.components]`` point here; the code itself comes
from the installed tip_fed, which every SuperLink and SuperNode environment must have).

The ServerApp (buyer) loads the query ``tip-fed buyer prepare`` saved (run config
``prepared-dir``, a path on the SuperLink's host, where Flower runs the ServerApp), values every
seller node bound in ``sellers`` and writes the settled valuation to ``out-dir``
(:func:`~tip_fed.flower.runs.write_valuation`). The ClientApp (seller) is the stock one: its data
file, seller id and ``[seller]`` settings (privacy ledger, noise, exact-answer caps) come from the SuperNode's own
``--node-config`` (:func:`~tip_fed.flower.client_app.seller_from_node_config`), never from the buyer.

Run config (every key has a default, so overrides may name only what they change):
``prepared-dir``, ``max-samples`` (the Offer's bound on records per seller), ``out-dir``,
``sellers`` (``seller-id=node-id,...`` of the registered SuperNode keys; a reply counts only from
the node registered for its seller id), ``app-signature`` (read by the sellers' guard,
:mod:`tip_fed.flower.trust`) and the ``[flower]`` settings ``timeout-s``, ``node-wait-s``,
``wave-size``, ``min-sellers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tip_fed.config import FlowerConfig
from tip_fed.errors import ConfigError
from tip_fed.flower.client_app import make_client_app, seller_from_node_config
from tip_fed.flower.runs import OUT_DIR, show_logs, write_valuation
from tip_fed.flower.server_app import Session, make_server_app, parse_bindings
from tip_fed.protocol import Buyer, PreparedQuery, Valuation

if TYPE_CHECKING:
    from flwr.app import Context

APP_DIR = Path(__file__).resolve().parent / "app"
PREPARED_DIR = "prepared-dir"
MAX_SAMPLES = "max-samples"
SELLERS = "sellers"
#: run-config key -> FlowerConfig field
FLOWER_KEYS = {"timeout-s": "timeout_s", "node-wait-s": "node_wait_s", "wave-size": "wave_size",
               "min-sellers": "min_sellers"}


def run_config(prepared_dir: str | Path, max_samples: int,
               flower: FlowerConfig | None = None) -> dict[str, str | int | float | bool]:
    """The run-config values of one valuation (``out-dir``, ``sellers`` and the signature are the deployment's)."""
    flower = flower or FlowerConfig()
    return {PREPARED_DIR: str(Path(prepared_dir).resolve()), MAX_SAMPLES: int(max_samples),
            **{key: getattr(flower, field) for key, field in FLOWER_KEYS.items()}}


def session_from_context(context: Context) -> Session:
    """The session a run config describes: the saved query, its seller nodes and the Flower settings."""
    show_logs()
    cfg = context.run_config
    directory = cfg.get(PREPARED_DIR, "")
    if not isinstance(directory, str) or not directory:
        raise ConfigError(f"the run config has no '{PREPARED_DIR}': give the directory 'tip-fed buyer prepare' wrote "
                          "(a path on the SuperLink's host)")
    limit = cfg.get(MAX_SAMPLES, 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"run config '{MAX_SAMPLES}' must be an integer >= 1 (the largest seller's record count), "
                          f"got {limit!r}")
    settings: dict[str, float] = {}
    for key, field in FLOWER_KEYS.items():
        value = cfg.get(key, getattr(FlowerConfig, field))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run config '{key}' must be a number, got {value!r}")
        settings[field] = value
    flower = FlowerConfig(timeout_s=settings["timeout_s"], node_wait_s=settings["node_wait_s"],
                          wave_size=int(settings["wave_size"]), min_sellers=int(settings["min_sellers"]))
    nodes = parse_bindings(str(cfg.get(SELLERS, "")))
    if not isinstance(cfg.get(OUT_DIR), str) or not cfg.get(OUT_DIR):
        raise ConfigError(f"the run config has no '{OUT_DIR}': where should the ServerApp write the valuation?")
    buyer = Buyer.from_prepared(PreparedQuery.load(directory))
    return Session(buyer, limit, list(nodes), flower, nodes=nodes)


def _write(valuation: Valuation, context: Context) -> None:
    write_valuation(valuation, context)


server_app = make_server_app(session_from_context, _write)
client_app = make_client_app(seller_from_node_config)
