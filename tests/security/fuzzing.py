"""Shared hypothesis machinery for the fuzz suite: settings, hostile values, field mutations.

Every fuzz test asserts one thing: the code under test returns a valid result or raises a
``TipError``; any other exception or a crash is a bug. The per-example deadline (seconds, far above
what any example costs) only turns a hang into a failure; it is no claim about speed.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from tip_fed.errors import TipError


def fuzz(examples: int, deadline_s: float = 5.0) -> settings:
    """Deterministic (CI-stable) settings; the deadline is a hang guard, not a speed requirement."""
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=deadline_s),
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


def tip_or_result(fn, *args, **kwargs):
    """Call ``fn``; a TipError is an accepted outcome (returns None), anything else propagates."""
    try:
        out = fn(*args, **kwargs)
    except TipError as exc:
        event(type(exc).__name__)  # outcome mix, shown by --hypothesis-show-statistics
        return None
    event("valid result")
    return out


HOSTILE_INTS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 255, 256, 2**16, 2**31 - 1, 2**32 - 1]),
    st.integers(min_value=0, max_value=2**32 - 1),
)
HOSTILE_U64 = st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
HOSTILE_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e300, float("nan"), float("inf"), float("-inf"), 4096.0, 4096.0001]),
    st.floats(allow_nan=True, allow_infinity=True),
)
HOSTILE_TEXT = st.one_of(
    st.sampled_from(["", "a" * 10_000, "../../etc/passwd", "\x00", "ab" * 16, "é" * 40, "mlp", "transformers",
                     "classification", "causal-lm", "bsgs-copies", "rademacher", "philox4x64-10"]),
    st.text(max_size=64),
)


@st.composite
def mutated_bytes(draw, blob: bytes) -> bytes:
    """Truncate, extend, bit-flip, splice or replace a byte string."""
    kind = draw(st.sampled_from(["truncate", "flip", "extend", "splice", "replace", "empty", "header"]))
    n = len(blob)
    if kind == "truncate":
        return blob[: draw(st.integers(0, max(n - 1, 0)))]
    if kind == "flip":
        out = bytearray(blob)
        for _ in range(draw(st.integers(1, 8))):
            if out:
                i = draw(st.integers(0, len(out) - 1))
                out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "extend":
        return blob + draw(st.binary(min_size=1, max_size=64))
    if kind == "splice":
        i = draw(st.integers(0, n))
        return blob[:i] + draw(st.binary(max_size=32)) + blob[i + draw(st.integers(0, 32)):]
    if kind == "header":
        out = bytearray(blob)
        for i in range(min(16, n)):
            if draw(st.booleans()):
                out[i] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "empty":
        return b""
    return draw(st.binary(max_size=256))
