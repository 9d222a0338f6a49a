"""The portable matrix generator behind :mod:`tip_fed.core.projection` (spec steps 1-4).

Every party must regenerate bit-identical matrices from a seed on any platform, so nothing here
uses library routines whose rounding may differ between builds: Philox bits, a hand-rolled log for
Box-Muller, fixed-order pairwise sums, and Gram-Schmidt in that fixed order. Matrices are cached
by bytes, not by count, because the buyer chooses their shapes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np


def _philox_key(seed: int, name: str, side: str) -> int:
    message = f"tip_fed/projection/v2\n{seed}\n{name}\n{side}".encode()
    digest = hashlib.sha256(message).digest()
    return int.from_bytes(digest[0:8], "little") + (int.from_bytes(digest[8:16], "little") << 64)


_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_LOG_COEFFS = tuple(1.0 / (2 * k + 1) for k in range(1, 13))  # 1/3, 1/5, ..., 1/25


def _log(x: np.ndarray) -> np.ndarray:
    """Natural log of positive float64 values from frexp and correctly rounded arithmetic only.

    ``x = m * 2**e`` with ``m`` in ``[sqrt(1/2), sqrt(2))``; ``log m = 2 atanh(t)``,
    ``t = (m-1)/(m+1)``, ``|t| <= 0.172``, by its series to ``t**25`` (error below 1e-16).
    Library ``log`` differs in the last bit between platforms; this does not.
    """
    mantissa, exponent = np.frexp(x)
    low = mantissa < _SQRT_HALF
    mantissa = np.where(low, mantissa * 2.0, mantissa)
    exponent = np.where(low, exponent - 1, exponent).astype(np.float64)
    t = (mantissa - 1.0) / (mantissa + 1.0)
    t2 = t * t
    series = np.full_like(t, _LOG_COEFFS[-1])
    for coefficient in reversed(_LOG_COEFFS[:-1]):
        series = series * t2 + coefficient
    series = series * t2 + 1.0
    return (2.0 * t) * series + exponent * _LN2


def _rademacher(bits: np.random.Philox, count: int) -> np.ndarray:
    words = bits.random_raw((count + 63) // 64).astype("<u8")
    unpacked = np.unpackbits(words.view(np.uint8), bitorder="little")[:count]
    return 1.0 - 2.0 * unpacked.astype(np.float64)


def _gaussian(bits: np.random.Philox, count: int) -> np.ndarray:
    pairs_needed = (count + 1) // 2
    chunks: list[np.ndarray] = []
    have = 0
    while have < pairs_needed:
        draw = int((pairs_needed - have) / 0.78) + 16
        words = bits.random_raw(2 * draw)
        uniform = (words >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0
        u, v = uniform[0::2], uniform[1::2]
        s = u * u + v * v
        keep = (s > 0.0) & (s < 1.0)
        u, v, s = u[keep], v[keep], s[keep]
        factor = np.sqrt((-2.0 * _log(s)) / s)
        chunks.append(np.stack([u * factor, v * factor], axis=1).reshape(-1))
        have += int(keep.sum())
    return np.concatenate(chunks)[:count]


#: Bytes of float64 projection matrices kept between calls. Bounded by bytes, not entries: the
#: buyer picks the shapes, and a count bound would let a few rank-F specs pin gigabytes.
MATRIX_CACHE_BYTES = 256 << 20


def _byte_bounded_cache(max_bytes: int) -> Callable[[Callable[..., np.ndarray]], Callable[..., np.ndarray]]:
    """LRU cache of read-only arrays holding at most ``max_bytes``; larger arrays are not kept."""

    def decorate(make: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        entries: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        lock = threading.Lock()
        held = [0]

        @functools.wraps(make)
        def cached(*key: Any) -> np.ndarray:
            with lock:
                if key in entries:
                    entries.move_to_end(key)
                    return entries[key]
            value = make(*key)
            if value.nbytes <= max_bytes:
                with lock:
                    if key not in entries:
                        entries[key] = value
                        held[0] += value.nbytes
                    while held[0] > max_bytes:
                        held[0] -= entries.popitem(last=False)[1].nbytes
            return value

        def clear() -> None:
            with lock:
                entries.clear()
                held[0] = 0

        cached.cache_clear = clear  # type: ignore[attr-defined]
        cached.cache_bytes = lambda: held[0]  # type: ignore[attr-defined]
        return cached

    return decorate


def _raw_rows(seed: int, kind: str, name: str, side: str, rank: int, features: int) -> np.ndarray:
    """Step 3 of the generator: ``[rank, features]`` raw ±1 or standard-normal values."""
    bits = np.random.Philox(key=_philox_key(seed, name, side))
    count = rank * features
    values = _rademacher(bits, count) if kind == "rademacher" else _gaussian(bits, count)
    return values.reshape(rank, features)


def _tree_sum(values: np.ndarray) -> np.ndarray:
    """Sum over the last axis in a fixed pairwise order (same bits on every platform)."""
    length = values.shape[-1]
    padded = 1 << max(length - 1, 0).bit_length()
    if padded != length:
        pad = np.zeros((*values.shape[:-1], padded - length), dtype=values.dtype)
        values = np.concatenate([values, pad], axis=-1)
    while values.shape[-1] > 1:
        values = values[..., 0::2] + values[..., 1::2]
    return values[..., 0]


_DEPENDENT = 1e-12  # residual |x|² below this fraction of the candidate's |x|²: rejected


def _generate(seed: int, kind: str, name: str, side: str, rank: int, features: int) -> np.ndarray:
    """Step 4 of the generator: identity at full rank, else scaled orthonormal rows."""
    if rank == features:
        return np.eye(features, dtype=np.float64)
    rows = np.zeros((rank, features), dtype=np.float64)
    accepted, attempt = 0, 0
    while accepted < rank:
        stream_side = side if attempt == 0 else f"{side}+{attempt}"
        for candidate in _raw_rows(seed, kind, name, stream_side, rank, features):
            x = candidate.copy()
            for _ in range(2):
                coefficients = _tree_sum(rows[:accepted] * x)
                for j in range(accepted):
                    x = x - coefficients[j] * rows[j]
            norm2 = float(_tree_sum(x * x))
            if norm2 <= _DEPENDENT * float(_tree_sum(candidate * candidate)):
                continue
            rows[accepted] = x / math.sqrt(norm2)
            accepted += 1
            if accepted == rank:
                break
        attempt += 1
    return rows * math.sqrt(features / rank)


@_byte_bounded_cache(MATRIX_CACHE_BYTES)
def _matrix(seed: int, kind: str, name: str, side: str, rank: int, features: int) -> np.ndarray:
    matrix = _generate(seed, kind, name, side, rank, features)
    matrix.setflags(write=False)
    return matrix
