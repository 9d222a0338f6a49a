"""Test-only views into the protocol's parties, kept out of the classes that ship.

Leak tests scan every outgoing byte for the secret key, so they need the key itself; key-hygiene
tests look at a buyer's open session. Nothing in the library calls these.
"""

from __future__ import annotations

import numpy as np

from tip_fed.crypto import SessionKeys
from tip_fed.protocol.buyer import Buyer, BuyerSession

__all__ = ["buyer_session", "secret_key_bytes"]


def secret_key_bytes(keys: SessionKeys, raw: bool = False) -> bytes:
    """The secret key as TenSEAL serialises it (``raw=False``), or its uncompressed RNS/NTT
    coefficients as little-endian uint64 (``raw=True``); CryptoError once the key is destroyed."""
    if not raw:
        return keys._serialized_secret_key()
    pt = keys._tenseal_context().secret_key().data.data()
    return np.fromiter((pt[i] for i in range(pt.coeff_count())), dtype="<u8").tobytes()


def buyer_session(buyer: Buyer, session_id: str | None = None) -> BuyerSession:
    """A buyer's session (its latest by default): the session's keys, packing plan and state."""
    sid = session_id or buyer.session_id
    if sid is None or sid not in buyer._sessions:
        raise KeyError(f"the buyer has no session {sid!r}; call buyer.offer() first")
    return buyer._sessions[sid]
