"""Packed encrypted scoring: accuracy against numpy, output masking, input validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tip_fed.crypto import HEParams, PackingPlan, decrypt_scores, encrypt_query, plan_packing, score_rows
from tip_fed.crypto.codec import seal_to_bytes
from tip_fed.crypto.keys import PublicContext, SessionKeys, load_public_context
from tip_fed.crypto.naive import baseline_public_context_bytes, decrypt_naive, encrypt_query_naive, score_rows_naive
from tip_fed.crypto.packing import _Scorer
from tip_fed.crypto.sanitise import FLOOD_STD
from tip_fed.errors import CodecError, ConfigError, CryptoError, DataError

Session = tuple[PackingPlan, SessionKeys, PublicContext]
_SESSIONS: dict[int, Session] = {}



# CKKS error (~1e-7 here) plus 8 std of the sanitising flood on output slots (slot units).
TOL = 1e-6 + 8 * FLOOD_STD

def _session(dim: int) -> Session:
    """One key pair per dimension for the whole module (key generation is the slow part)."""
    if dim not in _SESSIONS:
        plan = plan_packing(dim, 1)
        keys = SessionKeys.generate(plan)
        _SESSIONS[dim] = (plan, keys, load_public_context(keys.public_context_bytes(), plan.params))
    return _SESSIONS[dim]


@pytest.fixture(scope="module", autouse=True)
def _drop_sessions() -> None:
    yield
    for _, keys, _ in _SESSIONS.values():
        keys.destroy()
    _SESSIONS.clear()


def _data(dim: int, n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Query of norm ~3, rows of norm 0.1..1; row 0 leans towards x so that max|M x| is not
    tiny by chance (the accuracy bound is relative to it)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dim)
    x *= 3.0 / np.linalg.norm(x)
    rows = rng.normal(size=(n_rows, dim))
    rows[0] += 0.5 * np.sqrt(dim) * x / np.linalg.norm(x)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows *= rng.uniform(0.1, 1.0, size=(n_rows, 1))
    return x, rows


def _roundtrip(
    dim: int, rows: np.ndarray, x: np.ndarray, **kw: float
) -> tuple[np.ndarray, list[bytes]]:
    plan, keys, ctx = _session(dim)
    query = encrypt_query(keys, plan, x)
    replies = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(1), **kw)
    assert len(replies) == plan.blocks(rows.shape[0])
    return decrypt_scores(keys, plan, replies, rows.shape[0]), replies


CASES = [
    (64, 1),
    (64, 63),
    (64, 64),
    (64, 67),
    (100, 1),
    (100, 127),
    (100, 128),
    (100, 131),
    (256, 1),
    (256, 255),
    (256, 256),
    (256, 259),
    (1024, 1),
    (1024, 1027),
    (4096, 1),
    (5000, 3),  # dim > slots: two chunks of 4096
]


@pytest.mark.parametrize(("dim", "n_rows"), CASES)
def test_scores_match_numpy(dim: int, n_rows: int) -> None:
    x, rows = _data(dim, n_rows, seed=dim + n_rows)
    scores, _ = _roundtrip(dim, rows, x)
    expected = rows @ x
    assert scores.dtype == np.float64 and scores.shape == (n_rows,)
    err = np.max(np.abs(scores - expected))
    assert err < 1e-6 * np.max(np.abs(expected)) + 8 * FLOOD_STD, err  # relative CKKS error + absolute flooding


def test_zero_rows_and_tiny_values() -> None:
    """All-zero rows (no non-zero diagonal) still give a valid, masked reply."""
    plan, keys, ctx = _session(100)
    x = np.ones(100)
    rows = np.zeros((5, 100))
    rows[2, 7] = 1e-14  # below the encoding precision: encodes to a zero plaintext
    query = encrypt_query(keys, plan, x)
    replies = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(0))
    np.testing.assert_allclose(decrypt_scores(keys, plan, replies, 5), 0.0, atol=TOL)


def _unmasked_slots(
    keys: SessionKeys, ctx: PublicContext, plan: PackingPlan, query: list[bytes], rows: np.ndarray
) -> np.ndarray:
    """Decrypted slots of one block's BSGS result *before* its mask: the partial sums of the seller's
    rows that masking hides, which is why score_rows never returns them."""
    matrix = np.asarray(rows, dtype=np.float64)
    assert matrix.shape[0] <= plan.rows_per_block  # one block
    scorer = _Scorer(ctx, plan, query)
    (block,) = plan.layout(matrix.shape[0])
    res = scorer.bsgs(scorer.encoded(matrix, block, None), block)
    if res is None:
        return np.zeros(plan.slots)
    return keys.decrypt_slots(seal_to_bytes(res, "saving the unmasked result"), "unmasked BSGS result", any_level=True)


def _assert_uniform_fill(fill: np.ndarray, bound: float) -> None:
    assert np.all(np.abs(fill) <= bound * (1 + 1e-6))
    ks = stats.kstest(fill, "uniform", args=(-bound, 2 * bound))
    assert ks.pvalue > 1e-3, ks
    assert abs(np.mean(fill)) < 0.1 * bound
    assert abs(np.var(fill) / (bound**2 / 3) - 1) < 0.1


def test_non_output_slots_are_random_not_partial_sums() -> None:
    dim, n_rows = 256, 100  # a block of 256 rows, D = 16: folded, so most slots are fill
    plan, keys, ctx = _session(dim)
    x, rows = _data(dim, n_rows, seed=7)
    query = encrypt_query(keys, plan, x)
    partial = _unmasked_slots(keys, ctx, plan, query, rows)
    r = plan.block_rows(n_rows)[0]
    assert plan.diagonals(r) < plan.chunk_dim  # this block is folded, hence masked
    out = plan.output_slots(r, n_rows)
    other = np.setdiff1d(np.arange(plan.slots), out)
    # Unmasked, the non-output slots really are partial sums of the seller's data.
    assert np.std(partial[other]) > 0.05
    np.testing.assert_allclose(partial[out], rows @ x, atol=1e-6)

    for bound in (2.0**12, 2.0**-4):
        rng = np.random.default_rng(3)
        (reply,) = score_rows(ctx, plan, query, rows, rng=rng, fill_bound=bound)
        slots = keys.decrypt_slots(reply, "reply")
        np.testing.assert_allclose(slots[out], rows @ x, atol=TOL)
        fill = slots[other]
        assert abs(np.corrcoef(fill, partial[other])[0, 1]) < 0.1
        _assert_uniform_fill(fill, bound)


def test_full_blocks_hold_only_scores_and_skip_the_mask() -> None:
    """A block of S rows is not folded: before any mask every slot is its own row's score (0 for
    absent rows), so the reply is unmasked and its non-output slots are nothing but fill."""
    dim, n_rows = 16, 300  # k = 16: every block has S rows and D = k products
    plan, keys, ctx = _session(dim)
    x, rows = _data(dim, n_rows, seed=8)
    query = encrypt_query(keys, plan, x)
    assert plan.block_rows(n_rows) == [plan.slots]
    partial = _unmasked_slots(keys, ctx, plan, query, rows)
    out = plan.output_slots(plan.slots, n_rows)
    np.testing.assert_array_equal(out, np.arange(n_rows))
    np.testing.assert_allclose(partial[:n_rows], rows @ x, atol=1e-6)
    np.testing.assert_allclose(partial[n_rows:], 0.0, atol=1e-6)
    (reply,) = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(4))
    slots = keys.decrypt_slots(reply, "reply")
    np.testing.assert_allclose(slots[:n_rows], rows @ x, atol=TOL)
    _assert_uniform_fill(slots[n_rows:], 2.0**12)


def test_replies_are_rerandomised() -> None:
    plan, keys, ctx = _session(64)
    x, rows = _data(64, 10, seed=3)
    query = encrypt_query(keys, plan, x)
    a = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(5))[0]
    b = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(5))[0]
    # Same rng for the fill, but the fresh public-key encryption differs every time.
    assert a != b
    np.testing.assert_allclose(
        decrypt_scores(keys, plan, [a], 10), decrypt_scores(keys, plan, [b], 10), atol=2 * TOL
    )


def test_flooding_noise_is_applied() -> None:
    _plan, _keys, _ctx = _session(64)
    x, rows = _data(64, 64, seed=4)
    scores, _ = _roundtrip(64, rows, x, flood_std=1e-3)
    residual = scores - rows @ x
    assert 0.5e-3 < np.std(residual) < 2e-3


def test_input_validation() -> None:
    plan, keys, ctx = _session(64)
    x, rows = _data(64, 4, seed=5)
    query = encrypt_query(keys, plan, x)
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="length 64"):
        encrypt_query(keys, plan, np.ones(63))
    with pytest.raises(DataError, match="NaN"):
        encrypt_query(keys, plan, np.full(64, np.nan))
    with pytest.raises(DataError, match="norm"):
        encrypt_query(keys, plan, np.full(64, 1e4))
    with pytest.raises(DataError, match="shape"):
        score_rows(ctx, plan, query, np.ones(64), rng=rng)
    with pytest.raises(DataError, match="shape"):
        score_rows(ctx, plan, query, np.ones((3, 65)) / 10, rng=rng)
    with pytest.raises(DataError, match="norm"):
        score_rows(ctx, plan, query, rows * 2, rng=rng)
    with pytest.raises(DataError, match="NaN"):
        score_rows(ctx, plan, query, np.where(rows > 0.1, np.inf, rows), rng=rng)
    with pytest.raises(ConfigError, match="rng"):
        score_rows(ctx, plan, query, rows, rng=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="fill_bound"):
        score_rows(ctx, plan, query, rows, rng=rng, fill_bound=0.0)
    with pytest.raises(ConfigError, match="flood_std"):
        score_rows(ctx, plan, query, rows, rng=rng, flood_std=float("nan"))
    with pytest.raises(CodecError, match=f"expected {plan.baby} query"):
        score_rows(ctx, plan, query * 2, rows, rng=rng)
    replies = score_rows(ctx, plan, query, rows, rng=rng)
    with pytest.raises(CodecError, match="expected 2 reply"):
        decrypt_scores(keys, plan, replies, plan.rows_per_block + 1)
    with pytest.raises(ConfigError):
        decrypt_scores(keys, plan, replies, 0)


def test_context_for_another_plan_is_refused() -> None:
    plan4096, keys4096, _ = _session(4096)
    _plan1024, _keys1024, ctx1024 = _session(1024)
    x, rows = _data(4096, 2, seed=6)
    # Same parameters, but the 1024-plan context lacks the fold keys (1024, 2048) of the 4096-plan.
    with pytest.raises(CryptoError, match="rotation keys"):
        score_rows(
            ctx1024, plan4096, encrypt_query(keys4096, plan4096, x), rows, rng=np.random.default_rng(0)
        )


def test_deeper_parameters() -> None:
    """Extra primes are allowed: the reply is mod-switched down to the last level."""
    plan = plan_packing(64, 5, HEParams(16384, (60, 40, 40, 40, 60), 40))
    keys = SessionKeys.generate(plan)
    x, rows = _data(64, 5, seed=9)
    query = encrypt_query(keys, plan, x)
    replies = score_rows(keys.public_context(), plan, query, rows, rng=np.random.default_rng(0))
    np.testing.assert_allclose(decrypt_scores(keys, plan, replies, 5), rows @ x, atol=TOL)
    keys.destroy()


def test_naive_baseline_matches() -> None:
    """The benchmark baseline (one `dot` per score) is correct, so the speedup is fair."""
    plan, keys, _ = _session(64)
    ctx = load_public_context(baseline_public_context_bytes(keys), plan.params)
    x, rows = _data(64, 3, seed=8)
    replies = score_rows_naive(ctx, encrypt_query_naive(keys, x), rows)
    assert len(replies) == 3
    np.testing.assert_allclose(decrypt_naive(keys, replies), rows @ x, atol=1e-5)


def test_a_loaded_query_scores_as_its_bytes_and_is_checked_before_scoring() -> None:
    """``load_query`` runs every check of the query before anything is scored; a query loaded once
    gives the same scores as its bytes, and is refused for another context or noise too large."""
    from tip_fed.crypto.query import load_query

    plan, keys, ctx = _session(16)
    x, rows = _data(16, 5, 3)
    query = encrypt_query(keys, plan, x)
    loaded = load_query(ctx, plan, query, noise_std=1.0)
    got = decrypt_scores(keys, plan, score_rows(ctx, plan, loaded, rows, rng=np.random.default_rng(1)), len(rows))
    np.testing.assert_allclose(got, rows @ x, atol=TOL)
    with pytest.raises(CodecError):
        load_query(ctx, plan, [query[0][: len(query[0]) // 2], *query[1:]])
    with pytest.raises(ConfigError, match="exceeds"):
        load_query(ctx, plan, query, noise_std=1e3)
    _, _, other = _session(32)
    with pytest.raises(ConfigError, match="loaded for another public context"):
        score_rows(other, plan, loaded, rows, rng=np.random.default_rng(1))
