"""The buyer as a Flower ServerApp: one valuation session over the Grid.

The buyer waits for enough sellers, sends every one the same Offer in waves of ``wave_size``
nodes (so buyer memory stays bounded with thousands of sellers: replies are decrypted and dropped
wave by wave), separates error replies from Replies, and settles. Sellers that refuse are listed
under ``rejected`` with their reason; sellers that do not answer within the timeout under
``missing``. Flower-level failures (a crashed ClientApp) count as refusals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from tip_fed.config import FlowerConfig
from tip_fed.errors import ProtocolError, TipError
from tip_fed.flower import records
from tip_fed.protocol import Buyer, Valuation

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """What the ServerApp needs from its host for one session."""

    buyer: Buyer
    max_samples: int
    expected: Sequence[str] = ()
    flower: FlowerConfig = field(default_factory=FlowerConfig)


def wait_for_nodes(grid: Grid, want: int, wait_s: float) -> list[int]:
    """Node ids once ``want`` are connected, or whatever is connected after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.5)


def run_session(grid: Grid, session: Session) -> Valuation:
    """Offer, collect and settle one session over ``grid``; see the module docstring."""
    cfg = session.flower
    want = max(cfg.min_sellers, len(session.expected))
    nodes = wait_for_nodes(grid, want, cfg.node_wait_s)
    if len(nodes) < cfg.min_sellers:
        raise TipError(
            f"only {len(nodes)} seller node(s) connected within {cfg.node_wait_s:.0f} s, fewer than "
            f"flower.min-sellers = {cfg.min_sellers}; start more SuperNodes or lower the setting"
        )
    logger.info("query.value: offering to %d seller nodes in waves of %d", len(nodes), cfg.wave_size)
    content = records.encode_offer(session.buyer.offer(max_samples=session.max_samples))
    rejected: dict[str, str] = {}
    silent: list[int] = []

    def replies() -> Iterator[bytes]:
        for start in range(0, len(nodes), cfg.wave_size):
            wave = nodes[start : start + cfg.wave_size]
            messages = [
                Message(content=content, dst_node_id=node, message_type=records.QUERY_TYPE) for node in wave
            ]
            answered: set[int] = set()
            for reply in grid.send_and_receive(messages, timeout=cfg.timeout_s):
                node = reply.metadata.src_node_id
                answered.add(node)
                data = _reply_bytes(reply, node, rejected)
                if data is not None:
                    yield data
            silent.extend(n for n in wave if n not in answered)

    valuation = session.buyer.settle(replies(), expected=session.expected)
    valuation.rejected.update(rejected)
    if not session.expected:
        valuation.missing.extend(f"node-{n}" for n in silent)
    for name, reason in valuation.rejected.items():
        logger.warning("query.value: rejected %s: %s", name, reason)
    if valuation.missing:
        logger.warning("query.value: no reply from %s (nodes %s)", valuation.missing, silent)
    logger.info("query.value: valued %d sellers", len(valuation.sellers))
    return valuation


def _reply_bytes(reply: Message, node: int, rejected: dict[str, str]) -> bytes | None:
    """Reply bytes, or None after recording why this node's answer is unusable."""
    if reply.has_error():
        rejected[f"node-{node}"] = f"ClientApp failed (code {reply.error.code}): {reply.error.reason}"
        return None
    try:
        data, seller, error = records.decode_reply(reply.content)
    except ProtocolError as exc:
        rejected[f"node-{node}"] = str(exc)
        return None
    if error is not None:
        rejected[seller or f"node-{node}"] = error
        return None
    return data


def make_server_app(
    make_session: Callable[[Context], Session],
    on_done: Callable[[Valuation, Context], None] | None = None,
) -> ServerApp:
    """A ServerApp running one session built by ``make_session`` and handing the result to ``on_done``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        valuation = run_session(grid, make_session(context))
        if on_done is not None:
            on_done(valuation, context)

    return app
