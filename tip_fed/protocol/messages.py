"""Protocol v1 messages: what every tip.v1 message shares (version, limits, ids) and its first check.

Both roles speak bytes so that every runtime (in-process, Flower, gRPC) carries exactly the same
messages. The Offer is decoded in :mod:`tip_fed.protocol.offer`, the Reply in
:mod:`tip_fed.protocol.reply`; both start with :func:`parse_message`, which checks structure and
bounds before anything is allocated or parsed further. Every failure is a
:class:`~tip_fed.errors.ProtocolError` naming the offending field.
"""

from __future__ import annotations

import re

from google.protobuf.message import DecodeError

from tip_fed.errors import ProtocolError, VersionMismatchError

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
