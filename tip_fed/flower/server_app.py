"""The buyer as a Flower ServerApp: one valuation session over the Grid.

The buyer waits for enough sellers and sends every one the same Offer, keeping at most
``wave_size`` Offers in flight: as each Reply arrives the next seller gets its Offer, and the
Reply is decrypted and dropped at once, so buyer memory stays bounded with thousands of sellers.
A bounded window also keeps Flower's own bookkeeping flat: its simulation engine scans every
stored message for every node on each 0.1 s tick, a cost of nodes x messages in flight. Error
replies are separated from Replies. Sellers that refuse are listed under ``rejected`` with their
reason; sellers that do not answer within ``timeout_s`` of their Offer under ``missing``.
Flower-level failures (a crashed ClientApp) count as refusals.

The Offer goes out by model reference first (no weights, :mod:`tip_fed.protocol.model_cache`);
nodes whose seller answers that it does not hold the model get the same session's full Offer.

In a deployment a seller is known by the node key its operator registered, not by what its reply
says: with ``Session.nodes`` (seller id -> registered node id) only those nodes get the Offer, a
reply counts only under the seller id its node is registered for, and any other connected node
(a key someone else registered) is listed under ``rejected`` and never counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from tip_fed.config import FlowerConfig
from tip_fed.console import ANSWERED, Count  # logged as "query.value: sellers answered K/N"
from tip_fed.errors import ConfigError, ModelNotHeldError, ProtocolError, TipError
from tip_fed.flower import records
from tip_fed.protocol import Buyer, Valuation
from tip_fed.protocol.model_cache import strip_weights
from tip_fed.protocol.reply import decode_reply

logger = logging.getLogger(__name__)
_POLL_S = 0.05  # pause between polls for replies while none arrives


@dataclass
class Session:
    """What the ServerApp needs from its host for one session."""

    buyer: Buyer
    max_samples: int
    expected: Sequence[str] = ()
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    nodes: Mapping[str, int] = field(default_factory=dict)  # seller id -> registered node id; empty: any node
    by_reference: bool = True  # Offer without weights first; the full Offer only to sellers lacking the model
    progress: bool = False  # count the sellers' answers on stderr (a host process's run)


def parse_bindings(text: str) -> dict[str, int]:
    """``"s1=123,s2=456"`` (the ``sellers`` run config) -> ``{"s1": 123, "s2": 456}``."""
    bindings: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        seller, sep, node = item.partition("=")
        if not sep or not seller.strip() or not node.strip().isdigit():
            raise ConfigError(f"'sellers' entry {item!r} must look like SELLER_ID=NODE_ID, e.g. digits-1=8234...")
        if seller.strip() in bindings or int(node) in bindings.values():
            raise ConfigError(f"'sellers' names seller {seller.strip()!r} or node {node.strip()} twice")
        bindings[seller.strip()] = int(node)
    return bindings


def format_bindings(nodes: Mapping[str, int]) -> str:
    """Inverse of :func:`parse_bindings`."""
    return ",".join(f"{seller}={node}" for seller, node in nodes.items())


def wait_for_nodes(grid: Grid, want: int, wait_s: float, required: Sequence[int] = ()) -> list[int]:
    """Node ids once ``want`` (and every ``required`` node) are connected, or whatever is connected
    after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if (len(nodes) >= want and set(required) <= set(nodes)) or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.5)


def run_session(grid: Grid, session: Session) -> Valuation:
    """Offer, collect and settle one session over ``grid``; see the module docstring."""
    cfg = session.flower
    want = max(cfg.min_sellers, len(session.expected))
    bound = {node: seller for seller, node in session.nodes.items()}
    connected = wait_for_nodes(grid, want, cfg.node_wait_s, required=sorted(bound))
    rejected: dict[str, str] = {}
    nodes = [n for n in connected if not bound or n in bound]
    for stranger in sorted(set(connected) - set(nodes)):
        rejected[f"node-{stranger}"] = "node is not registered for any seller of this market; not offered, not counted"
    if len(nodes) < cfg.min_sellers:
        raise TipError(
            f"only {len(nodes)} seller node(s) connected within {cfg.node_wait_s:.0f} s, fewer than "
            f"flower.min-sellers = {cfg.min_sellers}; start more SuperNodes or lower the setting"
        )
    logger.info("query.value: offering to %d seller nodes, at most %d at a time", len(nodes), cfg.wave_size)
    offer = session.buyer.offer(max_samples=session.max_samples)
    content = records.encode_offer(strip_weights(offer) if session.by_reference else offer)
    silent: list[int] = []
    lacking: list[int] = []
    answers = Count(ANSWERED, len(nodes), enabled=session.progress)

    def collect(targets: Sequence[int], message: RecordDict, by_reference: bool) -> Iterator[bytes]:
        for node, reply in exchange(grid, targets, message, cfg):
            if by_reference and reply is not None and _model_not_held(reply):
                lacking.append(node)  # an answer too: the host's progress shows it (the weights follow)
                logger.info("query.value: %d of %d seller nodes lack the model so far", len(lacking), len(nodes))
                continue
            answers.update()
            logger.info("query.value: %s %d/%d", ANSWERED, answers.done, len(nodes))
            if reply is None:
                silent.append(node)
                continue
            data = _reply_bytes(reply, node, rejected, bound.get(node))
            if data is not None:
                yield data

    def replies() -> Iterator[bytes]:
        yield from collect(nodes, content, session.by_reference)
        if lacking:
            logger.info("query.value: %d of %d seller nodes lack the model; sending them its weights",
                        len(lacking), len(nodes))
            yield from collect(list(lacking), records.encode_offer(offer), False)

    try:
        valuation = session.buyer.settle(replies(), expected=session.expected)
    finally:
        answers.close()
    valuation.rejected.update(rejected)
    if not session.expected:
        valuation.missing.extend(f"node-{n}" for n in silent)
    for name, reason in valuation.rejected.items():
        logger.warning("query.value: rejected %s: %s", name, reason)
    if valuation.missing:
        logger.warning("query.value: no reply from %s (nodes %s)", valuation.missing, silent)
    logger.info("query.value: valued %d sellers", len(valuation.sellers))
    return valuation


