"""Protocol v1 messages: the wire helpers, and the Reply decoded once into a typed, validated form.

Both roles speak bytes so that every runtime (in-process, Flower, gRPC) carries exactly the same
messages. Decoding checks structure and bounds before anything is allocated or parsed further,
and every failure is a :class:`~tip_fed.errors.ProtocolError` naming the offending field.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from google.protobuf.message import DecodeError

from tip_fed.errors import ProtocolError, VersionMismatchError
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

PROTOCOL_VERSION = 1
MAX_OFFER_BYTES = 1 << 30
MAX_REPLY_BYTES = 1 << 30
SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
SELLER_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")

def parse_message(kind: type, data: bytes, limit: int, what: str):  # type: ignore[no-untyped-def]
    """Parse tip.v1 bytes of ``kind`` (at most ``limit`` bytes) and check what every message starts
    with: this protocol's version and a well-formed session id. ProtocolError naming ``what``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ProtocolError(f"{what} is empty: nothing was received")
    if len(data) > limit:
        raise ProtocolError(f"{what} is {len(data)} bytes, above the {limit}-byte limit")
    msg = kind()
    try:
        msg.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise ProtocolError(f"{what} is not a valid tip.v1 protobuf message: {exc}") from exc
    if msg.protocol_version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"the {what} speaks protocol version {msg.protocol_version}, this tip_fed speaks {PROTOCOL_VERSION}; "
            "upgrade the older side so both use the same tip_fed release"
        )
    if not SESSION_ID.match(msg.session_id):
        raise ProtocolError(f"the {what} has malformed session id {msg.session_id[:40]!r}; expected 32 hex characters")
    return msg


@dataclass(frozen=True)
class Timings:
    """Seconds a seller spent on each step of answering (as it reports them; informational)."""

    gradients_s: float = 0.0
    commit_s: float = 0.0
    encrypted_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """Plain dict, as valuations record it."""
        return asdict(self)


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
        timings=pb.Timings(**reply.timings.to_dict()),
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
