"""Encrypted matrix-vector scores y = M x, many per ciphertext (BSGS diagonal method).

Roles: the buyer encrypts the query x (:func:`encrypt_query`) and decrypts the scores
(:func:`decrypt_scores`); a seller holding rows M and only a :class:`PublicContext` computes
Enc(M x) (:func:`score_rows`) without decrypting anything.

Layout (notation of :mod:`tip_fed.crypto.params`): query copy h of a chunk holds
Q_h[t] = x_chunk[(t + h) mod k_c] in every slot t (the query repeats with period k_c, so
rotating by 1 advances every slot's coordinate by 1). In a block of r rows with D = r k_c / S
products, slot t belongs to row q D + c (q = t div k_c, c = t mod D) and the plaintext diagonal
P_h[t] = M[row, (t + h) mod k_c], so sum_h P_h * Q_h leaves in slot t the partial sum of its row
over coordinates t mod k_c .. + D - 1; the k_c / D slots of a row cover all coordinates once and a
log2(k_c / D) fold leaves row q D + c's score in slot q k_c + c. The h = g B + b split (baby b <
B, giant g) is evaluated as sum_g rot_{gB}(sum_b P'_{g,b} * Q_b), with plaintexts pre-rotated by
-gB and the buyer's B copies standing in for the baby-step rotations; giant steps are combined
Horner-style with rot(., B), so the seller needs keys for B and the fold steps only.

Levels: all products, giant-step rotations and fold rotations run at the query level, with
scale^2, and are rescaled once at the end, so rotation key-switching noise is negligible
(~1e-8 absolute instead of ~1e-6 when rotating after the rescale). The second level is spent
on the output mask.

Output protection (§3.7): after a fold, every slot that is not a requested score holds a partial
sum of the seller's data, so such a reply is multiplied by a 0/1 mask (the last rescale). A full
block (r = S, no fold) holds nothing but its rows' scores (absent rows are exact zeros), so it
skips the mask. Every reply is then sanitised (:mod:`tip_fed.crypto.sanitise`): a fresh
public-key encryption of a complex fill vector is added, whose real part is uniform in
[-fill_bound, fill_bound] in every non-output slot (from the caller's ``rng``) and Gaussian
flooding noise in the output slots, and whose imaginary part is uniform noise in every slot (both
from OS entropy): the computation's residual noise is hidden in every slot, real and imaginary.
At the last level a purely imaginary plaintext pad as large as the modulus allows drowns what a
complex query could hide in the imaginary parts.
The added encryption also re-randomises the ciphertext. Replies carry no integrity check: a
flipped byte can still parse, so the protocol must hash/sign what it sends.

Performance (benchmarks/README.md): a seller's encoded diagonals depend only on its rows and the
parameters, so an :class:`~tip_fed.crypto.EncodingCache` skips encoding on repeated queries;
``workers`` spreads blocks over forked processes (sealapi holds the GIL, so threads cannot). The
one-score-per-ciphertext baseline lives in :mod:`tip_fed.crypto.naive`.

Value limits: rows must have L2 norm <= 1 and the query norm must be <= MAX_QUERY_NORM (2^12),
so |y_j| <= 2^12 and nothing overflows the last level's 60-bit prime. Gaussian ``row_noise``
(differential privacy in gradient space) is added to the rows after that check; it must leave
8 standard deviations of every score below the last level's headroom.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import tenseal.sealapi as sa

from tip_fed.errors import ConfigError, CryptoError, DataError

from .codec import seal_to_bytes, tenseal_errors
from .encoding_cache import EncodedBlock, EncodingCache
from .keys import PublicContext, SessionKeys
from .parallel import map_forked
from .params import DEFAULT_FILL_BOUND, MAX_QUERY_NORM, Block, PackingPlan
from .query import LoadedQuery, blob_list, check_noise, load_query, same_params
from .sanitise import FLOOD_STD, add_imaginary_pad, sanitising_fill

__all__ = ["decrypt_scores", "encrypt_query", "score_rows"]

_ROW_NORM_TOL = 1e-9
_MAX_FILL_BOUND = 2.0**16


# ---- validation --------------------------------------------------------------------------------
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


# ---- layout ------------------------------------------------------------------------------------
def _query_slots(plan: PackingPlan, x: np.ndarray) -> list[list[np.ndarray]]:
    """Q_h[t] = x_chunk[(t + h) mod k_c] for every chunk and copy h < baby."""
    kc = plan.chunk_dim
    padded = np.zeros(plan.padded_dim)
    padded[: plan.dim] = x
    t = np.arange(plan.slots, dtype=np.int64)
    return [
        [padded[i * kc : (i + 1) * kc][(t + h) % kc] for h in range(plan.baby)]
        for i in range(plan.chunks)
    ]


def _block_diagonals(plan: PackingPlan, part: np.ndarray, block: Block) -> np.ndarray:
    """All D plaintext diagonals P'_{g,b} (index g B + b) of one chunk of ``block``.

    ``part`` is (rows present, k_c); slots of absent rows stay zero. Diagonal g B + b is rolled
    right by g B so that the giant-step rotation brings it back into place.
    """
    kc, s = plan.chunk_dim, plan.slots
    d, baby = block.diagonals, block.baby
    t = np.arange(s, dtype=np.int64)
    row = (t // kc) * d + t % d
    present = row < part.shape[0]
    h = np.arange(d, dtype=np.int64)
    cols = (t[None, present] + h[:, None]) % kc
    diag = np.zeros((d, s))
    diag[:, present] = part[row[present][None, :], cols]
    for g in range(1, d // baby):
        rows_g = slice(g * baby, (g + 1) * baby)
        diag[rows_g] = np.roll(diag[rows_g], g * baby, axis=1)
    return diag


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
    """Encrypt the query's ``baby`` rotated copies per chunk (chunk-major), seeded ciphertexts."""
    if not isinstance(keys, SessionKeys):
        raise ConfigError(f"expected SessionKeys, got {type(keys).__name__}")
    same_params(plan, keys.params, "session keys")
    vec = _query_vector(x, plan.dim)
    return [keys.encrypt_slots(slots) for copies in _query_slots(plan, vec) for slots in copies]