def exchange(
    grid: Grid, nodes: Sequence[int], content: RecordDict, cfg: FlowerConfig, message_type: str = records.QUERY_TYPE
) -> Iterator[tuple[int, Message | None]]:
    """Send ``content`` to every node, at most ``cfg.wave_size`` outstanding; yield ``(node,
    reply)`` as replies arrive and ``(node, None)`` for a node silent ``cfg.timeout_s`` after
    its message went out (or whose message the Grid would not take)."""
    pending = list(nodes)
    in_flight: dict[str, tuple[int, float]] = {}  # message id -> (node, sent at)
    while pending or in_flight:
        room = cfg.wave_size - len(in_flight)
        if room > 0 and pending:
            batch, pending = pending[:room], pending[room:]
            messages = [Message(content=content, dst_node_id=n, message_type=message_type) for n in batch]
            stored = set(grid.push_messages(messages))
            sent_at = time.monotonic()
            for msg, node in zip(messages, batch, strict=True):
                if msg.metadata.message_id in stored:
                    in_flight[msg.metadata.message_id] = (node, sent_at)
                else:
                    yield node, None
        answered = list(grid.pull_messages(list(in_flight))) if in_flight else []
        for reply in answered:
            entry = in_flight.pop(reply.metadata.reply_to_message_id, None)
            if entry is not None:
                yield entry[0], reply
        now = time.monotonic()
        for mid, (node, sent_at) in list(in_flight.items()):
            if now - sent_at > cfg.timeout_s:
                del in_flight[mid]
                yield node, None
        if not answered and in_flight:
            time.sleep(_POLL_S)


def _model_not_held(reply: Message) -> bool:
    """True for an error reply saying the seller lacks the referenced model (it gets the weights next)."""
    if reply.has_error():
        return False
    try:
        _, _, error = records.decode_reply(reply.content)
    except ProtocolError:
        return False
    return error is not None and error.startswith(f"{ModelNotHeldError.__name__}: {ModelNotHeldError.MARKER}")


def _reply_bytes(reply: Message, node: int, rejected: dict[str, str], bound: str | None = None) -> bytes | None:
    """Reply bytes, or None after recording why this node's answer is unusable.

    With ``bound`` (the seller id registered for ``node``) the reason is filed under that id and a
    Reply claiming any other seller id is refused."""
    name = bound or f"node-{node}"
    if reply.has_error():
        rejected[name] = f"ClientApp failed (code {reply.error.code}): {reply.error.reason}"
        return None
    try:
        data, seller, error = records.decode_reply(reply.content)
        claimed = decode_reply(data).seller_id if data is not None and bound is not None else None
    except ProtocolError as exc:
        rejected[name] = str(exc)
        return None
    if error is not None:
        rejected[bound or seller or name] = error
        return None
    if bound is not None and claimed != bound:
        rejected[f"node-{node}"] = (f"node {node} is registered for seller {bound!r} but its reply claims "
                                    f"seller {str(claimed)[:64]!r}; not counted")
        return None
    return data


def make_server_app(
    make_session: Callable[[Context], Session],
    on_done: Callable[[Valuation, Context], object] | None = None,
) -> ServerApp:
    """A ServerApp running one session built by ``make_session`` and handing the result to ``on_done``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        valuation = run_session(grid, make_session(context))
        if on_done is not None:
            on_done(valuation, context)

    return app
