"""Protocol bytes <-> Flower records, and the one place that names record keys and message types.

Offers and Replies carry megabytes of ciphertexts, so they travel as a uint8 ``Array`` in an
``ArrayRecord`` (Flower streams arrays in 5 MiB chunks; a ``ConfigRecord`` value travels as one
object). Small metadata (seller id, error text) goes in a ``ConfigRecord``. Everything decoded
here is untrusted input: a malformed record is a :class:`ProtocolError`, never a crash.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, RecordDict

from tip_fed.errors import ProtocolError

QUERY_ACTION = "value"
QUERY_TYPE = f"query.{QUERY_ACTION}"  # Flower message type of an Offer and its Reply

PAYLOAD = "tip.payload"  # ArrayRecord holding the protocol message
BLOB = "bytes"  # its single uint8 array
META = "tip.meta"  # ConfigRecord: seller id, error text
ERROR = "error"
SELLER = "seller-id"
ANSWERED = "tip.answered"  # ClientApp state: session id -> queries answered (query budget)

MAX_ERROR_CHARS = 2000


def _blob(data: bytes) -> RecordDict:
    array = Array(np.frombuffer(bytes(data), dtype=np.uint8))
    return RecordDict({PAYLOAD: ArrayRecord({BLOB: array})})


def _unblob(content: RecordDict, what: str) -> bytes:
    try:
        record = content.array_records[PAYLOAD]
        array = record[BLOB]
    except (KeyError, AttributeError, TypeError) as exc:
        raise ProtocolError(f"{what} message has no '{PAYLOAD}' array record with a '{BLOB}' array") from exc
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise ProtocolError(f"{what} payload must be a 1-d uint8 array, got {array.dtype} {tuple(array.shape)}")
    try:
        data = array.numpy().tobytes()
    except Exception as exc:
        raise ProtocolError(f"{what} payload array cannot be deserialised: {type(exc).__name__}") from exc
    if not data:
        raise ProtocolError(f"{what} payload is empty")
    return data


def encode_offer(offer: bytes) -> RecordDict:
    """Content of the buyer's ``query.value`` message."""
    return _blob(offer)


def decode_offer(content: RecordDict) -> bytes:
    """Offer bytes from a ``query.value`` message; ProtocolError if the record is malformed."""
    return _unblob(content, "offer")


def encode_reply(reply: bytes, seller_id: str) -> RecordDict:
    """Content of a seller's successful Reply."""
    content = _blob(reply)
    content[META] = ConfigRecord({SELLER: seller_id})
    return content


def encode_error(reason: str, seller_id: str | None) -> RecordDict:
    """Content of a seller's refusal: the TipError text the buyer lists under ``rejected``."""
    meta: dict[str, ConfigRecordValues] = {ERROR: reason[:MAX_ERROR_CHARS] or "unspecified error"}
    if seller_id:
        meta[SELLER] = seller_id
    return RecordDict({META: ConfigRecord(meta)})


def decode_reply(content: RecordDict) -> tuple[bytes | None, str | None, str | None]:
    """``(reply_bytes, seller_id, error)``: exactly one of reply bytes and error is set."""
    meta = content.config_records.get(META)
    seller = meta.get(SELLER) if meta is not None else None
    if seller is not None and not isinstance(seller, str):
        raise ProtocolError("reply metadata 'seller-id' must be a string")
    if meta is not None and ERROR in meta:
        error = meta[ERROR]
        return None, seller, str(error)[:MAX_ERROR_CHARS]
    return _unblob(content, "reply"), seller, None


def load_answered(state: RecordDict) -> dict[str, int]:
    """Queries answered per session, kept in the ClientApp's ``context.state`` between messages."""
    record = state.config_records.get(ANSWERED)
    answered: dict[str, int] = {}
    for k, v in (record or {}).items():
        if not isinstance(v, int):
            raise ProtocolError(f"answered-query count for session {k!r} is not an integer")
        answered[str(k)] = v
    return answered


def store_answered(state: RecordDict, answered: dict[str, int]) -> None:
    """Write the per-session query counts back into ``context.state``."""
    state[ANSWERED] = ConfigRecord(dict(answered))
