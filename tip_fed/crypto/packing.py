"""Encrypted matrix-vector scores y = M x, many per ciphertext (BSGS diagonal method).

Roles: the buyer encrypts the query x (:func:`encrypt_query`) and decrypts the scores
(:func:`decrypt_scores`); a seller holding rows M and only a :class:`PublicContext` computes
Enc(M x) (:func:`score_rows`) without decrypting anything.

Layout and evaluation follow reference/platform.md §3.4 (notation there): interleaved query
X[b + R c] = x[(c + b K') mod k]; plaintext generalised diagonals pre-rotated per giant step;
baby steps chained rot(., R) and giant steps combined Horner-style with rot(., R B'), so the
seller needs only 2 + log2(R) rotation keys; a log2(R) fold leaves row j's score in slot j R.

Levels: all products, giant-step rotations and fold rotations run at the query level, with
scale^2, and are rescaled once at the end, so rotation key-switching noise is negligible
(~1e-8 absolute instead of ~1e-6 when rotating after the rescale). The second level is spent
on the output mask.

Output protection (§3.7): every slot that is not a requested score holds a partial sum of the
seller's data after the BSGS, so each reply is multiplied by a 0/1 mask (the last rescale), then
gets a fresh public-key encryption of a fill vector added: uniform values in
[-fill_bound, fill_bound] in every non-output slot (from the caller's ``rng``) and Gaussian
flooding noise (std ``flood_std``, from OS entropy) in the output slots. The added encryption
also re-randomises the ciphertext. Replies carry no integrity check: a flipped byte can still
parse, so the protocol must hash/sign what it sends.

Performance (benchmarks/README.md): a seller's encoded diagonals depend only on its rows and the
parameters, so an :class:`~tip_fed.crypto.EncodingCache` skips encoding on repeated queries;
``workers`` spreads blocks over forked processes (sealapi holds the GIL, so threads cannot). The
one-score-per-ciphertext baseline lives in :mod:`tip_fed.crypto.naive`.

Value limits: rows must have L2 norm <= 1 and the query norm must be <= MAX_QUERY_NORM (2^12),
so |y_j| <= 2^12 and nothing overflows the last level's 60-bit prime.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

import numpy as np
import tenseal.sealapi as sa

from tip_fed.errors import CodecError, ConfigError, CryptoError, DataError

from .codec import ciphertext_from_bytes, seal_to_bytes, tenseal_errors
from .encoding_cache import EncodedBlock, EncodingCache
from .keys import PublicContext, SessionKeys
from .parallel import map_forked
from .params import DEFAULT_FILL_BOUND, MAX_QUERY_NORM, HEParams, PackingPlan

__all__ = [
    "encrypt_query",
    "score_rows",
    "decrypt_scores",
    "bsgs_slots_unmasked",
]

_ROW_NORM_TOL = 1e-9
_MAX_FILL_BOUND = 2.0**16


# ---- validation --------------------------------------------------------------------------------
def _same_params(plan: PackingPlan, params: HEParams, who: str) -> None:
    if not isinstance(plan, PackingPlan):
        raise ConfigError(f"expected a PackingPlan, got {type(plan).__name__}")
    if plan.params != params:
        raise ConfigError(
            f"the packing plan is for {plan.params} but the {who} uses {params}; use the plan "
            "the session keys were generated for"
        )


def _query_vector(x: object, dim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.ndim != 1 or arr.shape[0] != dim:
        raise DataError(
            f"query must be a 1-D real array of length {dim} (the plan's dim), got shape "
            f"{arr.shape} dtype {arr.dtype}"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError("query contains NaN or infinite values; clean it before encrypting")
    norm = float(np.linalg.norm(arr))
    if norm > MAX_QUERY_NORM:
        raise DataError(
            f"query L2 norm {norm:.4g} exceeds {MAX_QUERY_NORM:g}: scores would overflow the "
            "last CKKS level; rescale the query (scores scale linearly)"
        )
    return arr


def _rows_matrix(rows: object, dim: int) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] < 1:
        raise DataError(
            f"rows must be a 2-D real array of shape (n_rows >= 1, {dim}), got shape "
            f"{arr.shape} dtype {arr.dtype}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError("rows contain NaN or infinite values; drop or clean those samples")
    norms = np.linalg.norm(arr, axis=1)
    worst = int(np.argmax(norms))
    if norms[worst] > 1.0 + _ROW_NORM_TOL:
        raise DataError(
            f"row {worst} has L2 norm {norms[worst]:.6g} > 1; clip every row to the public "
            "norm bound (divide by max(1, norm)) before scoring"
        )
    return arr


def _blob_list(items: object, count: int, what: str) -> list[bytes]:
    if not isinstance(items, (list, tuple)):
        raise CodecError(f"{what} must be a list of bytes, got {type(items).__name__}")
    if len(items) != count:
        raise CodecError(f"expected {count} {what} ciphertext(s), got {len(items)}")
    return list(items)


# ---- layout ------------------------------------------------------------------------------------
def _slot_index(plan: PackingPlan) -> tuple[np.ndarray, np.ndarray]:
    """For every slot t = b + R c: its row/coordinate c and the class offset c + b K'."""
    t = np.arange(plan.slots, dtype=np.int64)
    c = t // plan.replication
    base = c + (t % plan.replication) * plan.diagonals
    return c, base


