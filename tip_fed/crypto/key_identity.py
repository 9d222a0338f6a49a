"""A digest of the public key inside a buyer's public context (what a seller's ledger remembers).

Why the public key and not the whole context: the same key pair can be shipped with other Galois
keys or serialised again; the public key is what ties a context to one secret key.
"""

from __future__ import annotations

import hashlib

from .codec import parse_context_proto
from .params import HEParams


def public_key_digest(context_bytes: bytes, params: HEParams) -> str:
    """SHA-256 (hex) of the serialised public key in ``context_bytes`` (validated structurally)."""
    msg = parse_context_proto(context_bytes, params)
    return hashlib.sha256(b"tip-fed/public-key/v1\x00" + bytes(msg.public_context.public_key)).hexdigest()
