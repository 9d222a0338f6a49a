"""Seller-side encoding cache: bit-identical results, key-independence, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from tip_fed.crypto import EncodingCache, HEParams, decrypt_scores, plan_packing, score_rows
from tip_fed.crypto.codec import seal_to_bytes
from tip_fed.crypto.packing import _Scorer
from tip_fed.errors import ConfigError

from ...conftest import open_session

DIM = 64


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=DIM)
    rows = rng.normal(size=(n, DIM))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return x, rows


def _bsgs(scorer: _Scorer, rows: np.ndarray, cache: EncodingCache | None = None):  # type: ignore[no-untyped-def]
    """Unmasked BSGS result of one block, encodings through ``cache``."""
    (block,) = scorer.plan.layout(rows.shape[0])
    return scorer.bsgs(scorer.encoded(rows, block, cache), block)


@pytest.fixture(scope="module")
def plan():  # type: ignore[no-untyped-def]
    return plan_packing(DIM, 1, HEParams())


def test_cached_bsgs_is_bit_identical_and_key_independent(plan) -> None:  # type: ignore[no-untyped-def]
    x, rows = _rows(20, 0)
    cache = EncodingCache()
    blobs = []
    for _ in range(2):  # two sessions, two unrelated key pairs, one cache
        keys, ctx, query = open_session(plan, x)
        plain = seal_to_bytes(_bsgs(_Scorer(ctx, plan, query), rows))
        cached = seal_to_bytes(_bsgs(_Scorer(ctx, plan, query), rows, cache))
        assert cached == plain  # the encoded plaintexts are exactly the fresh ones
        replies = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(1), cache=cache)
        np.testing.assert_allclose(decrypt_scores(keys, plan, replies, 20), rows @ x, atol=1e-4)
        blobs.append(plain)
        keys.destroy()
    assert cache.hits == 3 and cache.misses == 1 and len(cache) == 1


def test_changed_rows_miss_and_memory_stays_bounded(plan) -> None:  # type: ignore[no-untyped-def]
    x, rows = _rows(8, 2)
    keys, ctx, query = open_session(plan, x)
    probe = EncodingCache()
    _bsgs(_Scorer(ctx, plan, query), rows, probe)
    one_block = probe.bytes
    cache = EncodingCache(max_bytes=int(one_block * 1.5))
    scorer = _Scorer(ctx, plan, query)
    _bsgs(scorer, rows, cache)
    changed = rows.copy()
    changed[0, 0] = -changed[0, 0]
    _bsgs(scorer, changed, cache)
    assert cache.misses == 2 and cache.hits == 0
    assert len(cache) == 1 and cache.bytes <= cache.max_bytes
    keys.destroy()


def test_rejects_bad_budget() -> None:
    with pytest.raises(ConfigError):
        EncodingCache(max_bytes=-1)


def test_forked_workers_give_the_same_replies(plan) -> None:  # type: ignore[no-untyped-def]
    x, rows = _rows(3 * plan.rows_per_block - 5, 4)  # three blocks, the last one partial
    keys, ctx, query = open_session(plan, x)
    cache = EncodingCache()
    serial = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(7))
    forked = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(7), workers=2, cache=cache)
    assert len(serial) == len(forked) == 3 and len(cache) == 3  # the parent kept the encodings
    for a, b in zip(serial, forked, strict=True):  # same fill in every non-output slot, same scores
        np.testing.assert_allclose(keys.decrypt_slots(a, "serial"), keys.decrypt_slots(b, "forked"), atol=1e-4)
    n = rows.shape[0]
    np.testing.assert_allclose(decrypt_scores(keys, plan, forked, n), rows @ x, atol=1e-4)
    with pytest.raises(ConfigError):
        score_rows(ctx, plan, query, rows, rng=np.random.default_rng(7), workers=0)
    keys.destroy()