def _query_slots(plan: PackingPlan, x: np.ndarray) -> list[np.ndarray]:
    """Interleaved layout X[b + R c] = x_chunk[(c + b K') mod k_c], one array per chunk."""
    kc = plan.chunk_dim
    padded = np.zeros(plan.padded_dim)
    padded[: plan.dim] = x
    _, base = _slot_index(plan)
    return [padded[i * kc : (i + 1) * kc][base % kc] for i in range(plan.chunks)]


def _giant_diagonals(
    plan: PackingPlan, block: np.ndarray, g: int, c: np.ndarray, base: np.ndarray
) -> np.ndarray:
    """Pre-rotated plaintext diagonals D'_{g,h}, h = 0..B'-1, for one chunk of one block.

    D_{g,h}[b + R c] = M[c, (c + b K' + g B' + h) mod k_c], then rolled right by R g B'.
    ``block`` is (n_rows_in_block, k_c); slots of absent rows stay zero.
    """
    kc, n = plan.chunk_dim, block.shape[0]
    present = c < n
    offsets = g * plan.baby + np.arange(plan.baby, dtype=np.int64)
    cols = (base[None, present] + offsets[:, None]) % kc
    diag = np.zeros((plan.baby, plan.slots))
    diag[:, present] = block[c[present][None, :], cols]
    return np.roll(diag, plan.replication * g * plan.baby, axis=1)


def _chunk_blocks(plan: PackingPlan, rows: np.ndarray) -> list[np.ndarray]:
    """Column chunks of a block of rows, zero-padded to k_c columns each."""
    kc = plan.chunk_dim
    out = []
    for i in range(plan.chunks):
        part = np.zeros((rows.shape[0], kc))
        cols = rows[:, i * kc : min(plan.dim, (i + 1) * kc)]
        part[:, : cols.shape[1]] = cols
        out.append(part)
    return out


# ---- buyer -------------------------------------------------------------------------------------
def encrypt_query(keys: SessionKeys, plan: PackingPlan, x: np.ndarray) -> list[bytes]:
    """Encrypt the query in the plan's interleaved layout: one seeded ciphertext per chunk."""
    if not isinstance(keys, SessionKeys):
        raise ConfigError(f"expected SessionKeys, got {type(keys).__name__}")
    _same_params(plan, keys.params, "session keys")
    vec = _query_vector(x, plan.dim)
    return [keys.encrypt_slots(slots) for slots in _query_slots(plan, vec)]


