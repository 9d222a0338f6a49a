"""The seller as a Flower ClientApp: answer each ``query.value`` Offer with a Reply.

Flower recreates a ClientApp for every message (a deployed SuperNode even starts a new
``flwr-clientapp`` process per message), so nothing lives on the app object or in memory: the
seller is loaded afresh from the node's own data and settings (``context.node_config``), the
per-session query budget is kept in ``context.state``, and the per-buyer privacy ledger in a file.

The node config takes the same seller settings as ``tip-fed seller serve``: every ``[seller]`` key
(``ledger``, ``dp-epsilon``, ``max-exact``, ``exact-per-sample``, ...), every ``[seller-budget]`` key
as ``seller-budget.<key>``, and ``config`` naming a TOML file whose ``[seller]`` and
``[seller-budget]`` tables are read first (node-config keys win, as flags do over ``--config``). One
path, :meth:`SellerPolicy.from_config`, turns them into the policy. The node config may itself be
that TOML file (``--node-config node.toml``: ``data-path`` and the other node keys at the top, then
the ``[seller]`` and ``[seller-budget]`` tables). Unknown keys are refused: a mistyped
``max-exact`` must not silently leave the default in force.

The ledger is what makes the lifetime caps (``max-exact``, ``lifetime-epsilon``, ...) bind across
messages, sessions and restarts, so a Flower seller always keeps one on disk: the ``ledger`` file
when set, else ``<data file>.ledger.json`` beside the data it accounts for. An in-memory ledger
would be new for every message, and every new session would get its exact answer.

A :class:`TipError` (bad offer, spent budget, missing data) becomes an error reply carrying its
message, so the buyer can list the seller under ``rejected``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from tip_fed.config import SellerBudgetConfig, SellerConfig, config_from_dict, load_config
from tip_fed.errors import ConfigError, TipError
from tip_fed.flower import records
from tip_fed.flower.trust import PUBLISHERS
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.records import load_seller_data
from tip_fed.toml_files import keys_of

logger = logging.getLogger(__name__)

SellerLoader = Callable[[Context, dict[str, int]], Seller]
"""Builds this node's seller; the dict is the session budget to hand to ``Seller(answered=...)``."""

DATA_PATH = "data-path"
SELLER_ID = "seller-id"
# Comma-separated fields of raw records this node sells (default: every field of its file).
FIELDS = "fields"
# A TOML file whose [seller] and [seller-budget] tables this node answers under.
CONFIG = "config"
SELLER_PREFIX = "seller."
BUDGET_PREFIX = "seller-budget."
#: Keys Flower's simulation gives every virtual node.
FLOWER_KEYS = ("partition-id", "num-partitions")


def node_settings(node_config: Mapping[str, Any]) -> tuple[SellerConfig, SellerBudgetConfig]:
    """The ``[seller]`` and ``[seller-budget]`` settings of a node config (over its ``config`` file).

    A ``[seller]`` key may also come as ``seller.<key>``: what Flower makes of a ``[seller]`` table
    when the node config is a TOML file (``--node-config node.toml``, flattened with dots)."""
    seller_keys, budget_keys = keys_of(SellerConfig), keys_of(SellerBudgetConfig)
    twice = sorted(k for k in node_config if k.startswith(SELLER_PREFIX) and k[len(SELLER_PREFIX):] in node_config)
    if twice:
        raise ConfigError(f"node config sets {', '.join(map(repr, twice))} and the same key without 'seller.'; "
                          "keep one")
    node_config = {k.removeprefix(SELLER_PREFIX): v for k, v in node_config.items()}
    own = (DATA_PATH, SELLER_ID, FIELDS, CONFIG, PUBLISHERS, *FLOWER_KEYS)
    unknown = sorted(k for k in node_config if k not in own and k not in seller_keys
                     and not (k.startswith(BUDGET_PREFIX) and k[len(BUDGET_PREFIX):] in budget_keys))
    if unknown:
        raise ConfigError(
            f"node config key(s) {', '.join(map(repr, unknown))} unknown; a seller SuperNode takes {', '.join(own)}, "
            f"the [seller] settings ({', '.join(seller_keys)}) and {BUDGET_PREFIX}<key> for [seller-budget] "
            "(tip-fed settings lists them)"
        )
    path = node_config.get(CONFIG)
    if path is not None and not (isinstance(path, str) and path):
        raise ConfigError(f"node config '{CONFIG}' must be the path of a TOML file with [seller] tables, got {path!r}")
    base = load_config(path).to_dict() if path else {}
    seller = {**base.get("seller", {}), **{k: v for k, v in node_config.items() if k in seller_keys}}
    budget = {**base.get("seller-budget", {}),
              **{k[len(BUDGET_PREFIX):]: v for k, v in node_config.items() if k.startswith(BUDGET_PREFIX)}}
    try:
        cfg = config_from_dict({"seller": seller, "seller-budget": budget})
    except ConfigError as exc:  # name the node-config key ([seller] keys go without their section)
        where = f"node config (over {path})" if path else "node config"
        raise ConfigError(f"{where}: {str(exc).replace('seller.', '')}") from None
    return cfg.seller, cfg.seller_budget


