"""Test-only views of a session's secret key, kept out of the classes that ship.

Leak tests scan every outgoing byte for the secret key, so they need the key itself; nothing in the
library calls these.
"""

from __future__ import annotations

import numpy as np

from tip_fed.crypto import SessionKeys

__all__ = ["secret_key_bytes"]


def secret_key_bytes(keys: SessionKeys, raw: bool = False) -> bytes:
    """The secret key as TenSEAL serialises it (``raw=False``), or its uncompressed RNS/NTT
    coefficients as little-endian uint64 (``raw=True``); CryptoError once the key is destroyed."""
    if not raw:
        return keys._serialized_secret_key()
    pt = keys._tenseal_context().secret_key().data.data()
    return np.fromiter((pt[i] for i in range(pt.coeff_count())), dtype="<u8").tobytes()
