"""Protocol v1 messages: validated decoding of Offer and Reply bytes.

Both roles speak bytes so that every runtime (in-process, Flower, gRPC) carries exactly the same
messages. Decoding checks structure and bounds before anything is allocated or parsed further,
and every failure is a :class:`~tip_fed.errors.ProtocolError` naming the offending field.
"""

from __future__ import annotations

import math
import re

from google.protobuf.message import DecodeError

from tip_fed.config import DISCLOSURES
from tip_fed.errors import ProtocolError, VersionMismatchError
from tip_fed.protocol.formats import check_input_pb
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

PROTOCOL_VERSION = 1
MAX_OFFER_BYTES = 1 << 30
MAX_REPLY_BYTES = 1 << 30
#: A model's builder config (layer sizes, GPT-2 settings) is a few KiB; a longer one could ask the
#: seller to build millions of modules before their weights are compared with the shipped ones.
MAX_MODEL_CONFIG_BYTES = 64 << 10
SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
SELLER_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")

#: Config name (the allowed values of protocol.disclosure, in order) -> wire value.
DISCLOSURE_NAMES = dict(zip(DISCLOSURES, (pb.DISCLOSURE_AGGREGATE, pb.DISCLOSURE_PER_SAMPLE), strict=True))


def disclosure_name(value: int) -> str:
    """Config name of a wire disclosure value; ProtocolError for unknown values."""
    for name, v in DISCLOSURE_NAMES.items():
        if v == value:
            return name
    raise ProtocolError(f"unknown disclosure policy {value}; expected aggregate or per-sample")


def _parse(kind: type, data: bytes, limit: int, what: str):  # type: ignore[no-untyped-def]
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
    return msg


def check_version(version: int, what: str) -> None:
    """Refuse messages of another protocol version."""
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"{what} speaks protocol version {version}, this tip_fed speaks {PROTOCOL_VERSION}; "
            "upgrade the older side so both use the same tip_fed release"
        )


def check_session_id(session_id: str, what: str) -> None:
    """Session ids are 128-bit random hex strings chosen by the buyer."""
    if not SESSION_ID.match(session_id):
        raise ProtocolError(f"{what} has malformed session id {session_id[:40]!r}; expected 32 hex characters")


def decode_offer(data: bytes) -> pb.Offer:
    """Parse and structurally validate an Offer."""
    offer: pb.Offer = _parse(pb.Offer, data, MAX_OFFER_BYTES, "offer")
    check_version(offer.protocol_version, "the offer")
    check_session_id(offer.session_id, "the offer")
    if not offer.HasField("model") or not (offer.model.weights or offer.model.fingerprint):
        raise ProtocolError("the offer carries no model weights and no model reference (fingerprint)")
    if not offer.model.weights and not offer.model.architecture:
        raise ProtocolError("the offer references a model without naming its architecture")
    if len(offer.model.config_json) > MAX_MODEL_CONFIG_BYTES:
        raise ProtocolError(
            f"the offer's model config is {len(offer.model.config_json)} characters, above the "
            f"{MAX_MODEL_CONFIG_BYTES} a model description may take; describe the model with its builder's settings"
        )
    if not offer.projection.layers:
        raise ProtocolError("the offer's projection spec has no layers")
    if not offer.public_context:
        raise ProtocolError("the offer carries no public HE context")
    copies = offer.packing.chunks * offer.packing.baby
    if len(offer.query) != copies or not offer.query:
        raise ProtocolError(
            f"the offer carries {len(offer.query)} query ciphertexts but its packing needs {copies} "
            f"({offer.packing.chunks} chunk(s) x {offer.packing.baby} rotated copies)"
        )
    disclosure_name(offer.disclosure)
    if not (math.isfinite(offer.grad_norm_bound) and offer.grad_norm_bound > 0):
        raise ProtocolError(f"the offer's gradient-norm bound {offer.grad_norm_bound} must be finite and > 0")
    if not 0 < offer.query_norm <= 2.0**12:
        raise ProtocolError(f"the offer's query norm {offer.query_norm} is outside (0, 4096]")
    if offer.query_budget < 1:
        raise ProtocolError("the offer's query budget must be >= 1")
    if offer.max_samples < 1:
        raise ProtocolError("the offer's max_samples must be >= 1")
    if not (math.isfinite(offer.dp_epsilon) and offer.dp_epsilon >= 0):
        raise ProtocolError(f"the offer's dp_epsilon {offer.dp_epsilon} must be finite and >= 0 (0 = no noise)")
    if offer.dp_epsilon > 0 and not 0 < offer.dp_delta < 1:
        raise ProtocolError(f"the offer's dp_delta {offer.dp_delta} must be in (0, 1) when noise is asked for")
    if offer.HasField("input"):
        check_input_pb(offer.input)  # bounds only: the tokenizer is parsed after costing
    return offer


def decode_reply(data: bytes) -> pb.Reply:
    """Parse and structurally validate a Reply (session matching is the buyer's job)."""
    reply: pb.Reply = _parse(pb.Reply, data, MAX_REPLY_BYTES, "reply")
    check_version(reply.protocol_version, "the reply")
    check_session_id(reply.session_id, "the reply")
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
    return reply
