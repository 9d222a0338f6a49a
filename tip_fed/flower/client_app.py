"""The seller as a Flower ClientApp: answer each ``query.value`` Offer with a Reply.

Flower recreates a ClientApp for every message, so nothing lives on the app object: the seller is
loaded afresh from the node's own data (``context.node_config``) and the per-session query budget
is kept in ``context.state``. A :class:`TipError` (bad offer, spent budget, missing data) becomes an
error reply carrying its message, so the buyer can list the seller under ``rejected``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from tip_fed.errors import ConfigError, TipError
from tip_fed.flower import records
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.records import load_seller_data

logger = logging.getLogger(__name__)

SellerLoader = Callable[[Context, dict[str, int]], Seller]
"""Builds this node's seller; the dict is the session budget to hand to ``Seller(answered=...)``."""

DATA_PATH = "data-path"
SELLER_ID = "seller-id"
# The seller's own opt-in to releasing per-sample scores without differential-privacy noise.
EXACT_PER_SAMPLE = "exact-per-sample"
# Where this node keeps models it verified, so Offers may reference them (a ClientApp is recreated
# for every message: the cache lives on disk), and its bound in MiB.
MODEL_CACHE_DIR = "model-cache-dir"
MODEL_CACHE_MB = "model-cache-mb"
# Comma-separated fields of raw records this node sells (default: every field of its file).
FIELDS = "fields"


def seller_from_node_config(context: Context, answered: dict[str, int]) -> Seller:
    """Seller from ``--node-config "data-path=... [seller-id=...] [fields='a,b,c'] [exact-per-sample=true]
    [model-cache-dir=... [model-cache-mb=2048]]"``: a safetensors dataset, or raw records (.csv,
    .parquet, .jsonl, .txt) the buyer's input format encodes, restricted to ``fields`` when given
    (otherwise a buyer's format may read every field of the file).

    The seller id defaults to the data file's stem, as written by ``tip-fed export-sellers``.
    Per-sample scores without noise are released only when the node config says so.
    """
    path = context.node_config.get(DATA_PATH)
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"this SuperNode has no '{DATA_PATH}' in its node config; start it with "
            f"--node-config \"{DATA_PATH}=/path/to/seller.safetensors\""
        )
    seller_id = context.node_config.get(SELLER_ID) or Path(path).stem
    exact = context.node_config.get(EXACT_PER_SAMPLE, False)
    if not isinstance(exact, bool):
        raise ConfigError(f"node config '{EXACT_PER_SAMPLE}' must be true or false, got {exact!r}")
    cache_dir, cache_mb = context.node_config.get(MODEL_CACHE_DIR, ""), context.node_config.get(MODEL_CACHE_MB, 2048)
    if not isinstance(cache_dir, str) or not isinstance(cache_mb, int) or isinstance(cache_mb, bool) or cache_mb < 0:
        raise ConfigError(f"node config '{MODEL_CACHE_DIR}' must be a directory path and '{MODEL_CACHE_MB}' an "
                          f"integer >= 0, got {cache_dir!r} and {cache_mb!r}")
    fields = context.node_config.get(FIELDS)
    if fields is not None and not isinstance(fields, str):
        raise ConfigError(f"node config '{FIELDS}' must be comma-separated field names, e.g. "
                          f"{FIELDS}='age,bmi,diagnosis', got {fields!r}")
    return Seller(str(seller_id), load_seller_data(path, None if fields is None else fields.split(",")),
                  answered=answered,
                  policy=SellerPolicy(exact_per_sample=exact, model_cache_mb=cache_mb if cache_dir else 0,
                                      model_cache_dir=cache_dir or None))


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
