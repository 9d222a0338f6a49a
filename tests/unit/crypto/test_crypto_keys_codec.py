"""Session keys, the public context, and validated decoding of untrusted bytes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from tip_fed.crypto import (
    HEParams,
    SessionKeys,
    decrypt_scores,
    encrypt_query,
    load_public_context,
    plan_packing,
    score_rows,
)
from tip_fed.crypto.codec import new_context_proto, read_seeded_public_key
from tip_fed.crypto.naive import baseline_public_context_bytes
from tip_fed.crypto.sanitise import FLOOD_STD
from tip_fed.errors import CodecError, ConfigError, CryptoError, InsecureParametersError
from tip_fed.testing import secret_key_bytes

DIM, ROWS = 256, 4400  # two blocks: 4096 rows + a block of 512 for the other 304


@pytest.fixture(scope="module")
def session():  # type: ignore[no-untyped-def]
    plan = plan_packing(DIM, ROWS)
    keys = SessionKeys.generate(plan)
    public = keys.public_context_bytes()
    ctx = load_public_context(public, plan.params)
    rng = np.random.default_rng(0)
    x = rng.normal(size=DIM)
    rows = rng.normal(size=(ROWS, DIM))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    query = encrypt_query(keys, plan, x)
    replies = score_rows(ctx, plan, query, rows, rng=rng)
    yield plan, keys, public, ctx, query, replies, x, rows
    keys.destroy()


def test_public_context_has_no_secret_key(session) -> None:  # type: ignore[no-untyped-def]
    plan, keys, public, ctx, query, replies, *_ = session
    assert not ctx.context.is_private() and not ctx.context.has_secret_key()
    assert ctx.context.is_public() and ctx.context.has_public_key()
    assert not ctx.context.has_relin_keys()
    assert not new_context_proto(public).HasField("private_context")
    secret = secret_key_bytes(keys)
    raw = secret_key_bytes(keys, raw=True)
    assert len(secret) > 10_000 and len(raw) == 8 * 4 * plan.params.poly_modulus_degree
    windows = [raw[i : i + 32] for i in range(0, len(raw), len(raw) // 16)]
    for blob in [public, *query, *replies]:
        assert secret not in blob
        assert not any(w in blob for w in windows)
    fp = keys.secret_key_fingerprint()
    assert len(fp) == 64 and fp == keys.secret_key_fingerprint()
    assert fp.encode() not in public


def test_only_needed_galois_keys_are_shipped(session) -> None:  # type: ignore[no-untyped-def]
    plan, _keys, public, ctx, *_ = session
    ctx.require_rotations(plan.galois_steps)  # all present
    with pytest.raises(CryptoError, match="lacks rotation keys"):
        ctx.require_rotations((3,))
    # 2 + log2(R) seeded keys: far below TenSEAL's default public context (~35 MB).
    assert len(public) < 6_000_000
    assert len(new_context_proto(public).public_context.galois_keys) > 0


def test_the_public_key_is_shipped_seeded(session) -> None:  # type: ignore[no-untyped-def]
    """Only b and a 64-byte seed travel (half of TenSEAL's serialisation); the seller's digest is of
    the key, and the same for every load; the baseline context carries the seeded key too."""
    plan, keys, public, ctx, *_ = session
    pk = bytes(new_context_proto(public).public_context.public_key)
    seeded = read_seeded_public_key(pk, plan.params)
    n_key = len(plan.params.coeff_mod_bit_sizes) * plan.params.poly_modulus_degree
    assert seeded.prng in (1, 2) and len(seeded.seed) == 64 and len(seeded.b) == 8 * n_key
    assert len(pk) < 8 * n_key  # one polynomial of u64 at most: the a half is not in it
    assert ctx.public_key_digest == seeded.digest() == load_public_context(public, plan).public_key_digest
    assert load_public_context(baseline_public_context_bytes(keys), plan).public_key_digest == seeded.digest()


def test_fresh_keys_per_session() -> None:
    plan = plan_packing(64, 1)
    a, b = SessionKeys.generate(plan), SessionKeys.generate(plan)
    assert a.secret_key_fingerprint() != b.secret_key_fingerprint()
    x = np.linspace(-1, 1, 64)
    rows = np.eye(64)[:3]
    query = encrypt_query(a, plan, x)
    replies = score_rows(a.public_context(), plan, query, rows, rng=np.random.default_rng(0))
    # Another session's secret key decrypts to garbage (CKKS cannot tell); ours is exact.
    np.testing.assert_allclose(decrypt_scores(a, plan, replies, 3), x[:3], atol=1e-6 + 8 * FLOOD_STD)
    assert not np.allclose(decrypt_scores(b, plan, replies, 3), x[:3], atol=1e-3)


def test_destroy(session) -> None:  # type: ignore[no-untyped-def]
    plan = plan_packing(64, 1)
    keys = SessionKeys.generate(plan)
    ctx = keys.public_context()
    query = encrypt_query(keys, plan, np.ones(64))
    replies = score_rows(ctx, plan, query, np.eye(64)[:2], rng=np.random.default_rng(0))
    assert not keys.destroyed
    keys.destroy()
    assert keys.destroyed
    for call in (
        lambda: decrypt_scores(keys, plan, replies, 2),
        lambda: encrypt_query(keys, plan, np.ones(64)),
        keys.secret_key_fingerprint,
        lambda: secret_key_bytes(keys),
    ):
        with pytest.raises(CryptoError, match="destroyed"):
            call()
    keys.destroy()  # idempotent


def _garbage(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_bad_ciphertext_bytes(session) -> None:  # type: ignore[no-untyped-def]
    plan, keys, _public, ctx, query, replies, _x, rows = session
    good = replies[0]
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    header_only = good[:16]
    bad_replies = {
        "empty": b"",
        "garbage": _garbage(len(good)),
        "truncated": good[: len(good) // 2],
        "header only": header_only,
        "oversized": good[:16] + b"\0" * 2_000_000,
        "not bytes": "text",
        "query as reply": query[0],  # wrong level and scale
    }
    for name, blob in bad_replies.items():
        with pytest.raises(CodecError) as info:
            decrypt_scores(keys, plan, [blob, replies[1]], ROWS)
        assert "reply ciphertext 0" in str(info.value), name
    # A flipped byte inside the data may still parse (SEAL has no integrity check; the protocol
    # adds hashes): it must either raise CodecError or decrypt, never crash.
    with contextlib.suppress(CodecError):
        decrypt_scores(keys, plan, [bytes(flipped), replies[1]], ROWS)
    rng = np.random.default_rng(0)
    for blob in (b"", _garbage(1000), query[0][:-10], replies[0]):
        with pytest.raises(CodecError, match="query ciphertext 0"):
            score_rows(ctx, plan, [blob, *query[1:]], rows, rng=rng)
    with pytest.raises(CodecError, match="list"):
        score_rows(ctx, plan, query[0], rows, rng=rng)  # bytes, not a list


def test_wrong_ring_dimension_ciphertext(session) -> None:  # type: ignore[no-untyped-def]
    plan, _keys, _public, ctx, _query, replies, x, rows = session
    big_plan = plan_packing(DIM, ROWS, HEParams(16384, (60, 40, 40, 60), 40))
    big_keys = SessionKeys.generate(big_plan)
    big_query = encrypt_query(big_keys, big_plan, x)
    with pytest.raises(CodecError):
        score_rows(ctx, plan, big_query, rows, rng=np.random.default_rng(0))
    with pytest.raises(CodecError):
        decrypt_scores(big_keys, big_plan, [replies[0]], 10)
    # A context for other parameters is refused against the session's parameters.
    with pytest.raises(CodecError, match="N=16384"):
        load_public_context(big_keys.public_context_bytes(), plan.params)
    big_keys.destroy()


def test_bad_context_bytes(session) -> None:  # type: ignore[no-untyped-def]
    plan, _keys, public, *_ = session
    for blob in (b"", _garbage(5000), public[: len(public) // 2], public[:-1], public[:100]):
        with pytest.raises(CodecError):
            load_public_context(blob, plan.params)
    with pytest.raises(CodecError, match="bytes"):
        load_public_context("context", plan.params)  # type: ignore[arg-type]
    other = HEParams(8192, (54, 40, 40, 60), 40)
    other_keys = SessionKeys.generate(plan_packing(DIM, ROWS, other))
    with pytest.raises(CodecError, match="primes"):
        load_public_context(other_keys.public_context_bytes(), plan.params)
    other_keys.destroy()
    with pytest.raises(InsecureParametersError, match="128"):
        load_public_context(public, HEParams(4096, (40, 40, 40, 40), 40))
    with pytest.raises(ConfigError):
        load_public_context(public, HEParams(8192, (60, 40, 60), 40))


def test_private_context_is_refused(session) -> None:  # type: ignore[no-untyped-def]
    plan, keys, _public, *_ = session
    private = keys._tenseal_context().serialize(save_secret_key=True)
    with pytest.raises(CryptoError, match="refusing a context that contains a secret key"):
        load_public_context(private, plan.params)
    # The message names no key material.
    try:
        load_public_context(private, plan.params)
    except CryptoError as exc:
        assert len(str(exc)) < 300


def test_insecure_context_is_refused(session) -> None:  # type: ignore[no-untyped-def]
    """A context whose own parameters are insecure is refused even if the caller's are fine."""
    sa = pytest.importorskip("tenseal.sealapi")
    import os
    import tempfile

    plan, _keys, public, *_ = session
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(8192)
    parms.set_coeff_modulus(sa.CoeffModulus.Create(8192, [60, 60, 60, 60, 60]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "parms")
        parms.save(path)
        with open(path, "rb") as fh:
            insecure = fh.read()
    msg = new_context_proto(public)
    msg.encryption_parameters = insecure
    with pytest.raises(InsecureParametersError, match="128"):
        load_public_context(msg.SerializeToString(), plan.params)