def policy_from_node_config(node_config: Mapping[str, Any], data_path: str | Path) -> SellerPolicy:
    """The policy a seller SuperNode answers under: its settings through :meth:`SellerPolicy.from_config`,
    with the two choices a process-per-message seller makes: the ledger is a file (``ledger``, else beside
    the data, :meth:`SellerPolicy.beside`), and models are cached only in ``model-cache-dir`` (memory dies
    with the message)."""
    config, budget = node_settings(node_config)
    policy = SellerPolicy.from_config(config, budget).beside(data_path)
    return dataclasses.replace(policy, model_cache_mb=config.model_cache_mb if config.model_cache_dir else 0)


def seller_from_node_config(context: Context, answered: dict[str, int]) -> Seller:
    """Seller from ``--node-config "data-path=... [seller-id=...] [fields='a,b,c'] [config=seller.toml]
    [<seller setting>=... ...]"``: a safetensors dataset, or raw records (.csv, .parquet, .jsonl, .txt)
    the buyer's input format encodes, restricted to ``fields`` when given (otherwise a buyer's
    format may read every field of the file), answering under :func:`policy_from_node_config`.

    The seller id defaults to the data file's stem, as written by ``tip-fed export-sellers``.
    Per-sample scores without noise are released only when the settings say so (``exact-per-sample``).
    """
    path = context.node_config.get(DATA_PATH)
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"this SuperNode has no '{DATA_PATH}' in its node config; start it with "
            f"--node-config \"{DATA_PATH}=/path/to/seller.safetensors\""
        )
    seller_id = context.node_config.get(SELLER_ID) or Path(path).stem
    fields = context.node_config.get(FIELDS)
    if fields is not None and not isinstance(fields, str):
        raise ConfigError(f"node config '{FIELDS}' must be comma-separated field names, e.g. "
                          f"{FIELDS}='age,bmi,diagnosis', got {fields!r}")
    policy = policy_from_node_config(context.node_config, path)
    return Seller(str(seller_id), load_seller_data(path, None if fields is None else fields.split(",")),
                  answered=answered, policy=policy)


def make_client_app(load_seller: SellerLoader = seller_from_node_config) -> ClientApp:
    """A ClientApp whose seller is built by ``load_seller`` for every message."""
    app = ClientApp()

    @app.query(records.QUERY_ACTION)
    def value(msg: Message, context: Context) -> Message:
        """Offer in, Reply (or error reply) out; never raises for a TipError."""
        answered = records.load_answered(context.state)
        seller_id: str | None = context.node_config.get(SELLER_ID)  # type: ignore[assignment]
        try:
            offer = records.decode_offer(msg.content)
            seller = load_seller(context, answered)
            seller_id = seller.seller_id
            reply = seller.respond(offer)
        except TipError as exc:
            logger.warning("seller %s (node %s) refused the offer: %s", seller_id, context.node_id, exc)
            return Message(records.encode_error(f"{type(exc).__name__}: {exc}", seller_id), reply_to=msg)
        finally:
            records.store_answered(context.state, answered)
        return Message(records.encode_reply(reply, seller.seller_id), reply_to=msg)

    return app


app = make_client_app()
