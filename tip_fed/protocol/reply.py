"""The Reply as the buyer reads it: decoded from tip.v1 bytes once, every field validated, typed.

This module is the Reply's wire boundary, as :mod:`tip_fed.protocol.offer` is the Offer's: the
seller builds a :class:`Reply` and :func:`encode_reply` writes the bytes it sends back; the buyer
runs :func:`decode_reply` on what arrives and then works only with the :class:`Reply` it returns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from google.protobuf.message import DecodeError

from tip_fed.errors import ProtocolError
from tip_fed.protocol.messages import MAX_REPLY_BYTES, PROTOCOL_VERSION, SELLER_ID, parse_message
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

__all__ = ["Reply", "Timings", "decode_reply", "encode_reply", "reply_label"]


@dataclass(frozen=True)
class Timings:
    """Seconds a seller spent on each step of answering (as it reports them; informational)."""

    gradients_s: float = 0.0
    commit_s: float = 0.0
    encrypted_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class Reply:
    """One seller's Reply, validated (matching it to a session is the buyer's job).

    ``scores`` are the encrypted score blocks; ``n_rows`` the rows they hold (per-sample scores
    and the total, or the total alone). The DP fields are what the seller declares: the buyer
    checks them against each other before trusting any of them.
    """

    session_id: str
    seller_id: str
    n_samples: int
    commitment: bytes
    n_rows: int
    scores: tuple[bytes, ...]
    clipped: int = 0
    timings: Timings = field(default_factory=Timings)
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0
    noise_std: float = 0.0
    noise_commitment: bytes = b""


def decode_reply(data: bytes) -> Reply:
    """Parse and validate a Reply; ProtocolError (or a subclass) naming the first bad field."""
    reply: pb.Reply = parse_message(pb.Reply, data, MAX_REPLY_BYTES, "reply")
    if not SELLER_ID.match(reply.seller_id):
        raise ProtocolError(f"reply has malformed seller id {reply.seller_id[:40]!r}")
    if reply.n_samples < 1:
        raise ProtocolError(f"seller {reply.seller_id} reports {reply.n_samples} samples; at least 1 is needed")
    if not reply.scores:
        raise ProtocolError(f"seller {reply.seller_id} sent no score ciphertexts")
    if len(reply.commitment) != 32:
        raise ProtocolError(f"seller {reply.seller_id} sent a {len(reply.commitment)}-byte commitment; expected 32")
    for name in ("dp_epsilon", "dp_delta", "noise_std"):
        value = getattr(reply, name)
        if not (math.isfinite(value) and value >= 0):
            raise ProtocolError(f"seller {reply.seller_id} sent {name} = {value}; it must be finite and >= 0")
    if reply.dp_delta >= 1:
        raise ProtocolError(f"seller {reply.seller_id} sent dp_delta = {reply.dp_delta}; it must be < 1")
    t = reply.timings
    return Reply(
        session_id=reply.session_id,
        seller_id=reply.seller_id,
        n_samples=reply.n_samples,
        commitment=bytes(reply.commitment),
        n_rows=reply.n_rows,
        scores=tuple(reply.scores),
        clipped=reply.clipped,
        timings=Timings(t.gradients_s, t.commit_s, t.encrypted_s, t.total_s),
        dp_epsilon=reply.dp_epsilon,
        dp_delta=reply.dp_delta,
        noise_std=reply.noise_std,
        noise_commitment=bytes(reply.noise_commitment),
    )


def encode_reply(reply: Reply) -> bytes:
    """The tip.v1 bytes of ``reply`` (what the seller sends back)."""
    return pb.Reply(
        protocol_version=PROTOCOL_VERSION,
        session_id=reply.session_id,
        seller_id=reply.seller_id,
        n_samples=reply.n_samples,
        commitment=reply.commitment,
        n_rows=reply.n_rows,
        scores=list(reply.scores),
        clipped=reply.clipped,
        timings=pb.Timings(**asdict(reply.timings)),
        dp_epsilon=reply.dp_epsilon,
        dp_delta=reply.dp_delta,
        noise_std=reply.noise_std,
        noise_commitment=reply.noise_commitment,
    ).SerializeToString()


def reply_label(data: bytes, index: int) -> str:
    """Best-effort name for a rejected reply: its seller id if it parses, else its position."""
    try:
        msg = pb.Reply()
        msg.ParseFromString(bytes(data))
        if msg.seller_id:
            return msg.seller_id[:64]
    except (DecodeError, TypeError, ValueError):
        pass
    return f"reply[{index}]"
