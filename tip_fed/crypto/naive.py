"""BASELINE ONLY: one TenSEAL ``dot`` and one ciphertext per score (the paper's way).

TenSEAL ``dot`` leaves partial sums in every slot (it leaks the seller's row, platform.md §3.7)
and costs ~10 ms and ~230 KB per score; it exists so benchmarks can measure the packed path
(:mod:`tip_fed.crypto.packing`) against it with the same keys in the same run. Never use it in
the protocol.
"""

from __future__ import annotations

import numpy as np
import tenseal as ts

from tip_fed.errors import CodecError, CryptoError, DataError

from .codec import max_ciphertext_bytes, tenseal_errors
from .keys import PublicContext, SessionKeys
from .packing import _query_vector, _rows_matrix

__all__ = ["baseline_public_context_bytes", "decrypt_naive", "encrypt_query_naive", "score_rows_naive"]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def baseline_public_context_bytes(keys: SessionKeys) -> bytes:
    """BASELINE ONLY: the session's public context with TenSEAL's default Galois keys (~35 MB at
    N = 8192), which ``dot`` needs. The packed protocol never ships this."""
    ctx = keys._tenseal_context()
    with tenseal_errors("building the baseline public context", CryptoError):
        tmp = ctx.copy()
        tmp.generate_galois_keys()
        data: bytes = tmp.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=True,
            save_relin_keys=False,
        )
        tmp.make_context_public(generate_galois_keys=False, generate_relin_keys=False)
    return keys.with_seeded_public_key(data)


def encrypt_query_naive(keys: SessionKeys, x: np.ndarray) -> bytes:
    """BASELINE ONLY: the query as an ordinary TenSEAL vector (zero-padded to a power of two)."""
    arr = np.asarray(x)
    vec = _query_vector(arr, arr.shape[0] if arr.ndim == 1 else -1)
    padded = np.zeros(_pow2(vec.shape[0]))
    padded[: vec.shape[0]] = vec
    with tenseal_errors("encrypting the baseline query", CryptoError):
        return ts.ckks_vector(keys._tenseal_context(), padded).serialize()


def score_rows_naive(ctx: PublicContext, query: bytes, rows: np.ndarray) -> list[bytes]:
    """BASELINE ONLY: one ``dot`` and one ciphertext per row. Needs the default Galois keys
    (:func:`baseline_public_context_bytes`)."""
    if not isinstance(query, (bytes, bytearray)) or not query:
        raise CodecError("the baseline query is empty or not bytes")
    if len(query) > max_ciphertext_bytes(ctx.params) + 1024:
        raise CodecError("the baseline query is larger than any ciphertext for these parameters")
    with tenseal_errors("parsing the baseline query"):
        vec = ts.ckks_vector_from(ctx.context, bytes(query))
    size = vec.size()
    if size < 1 or size & (size - 1):
        raise CodecError(f"the baseline query has {size} slots; expected a power of two >= 1")
    arr = np.asarray(rows)
    matrix = _rows_matrix(arr, arr.shape[1] if arr.ndim == 2 else -1)
    if matrix.shape[1] > size:
        raise DataError(f"rows have {matrix.shape[1]} columns but the query has {size}")
    padded = np.zeros((matrix.shape[0], size))
    padded[:, : matrix.shape[1]] = matrix
    with tenseal_errors("baseline dot products", CryptoError):
        return [vec.dot(row.tolist()).serialize() for row in padded]


def decrypt_naive(keys: SessionKeys, replies: list[bytes]) -> np.ndarray:
    """BASELINE ONLY: slot 0 of each ``dot`` result."""
    out = np.empty(len(replies))
    ctx = keys._tenseal_context()
    for i, blob in enumerate(replies):
        if not isinstance(blob, (bytes, bytearray)) or not blob:
            raise CodecError(f"baseline reply {i} is empty or not bytes")
        with tenseal_errors(f"decrypting baseline reply {i}", CryptoError):
            out[i] = ts.ckks_vector_from(ctx, bytes(blob)).decrypt()[0]
    return out