def decrypt_scores(
    keys: SessionKeys, plan: PackingPlan, replies: list[bytes], n_rows: int
) -> np.ndarray:
    """Decrypt a seller's replies into ``n_rows`` float64 scores (row order preserved)."""
    if not isinstance(keys, SessionKeys):
        raise ConfigError(f"expected SessionKeys, got {type(keys).__name__}")
    _same_params(plan, keys.params, "session keys")
    if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)) or n_rows < 1:
        raise ConfigError(f"n_rows must be an integer >= 1, got {n_rows!r}")
    blobs = _blob_list(replies, plan.blocks(n_rows), f"reply (for {n_rows} rows)")
    out = np.empty(int(n_rows), dtype=np.float64)
    rpb = plan.rows_per_block
    for i, blob in enumerate(blobs):
        n_in = min(rpb, n_rows - i * rpb)
        slots = keys.decrypt_slots(blob, what=f"reply ciphertext {i}")
        out[i * rpb : i * rpb + n_in] = slots[plan.output_slots(n_in)]
    return out


# ---- seller ------------------------------------------------------------------------------------
class _Scorer:
    """One seller's evaluation state for one query (baby steps are shared by all blocks)."""

    def __init__(
        self,
        ctx: PublicContext,
        plan: PackingPlan,
        query: list[bytes],
        timings: dict[str, float] | None = None,
    ) -> None:
        self.plan, self.ctx, self.h = plan, ctx, ctx.handles
        # Seconds per phase, accumulated (the benchmark's cost breakdown; perf_counter is ~0.1 us).
        self.timings: dict[str, float] = timings if timings is not None else {}
        self._masks: dict[int, Any] = {}  # output-mask plaintext per rows-in-block
        t0 = time.perf_counter()
        ctx.require_rotations(plan.galois_steps)
        self.ev: Any = self.h.evaluator
        self.gk: Any = ctx.galois_keys
        blobs = _blob_list(query, plan.chunks, "query")
        self.baby: list[list[Any]] = []
        with tenseal_errors("rotating the query (baby steps)", CryptoError):
            for i, blob in enumerate(blobs):
                ct = ciphertext_from_bytes(
                    self.h.seal_context,
                    plan.params,
                    blob,
                    what=f"query ciphertext {i}",
                    parms_id=self.h.first_parms_id,
                    scale=plan.params.global_scale,
                )
                steps = [ct]
                for _ in range(1, plan.baby):
                    steps.append(self._rotate(steps[-1], plan.replication))
                self.baby.append(steps)
        self.c, self.base = _slot_index(plan)
        self._tick("baby_rotations", t0)

    def _tick(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - t0
        return now

    def _rotate(self, ct: Any, step: int) -> Any:
        out = sa.Ciphertext()
        self.ev.rotate_vector(ct, step, self.gk, out)
        return out

    def _encode(self, values: np.ndarray, parms_id: Any, scale: float) -> Any:
        pt = sa.Plaintext()
        self.h.encoder.encode(values.tolist(), parms_id, scale, pt)
        return pt

    def encode_block(self, rows: np.ndarray) -> EncodedBlock:
        """Pre-rotated diagonals of one block as plaintexts at the query level (zeros skipped)."""
        p = self.plan
        parts = _chunk_blocks(p, rows)
        out: EncodedBlock = []
        for g in range(p.giant):
            step: list[tuple[int, int, Any]] = []
            for chunk, part in enumerate(parts):
                diags = _giant_diagonals(p, part, g, self.c, self.base)
                for h_idx in range(p.baby):
                    if not diags[h_idx].any():
                        continue
                    pt = self._encode(diags[h_idx], self.h.first_parms_id, p.params.global_scale)
                    if not pt.is_zero():  # values below the encoding precision
                        step.append((chunk, h_idx, pt))
            out.append(step)
        return out

    def encoded(self, rows: np.ndarray, cache: EncodingCache | None) -> EncodedBlock:
        """The block's plaintexts: from ``cache`` when present there, else encoded (and stored)."""
        p = self.plan
        t = time.perf_counter()
        encoded, key = None, None
        if cache is not None:
            key = EncodingCache.key(p, self.h.first_parms_id, p.params.global_scale, rows)
            encoded = cache.get(key)
            t = self._tick("cache_lookup", t)
        if encoded is None:
            encoded = self.encode_block(rows)
            if cache is not None:
                cache.put(key, encoded)
            self._tick("encode", t)
        return encoded

    def bsgs(self, rows: np.ndarray, cache: EncodingCache | None = None) -> Any | None:
        """Unmasked BSGS + fold for one block (None when every product is zero)."""
        p, ev = self.plan, self.ev
        encoded = self.encoded(rows, cache)
        t = time.perf_counter()
        inner: list[Any | None] = []
        for step in encoded:
            acc = None
            for chunk, h_idx, pt in step:
                prod = sa.Ciphertext()
                ev.multiply_plain(self.baby[chunk][h_idx], pt, prod)
                if acc is None:
                    acc = prod
                else:
                    ev.add_inplace(acc, prod)
            inner.append(acc)
        t = self._tick("multiply_add", t)
        res = None
        for g in reversed(range(p.giant)):  # Horner: res = rot(res, R B') + inner_g
            if res is not None:
                res = self._rotate(res, p.replication * p.baby)
            if inner[g] is not None:
                if res is None:
                    res = inner[g]
                else:
                    ev.add_inplace(res, inner[g])
        step = p.replication // 2
        while res is not None and step >= 1:
            ev.add_inplace(res, self._rotate(res, step))
            step //= 2
        t = self._tick("rotate_fold", t)
        if res is not None:
            # One rescale at the very end: every rotation's key-switching noise was added at
            # scale^2, where it is ~2^40 times smaller relative to the values.
            ev.rescale_to_next_inplace(res)
        self._tick("rescale", t)
        return res

    def protect(
        self,
        res: Any | None,
        n_in: int,
        fill: np.ndarray,
        flood_std: float,
    ) -> bytes:
        """Mask to the output slots, add Enc(fill + flooding noise), serialise.

        ``fill`` (uniform values for the non-output slots) is drawn by the caller, block by
        block in order, so the result does not depend on which process scores the block.
        """
        p, ev, h = self.plan, self.ev, self.h
        t = time.perf_counter()
        out_slots = p.output_slots(n_in)
        if res is not None:
            if n_in not in self._masks:  # every full block shares one mask plaintext
                mask = np.zeros(p.slots)
                mask[out_slots] = 1.0
                self._masks[n_in] = self._encode(mask, res.parms_id(), h.primes[-2])
            ev.multiply_plain_inplace(res, self._masks[n_in])
            ev.rescale_to_next_inplace(res)
            ev.mod_switch_to_inplace(res, h.last_parms_id)  # no-op with 4 primes; smaller reply
            scale = res.scale
        else:
            scale = h.output_scale()
        t = self._tick("mask", t)
        fill = fill.copy()
        # The buyer sees the fill values, so a non-cryptographic ``rng`` could be reconstructed
        # from them; the flooding noise therefore comes from a separate OS-entropy generator.
        flood = np.random.default_rng(secrets.randbits(128))
        fill[out_slots] = flood.normal(0.0, flood_std, n_in) if flood_std > 0 else 0.0
        noise = sa.Ciphertext()
        self.ctx.encryptor.encrypt(self._encode(fill, h.first_parms_id, scale), noise)
        ev.mod_switch_to_inplace(noise, h.last_parms_id)
        if res is None:
            res = noise
        else:
            ev.add_inplace(res, noise)
        t = self._tick("fill_encrypt", t)
        blob = seal_to_bytes(res, "saving a reply ciphertext")
        self._tick("serialize", t)
        return blob


def score_rows(
    ctx: PublicContext,
    plan: PackingPlan,
    query: list[bytes],
    rows: np.ndarray,
    *,
    rng: np.random.Generator,
    fill_bound: float = DEFAULT_FILL_BOUND,
    flood_std: float = 2.0**-24,
    dp_std: float = 0.0,
    cache: EncodingCache | None = None,
    timings: dict[str, float] | None = None,
    workers: int = 1,
) -> list[bytes]:
    """Seller side: Enc(rows @ x) packed ``plan.rows_per_block`` scores per ciphertext.

    Returns ``plan.blocks(len(rows))`` ciphertexts in which only the requested scores decrypt to
    anything but fresh randomness. ``rng`` drives the uniform fill of the non-output slots; seed
    it from OS entropy (``np.random.default_rng()``) in production, a fixed seed only in tests.
    ``dp_std`` adds Gaussian differential-privacy noise (OS entropy, slot units) to every output
    slot on top of the flooding noise; it must leave the scores below the last level's headroom.
    ``cache`` reuses encoded diagonals across queries over the same rows (see
    :mod:`tip_fed.crypto.encoding_cache`; results are bit-identical); ``timings`` (if given)
    accumulates seconds per phase for benchmarks (phases run in workers are not counted);
    ``workers`` > 1 scores blocks in that many forked processes (see
    :mod:`tip_fed.crypto.parallel`; replies are the same as with one).
    """
    if not isinstance(ctx, PublicContext):
        raise ConfigError(
            f"expected a PublicContext (load_public_context), got {type(ctx).__name__}"
        )
    _same_params(plan, ctx.params, "public context")
    if not isinstance(rng, np.random.Generator):
        raise ConfigError("rng must be a numpy.random.Generator, e.g. np.random.default_rng()")
    # Fill values must stay below q0 / (2 * scale) at the last level, like the scores.
    headroom = plan.params.coeff_mod_bit_sizes[0] - plan.params.global_scale_bits
    limit = min(_MAX_FILL_BOUND, 2.0 ** (headroom - 1))
    if not (
        isinstance(fill_bound, (int, float))
        and math.isfinite(fill_bound)
        and 0 < fill_bound <= limit
    ):
        raise ConfigError(
            f"fill_bound must be in (0, {limit:g}] for these parameters, got {fill_bound!r}"
        )
    if not (
        isinstance(flood_std, (int, float)) and math.isfinite(flood_std) and 0 <= flood_std <= 1
    ):
        raise ConfigError(f"flood_std must be in [0, 1], got {flood_std!r}")
    # Scores (<= MAX_QUERY_NORM) plus 8 sigma of noise must not wrap around the last prime.
    dp_limit = (2.0 ** (headroom - 1) - MAX_QUERY_NORM) / 8
    if not (isinstance(dp_std, (int, float)) and math.isfinite(dp_std) and 0 <= dp_std <= dp_limit):
        raise ConfigError(
            f"dp_std must be in [0, {dp_limit:g}] for these parameters (more noise would overflow "
            f"the last CKKS level), got {dp_std!r}; use a larger epsilon or aggregate disclosure"
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    matrix = _rows_matrix(rows, plan.dim)
    scorer = _Scorer(ctx, plan, query, timings)
    rpb = plan.rows_per_block
    starts = range(0, matrix.shape[0], rpb)
    noise = math.hypot(flood_std, dp_std)
    # Fills drawn here, in block order: same replies for the same rng whatever ``workers`` is.
    items = [(matrix[s : s + rpb], rng.uniform(-fill_bound, fill_bound, plan.slots)) for s in starts]

    def one(block: np.ndarray, fill: np.ndarray) -> bytes:
        return scorer.protect(scorer.bsgs(block, cache), block.shape[0], fill, noise)

    with tenseal_errors("scoring rows", CryptoError):
        if cache is not None and workers > 1 and len(items) > 1:
            for block, _ in items:  # encode misses here, so the cache outlives the workers
                scorer.encoded(block, cache)
        return map_forked(one, items, workers)


def bsgs_slots_unmasked(
    keys: SessionKeys, ctx: PublicContext, plan: PackingPlan, query: list[bytes], rows: np.ndarray
) -> np.ndarray:
    """Decrypted slots of the *unmasked* BSGS result for one block (test/diagnostic only).

    Shows what masking hides: these partial sums leak the seller's rows, which is why
    :func:`score_rows` never returns them.
    """
    matrix = _rows_matrix(rows, plan.dim)
    if matrix.shape[0] > plan.rows_per_block:
        raise DataError(f"at most {plan.rows_per_block} rows (one block) for this diagnostic")
    _same_params(plan, ctx.params, "public context")
    res = _Scorer(ctx, plan, query).bsgs(matrix)
    if res is None:
        return np.zeros(plan.slots)
    blob = seal_to_bytes(res, "saving the unmasked result")
    return keys.decrypt_slots(blob, "unmasked BSGS result", any_level=True)