def decrypt_scores(
    keys: SessionKeys, plan: PackingPlan, replies: list[bytes], n_rows: int
) -> np.ndarray:
    """Decrypt a seller's replies into ``n_rows`` float64 scores (row order preserved)."""
    if not isinstance(keys, SessionKeys):
        raise ConfigError(f"expected SessionKeys, got {type(keys).__name__}")
    same_params(plan, keys.params, "session keys")
    if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)) or n_rows < 1:
        raise ConfigError(f"n_rows must be an integer >= 1, got {n_rows!r}")
    layout = plan.layout(int(n_rows))
    blobs = blob_list(replies, len(layout), f"reply (for {n_rows} rows)")
    out = np.empty(int(n_rows), dtype=np.float64)
    for i, (blob, block) in enumerate(zip(blobs, layout, strict=True)):
        slots = keys.decrypt_slots(blob, what=f"reply ciphertext {i}")
        out[block.start : block.start + block.present] = slots[block.output_slots]
    return out


# ---- seller ------------------------------------------------------------------------------------
class _Scorer:
    """One seller's evaluation state for one query (the query copies are shared by all blocks)."""

    def __init__(
        self,
        ctx: PublicContext,
        plan: PackingPlan,
        query: list[bytes] | LoadedQuery,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.plan, self.ctx, self.h = plan, ctx, ctx.handles
        # Seconds per phase, accumulated (the benchmark's cost breakdown; perf_counter is ~0.1 us).
        self.timings: dict[str, float] = timings if timings is not None else {}
        self._masks: dict[tuple[int, int], Any] = {}  # output-mask plaintext per (block, rows in it)
        t0 = time.perf_counter()
        loaded = query if isinstance(query, LoadedQuery) else load_query(ctx, plan, query)
        if loaded.ctx is not ctx or loaded.plan != plan:
            raise ConfigError("the query was loaded for another public context or plan; load it with this one")
        self.ev: Any = self.h.evaluator
        self.gk: Any = ctx.galois_keys
        self.copies: list[list[Any]] = loaded.copies
        self._tick("query_load", t0)

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

    def encode_block(self, rows: np.ndarray, block: Block) -> EncodedBlock:
        """Pre-rotated diagonals of ``block`` (its ``rows``) as plaintexts at the query level,
        grouped by giant step (all-zero diagonals skipped)."""
        p, baby = self.plan, block.baby
        out: EncodedBlock = [[] for _ in range(block.giant)]
        for chunk, part in enumerate(_chunk_blocks(p, rows)):
            diags = _block_diagonals(p, part, block)
            for idx in range(diags.shape[0]):
                if not diags[idx].any():
                    continue
                pt = self._encode(diags[idx], self.h.first_parms_id, p.params.global_scale)
                if not pt.is_zero():  # values below the encoding precision
                    out[idx // baby].append((chunk, idx % baby, pt))
        return out

    def encoded(self, rows: np.ndarray, block: Block, cache: EncodingCache | None) -> EncodedBlock:
        """The block's plaintexts: from ``cache`` when present there, else encoded (and stored)."""
        p = self.plan
        t = time.perf_counter()
        encoded, key = None, None
        if cache is not None:
            key = EncodingCache.key(p, block.rows, self.h.first_parms_id, p.params.global_scale, rows)
            encoded = cache.get(key)
            t = self._tick("cache_lookup", t)
        if encoded is None:
            encoded = self.encode_block(rows, block)
            if cache is not None:
                cache.put(key, encoded)
            self._tick("encode", t)
        return encoded

    def bsgs(self, encoded: EncodedBlock, block: Block) -> Any | None:
        """Unmasked BSGS + fold for one encoded block (None if every product is zero)."""
        p, ev, baby = self.plan, self.ev, block.baby
        t = time.perf_counter()
        inner: list[Any | None] = []
        for step in encoded:
            acc = None
            for chunk, b_idx, pt in step:
                prod = sa.Ciphertext()
                ev.multiply_plain(self.copies[chunk][b_idx], pt, prod)
                if acc is None:
                    acc = prod
                else:
                    ev.add_inplace(acc, prod)
            inner.append(acc)
        t = self._tick("multiply_add", t)
        res = None
        for g in reversed(range(len(inner))):  # Horner: res = rot(res, B) + inner_g
            if res is not None:
                res = self._rotate(res, baby)
            if inner[g] is not None:
                if res is None:
                    res = inner[g]
                else:
                    ev.add_inplace(res, inner[g])
        shift = block.diagonals
        while res is not None and shift < p.chunk_dim:
            ev.add_inplace(res, self._rotate(res, shift))
            shift *= 2
        t = self._tick("rotate_fold", t)
        if res is not None:
            # One rescale at the very end: every rotation's key-switching noise was added at
            # scale^2, where it is ~2^40 times smaller relative to the values.
            ev.rescale_to_next_inplace(res)
        self._tick("rescale", t)
        return res

    def protect(self, res: Any | None, block: Block, fill: np.ndarray, flood_std: float, imag_bound: float,
                score_bound: float = MAX_QUERY_NORM) -> bytes:
        """Mask to the output slots (after a fold), add Enc(sanitising fill) and the imaginary pad
        (unless ``imag_bound`` is 0), serialise.

        ``fill`` (uniform values for the non-output slots) is drawn by the caller, block by
        block in order, so the result does not depend on which process scores the block.
        ``score_bound`` bounds |score| for an honest query (norm <= MAX_QUERY_NORM).
        """
        p, ev, h = self.plan, self.ev, self.h
        t = time.perf_counter()
        out_slots, folded, shape = block.output_slots, block.folded, (block.rows, block.present)
        if res is not None:
            if folded:  # partial sums in the other slots: keep only the scores
                if shape not in self._masks:  # blocks of one shape share one mask plaintext
                    mask = np.zeros(p.slots)
                    mask[out_slots] = 1.0
                    self._masks[shape] = self._encode(mask, res.parms_id(), h.primes[-2])
                ev.multiply_plain_inplace(res, self._masks[shape])
                ev.rescale_to_next_inplace(res)
            ev.mod_switch_to_inplace(res, h.last_parms_id)  # smaller reply
            scale = res.scale
        else:
            scale = h.output_scale(masked=folded)
        t = self._tick("mask", t)
        values = self._encode(sanitising_fill(fill, out_slots, flood_std, imag_bound), h.last_parms_id, scale)
        noise = self.ctx.zero.encrypt_zero(h.first_parms_id, scale)  # wide u: see crypto/rerandomise.py
        ev.mod_switch_to_inplace(noise, h.last_parms_id)
        ev.add_plain_inplace(noise, values)
        if res is None:
            res = noise
        else:
            ev.add_inplace(res, noise)
        if imag_bound > 0:  # a complex query's second functional drowned: see crypto/sanitise.py
            # a coefficient is a mean over the N roots, 2 n_out of them scores (<= score_bound);
            # one slot unit of margin for the CKKS noise (~2^-24 slot units)
            coeff_bound = math.ceil(scale * (len(out_slots) * score_bound / p.slots + 1))
            res = add_imaginary_pad(ev, h.seal_context, res, values, coeff_bound)
        t = self._tick("fill_encrypt", t)
        blob = seal_to_bytes(res, "saving a reply ciphertext")
        self._tick("serialize", t)
        return blob


def score_rows(
    ctx: PublicContext,
    plan: PackingPlan,
    query: list[bytes] | LoadedQuery,
    rows: np.ndarray,
    *,
    rng: np.random.Generator,
    row_noise: np.ndarray | None = None,
    fill_bound: float = DEFAULT_FILL_BOUND,
    flood_std: float = FLOOD_STD,
    imag_bound: float = DEFAULT_FILL_BOUND,
    cache: EncodingCache | None = None,
    timings: dict[str, float] | None = None,
    workers: int = 1,
) -> list[bytes]:
    """Seller side: Enc((rows + row_noise) @ x), up to ``plan.rows_per_block`` scores per ciphertext.

    Returns one ciphertext per block of ``plan.layout(len(rows))``, in which only the requested
    scores decrypt to anything but fresh randomness. ``rng`` drives the uniform fill of the non-output slots; seed
    it from OS entropy (``np.random.default_rng()``) in production, a fixed seed only in tests.
    ``rows`` must have norm <= 1; ``row_noise`` (same shape, differential-privacy noise in
    gradient space, see :func:`tip_fed.protocol.disclosure.release_rows`) is added after that check.
    ``flood_std`` and ``imag_bound`` size the sanitising noise (:mod:`tip_fed.crypto.sanitise`).
    ``cache`` reuses encoded diagonals across queries over the same rows (see
    :mod:`tip_fed.crypto.encoding_cache`; results are bit-identical); ``timings`` (if given)
    accumulates seconds per phase for benchmarks (phases run in workers are not counted);
    ``workers`` > 1 scores blocks in that many forked processes (see
    :mod:`tip_fed.crypto.parallel`; replies are the same as with one).
    """
    if not isinstance(ctx, PublicContext):
        raise ConfigError(f"expected a PublicContext (load_public_context), got {type(ctx).__name__}")
    same_params(plan, ctx.params, "public context")
    if not isinstance(rng, np.random.Generator):
        raise ConfigError("rng must be a numpy.random.Generator, e.g. np.random.default_rng()")
    # Fill values must stay below q0 / (2 * scale) at the last level, like the scores.
    headroom = plan.params.coeff_mod_bit_sizes[0] - plan.params.global_scale_bits
    limit = min(_MAX_FILL_BOUND, 2.0 ** (headroom - 1))
    for name, bound, low in (("fill_bound", fill_bound, 0.0), ("imag_bound", imag_bound, -1.0)):
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and low < bound <= limit):
            raise ConfigError(f"{name} must be in ({max(low, 0):g}, {limit:g}] for these parameters, got {bound!r}")
    if not (isinstance(flood_std, (int, float)) and math.isfinite(flood_std) and 0 <= flood_std <= 1):
        raise ConfigError(f"flood_std must be in [0, 1], got {flood_std!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    matrix = _rows_matrix(rows, plan.dim)
    if row_noise is not None:
        matrix = matrix + _row_noise(row_noise, matrix.shape, headroom)
    scorer = _Scorer(ctx, plan, query, timings)
    # |score| for an honest query: rows give <= MAX_QUERY_NORM, their noise 8 std (as check_noise)
    noise_rms = 0.0 if row_noise is None else float(np.sqrt(np.mean(np.square(row_noise))))
    score_bound = MAX_QUERY_NORM * (1.0 + 8.0 * noise_rms)
    # Fills drawn here, in block order: same replies for the same rng whatever ``workers`` is.
    items = [
        (matrix[b.start : b.start + b.rows], b, rng.uniform(-fill_bound, fill_bound, plan.slots))
        for b in plan.layout(matrix.shape[0])
    ]

    def one(rows: np.ndarray, block: Block, fill: np.ndarray, encoded: EncodedBlock | None) -> bytes:
        if encoded is None:
            encoded = scorer.encoded(rows, block, cache)
        return scorer.protect(scorer.bsgs(encoded, block), block, fill, flood_std, imag_bound, score_bound)

    with tenseal_errors("scoring rows", CryptoError):
        if cache is not None and workers > 1 and len(items) > 1:
            # Encoded here, before the fork, so the cache outlives the workers.
            return map_forked(one, [(*it, scorer.encoded(it[0], it[1], cache)) for it in items], workers)
        return map_forked(one, [(*it, None) for it in items], workers)


def _row_noise(noise: object, shape: tuple[int, ...], headroom: int) -> np.ndarray:
    """Checked gradient-space noise: same shape as the rows, finite, and small enough that every
    score stays below the last level's headroom with 8 standard deviations to spare (the noise
    is independent of the query, so a score's noise is Gaussian with std ||x|| * per-coordinate std)."""
    arr = np.asarray(noise, dtype=np.float64)
    if arr.shape != shape or not np.all(np.isfinite(arr)):
        raise DataError(f"row noise must be a finite array of the rows' shape {shape}, got {arr.shape}")
    check_noise(float(np.sqrt(np.mean(arr**2))), headroom)
    return arr
