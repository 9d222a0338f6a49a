"""CKKS parameters, the 128-bit security check, and the packing planner.

Everything here is pure Python/numpy (no TenSEAL objects), so a plan can be built, checked and
shipped to sellers as a plain dict before any key exists.

Packing (BSGS diagonal method, reference/platform.md §3.4, with the baby steps done by the buyer):
the query of dimension ``dim`` is zero-padded to ``padded_dim`` k' (a power of two). If k' <= S
(S = N/2 slots) it fills a ciphertext periodically (``replication`` R = S/k' copies); if k' > S
it is split into k'/S chunks of S, one ciphertext each, whose products are summed. The buyer
also sends ``baby`` pre-rotated copies of each chunk's ciphertext, so the seller never rotates
the query (a rotation costs ~14 plaintext products and TenSEAL cannot hoist them).

Seller rows go into blocks of r rows (a power of two, ``min_block_rows`` <= r <= S): a block
costs D = r k_c / S plaintext products, D / baby - 1 giant-step rotations and log2(k_c / D) fold
rotations. Full blocks (r = S) need no fold and no mask: slot t holds row t's score. Small
blocks keep a seller with few rows (or one aggregate row) from paying for a full block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tip_fed.errors import ConfigError, InsecureParametersError

__all__ = [
    "DEFAULT_FILL_BOUND",
    "MAX_QUERY_NORM",
    "Block",
    "HEParams",
    "PackingPlan",
    "check_params",
    "plan_packing",
    "security_bits",
]

#: Largest L2 norm of a buyer query. Scores satisfy |y_j| <= ||x|| (rows have norm <= 1), and
#: every output slot must stay far below q0 / scale = 2^(first prime bits - scale bits) = 2^20
#: with the default primes, so 2^12 leaves room for the random fill and flooding noise.
MAX_QUERY_NORM: float = 2.0**12
#: Default bound of the uniform values written into every non-output slot of a reply.
DEFAULT_FILL_BOUND: float = 2.0**12
#: Most query copies the planner picks by default (the upload is ~160 KB per copy at N=8192).
DEFAULT_MAX_QUERY_COPIES: int = 64
#: Most query copies a seller accepts per chunk (bounds what an Offer can make it parse and hold).
MAX_QUERY_COPIES: int = 256
#: Fewest plaintext products a block may have: below this, fold rotations cost more than the
#: products they save, so tiny blocks are never worth it (and fewer fold keys are needed).
_MIN_BLOCK_PRODUCTS = 16
#: Bits of integer headroom the first prime must give above the scale (values up to ~2^13).
_HEADROOM_BITS = 14
_MAX_DIM = 2**20

# HomomorphicEncryption.org standard (classical, ternary secret): the largest total coefficient
# modulus in bits for each ring dimension N and security level. Same table as SEAL's hestdparms.h.
_MAX_COEFF_BITS: dict[int, dict[int, int]] = {
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
}

# Measured on 2 cores (TenSEAL 0.3.18; sealapi is single-threaded), N = 8192, primes
# (60,40,40,60): one diagonal plaintext (numpy layout + encode + multiply_plain + add) 0.65 ms;
# one rotation at the query level 1.5 ms (all rotations run before the single rescale); loading
# one query copy (decompress, expand the seed, validate) about half a rotation; mask, fill
# encryption and serialisation 10 ms per block. At N = 16384 each operation costs about 2.3x as
# much (scaled as (N/8192) * 1.15^log2(N/8192) for other N).
_COST_PLAINTEXT_S = 0.65e-3
_COST_ROT_S = 1.5e-3
_COST_COPY_S = 0.75e-3
_COST_BLOCK_FIXED_S = 10e-3
_COST_FACTOR_16384 = 2.3


@dataclass(frozen=True)
class HEParams:
    """CKKS parameters: ring dimension N, coefficient-modulus prime sizes, scale bits."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but keep the dataclass hashable and immutable.
        if not isinstance(self.coeff_mod_bit_sizes, (list, tuple)):
            raise ConfigError(
                "coeff_mod_bit_sizes must be a tuple of integers, e.g. (60, 40, 40, 60), got "
                f"{self.coeff_mod_bit_sizes!r}"
            )
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))

    @property
    def slots(self) -> int:
        """Number of CKKS slots, N/2."""
        return self.poly_modulus_degree // 2

    @property
    def total_bits(self) -> int:
        """Total coefficient-modulus bits (what the security table limits)."""
        return int(sum(self.coeff_mod_bit_sizes))

    @property
    def global_scale(self) -> float:
        return float(2.0**self.global_scale_bits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": int(self.poly_modulus_degree),
            "coeff_mod_bit_sizes": [int(b) for b in self.coeff_mod_bit_sizes],
            "global_scale_bits": int(self.global_scale_bits),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HEParams:
        """Rebuild from :meth:`to_dict` output; unknown keys or wrong types are a ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"HE parameters must be a dict, got {type(data).__name__}")
        known = {"poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown HE parameter key(s) {sorted(unknown)}; allowed: {sorted(known)}"
            )
        n = _as_int(data.get("poly_modulus_degree", 8192), "poly_modulus_degree")
        bits = data.get("coeff_mod_bit_sizes", (60, 40, 40, 60))
        if not isinstance(bits, (list, tuple)):
            raise ConfigError(
                "coeff_mod_bit_sizes must be a list of integers, e.g. [60, 40, 40, 60]"
            )
        bits_t = tuple(_as_int(b, "coeff_mod_bit_sizes entry") for b in bits)
        scale = _as_int(data.get("global_scale_bits", 40), "global_scale_bits")
        return cls(poly_modulus_degree=n, coeff_mod_bit_sizes=bits_t, global_scale_bits=scale)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)


def security_bits(params: HEParams) -> int:
    """Classical security level (256/192/128) the parameters reach, or 0 if below 128 bits."""
    n = params.poly_modulus_degree
    total = params.total_bits
    for level in (256, 192, 128):
        limit = _MAX_COEFF_BITS[level].get(n)
        if limit is not None and total <= limit:
            return level
    return 0


def check_params(params: HEParams, min_security_bits: int = 128) -> None:
    """Reject parameters that are insecure or cannot run the packed scoring circuit.

    Security is checked first: an insecure choice is the most important thing to report.
    """
    if not isinstance(params, HEParams):
        raise ConfigError(f"expected HEParams, got {type(params).__name__}")
    if min_security_bits not in (128, 192, 256):
        raise ConfigError(f"min_security_bits must be 128, 192 or 256, got {min_security_bits!r}")
    n = _as_int(params.poly_modulus_degree, "poly_modulus_degree")
    supported = sorted(_MAX_COEFF_BITS[128])
    if n not in supported:
        raise ConfigError(
            f"poly_modulus_degree {n} is not supported; use a power of two in {supported} "
            "(8192 or 16384 for packed scoring)"
        )
    bits = [_as_int(b, "coeff_mod_bit_sizes entry") for b in params.coeff_mod_bit_sizes]
    scale = _as_int(params.global_scale_bits, "global_scale_bits")
    level = security_bits(params)
    if level < max(128, min_security_bits):
        allowed = _MAX_COEFF_BITS[max(128, min_security_bits)][n]
        raise InsecureParametersError(
            f"CKKS parameters give less than {max(128, min_security_bits)}-bit security: the "
            f"coefficient modulus has {sum(bits)} bits but N={n} allows at most {allowed} bits "
            f"for {max(128, min_security_bits)}-bit security (HomomorphicEncryption.org "
            f"standard). Use fewer or smaller primes, e.g. (60, 40, 40, 60) at N=8192, or a "
            f"larger poly_modulus_degree."
        )
    if len(bits) < 3:
        raise ConfigError(
            f"coeff_mod_bit_sizes needs at least 3 primes (got {len(bits)}): a first prime, "
            "middle primes of global_scale_bits each, and a special prime; e.g. (60, 40, 40, 60)"
        )
    bad = [b for b in bits if not 20 <= b <= 60]
    if bad:
        raise ConfigError(f"every prime must have 20..60 bits (SEAL limit); got {bad} in {bits}")
    middle = bits[1:-1]
    if len(middle) < 2:
        raise ConfigError(
            f"coeff_mod_bit_sizes {tuple(bits)} gives depth {len(middle)}, but packed scoring "
            "needs 2 levels (one for the diagonal products, one for the output mask): use at "
            "least two middle primes, e.g. (60, 40, 40, 60)"
        )
    if any(b != scale for b in middle):
        raise ConfigError(
            f"global_scale_bits={scale} must equal every middle prime's size {middle} so "
            "rescaling keeps the scale stable; set global_scale_bits to the middle prime size"
        )
    if bits[0] - scale < _HEADROOM_BITS:
        raise ConfigError(
            f"the first prime ({bits[0]} bits) leaves {bits[0] - scale} bits above the scale "
            f"({scale} bits); outputs up to 2^13 need at least {_HEADROOM_BITS}: use a first "
            f"prime of at least {scale + _HEADROOM_BITS} bits (max 60)"
        )
    if bits[-1] < max(bits[:-1]):
        raise ConfigError(
            f"the last (special) prime ({bits[-1]} bits) must be at least as large as every "
            f"other prime ({max(bits[:-1])} bits) for key switching to keep precision"
        )


@dataclass(frozen=True)
class PackingPlan:
    """How a query of ``dim`` values and a seller's rows are laid out in CKKS slots.

    Sent to sellers with :meth:`to_dict`; :meth:`from_dict` re-derives every field from
    (params, dim, baby) and refuses inconsistent plans, so a seller never trusts derived numbers.
    Every way of making a plan runs :func:`check_params` on its parameters exactly once, so a
    plan's parameters are known to be secure: code handed a plan does not check them again.
    """

    params: HEParams
    dim: int
    padded_dim: int
    chunks: int
    replication: int
    baby: int
    giant: int
    rows_per_block: int
    _check: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._check:
            check_params(self.params)
            expected = _derive(self.params, self.dim, self.baby)
            if expected != self:
                raise ConfigError(
                    f"inconsistent packing plan for dim={self.dim}, "
                    f"N={self.params.poly_modulus_degree}: "
                    f"got {self._fields()}, expected {expected._fields()}; build plans with "
                    "plan_packing() or PackingPlan.from_dict()"
                )

    def _fields(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("padded_dim", "chunks", "replication", "baby", "giant", "rows_per_block")}

    @property
    def slots(self) -> int:
        return self.params.slots

    def for_rows(self, n_rows: int, *, query_copies: int | None = None) -> PackingPlan:
        """The layout of these (already checked) parameters and dimension for ``n_rows`` rows:
        what :func:`plan_packing` would choose, without checking the parameters again."""
        n = _as_int(n_rows, "n_rows")
        if n < 1:
            raise ConfigError(f"n_rows must be an integer >= 1, got {n_rows!r}")
        copies = query_copies if query_copies is not None else _default_copies(self.params, self.dim, n)
        return _derive(self.params, self.dim, copies)

    @property
    def chunk_dim(self) -> int:
        """k_c: dimension handled by one query ciphertext (k' unchunked, S when chunked)."""
        return self.padded_dim // self.chunks

    @property
    def min_block_rows(self) -> int:
        """Smallest block: the one with ``min(16, k_c)`` products per chunk."""
        return min(_MIN_BLOCK_PRODUCTS, self.chunk_dim) * self.slots // self.chunk_dim

    def diagonals(self, block_rows: int) -> int:
        """D: plaintext products per chunk for a block of ``block_rows`` rows (r k_c / S)."""
        return block_rows * self.chunk_dim // self.slots

    def split(self, block_rows: int) -> tuple[int, int]:
        """(baby steps used, giant steps) for a block: baby * giant = D."""
        d = self.diagonals(block_rows)
        baby = min(self.baby, d)
        return baby, d // baby

    def block_rows(self, n_rows: int) -> list[int]:
        """Block sizes for ``n_rows`` rows, in order: full blocks of S, then the remainder in
        the smallest power-of-two block (at least ``min_block_rows``) that holds it."""
        n = _as_int(n_rows, "n_rows")
        if n < 0:
            raise ConfigError(f"n_rows must be >= 0, got {n}")
        full, rest = divmod(n, self.rows_per_block)
        sizes = [self.rows_per_block] * full
        if rest:
            sizes.append(max(self.min_block_rows, 1 << (rest - 1).bit_length()))
        return sizes

    def blocks(self, n_rows: int) -> int:
        """Number of reply ciphertexts for ``n_rows`` seller rows."""
        return len(self.block_rows(n_rows))

    def output_slots(self, block_rows: int, n_in_block: int) -> np.ndarray:
        """Slots holding the scores of the first ``n_in_block`` rows of a block of
        ``block_rows`` rows: row j = q D + c sits in slot q k_c + c (c < D)."""
        r = _as_int(block_rows, "block_rows")
        if r not in self._sizes():
            raise ConfigError(f"block_rows must be one of {self._sizes()}, got {r}")
        n = _as_int(n_in_block, "n_in_block")
        if not 0 <= n <= r:
            raise ConfigError(f"a block of {r} rows holds 0..{r} rows, got {n}")
        d = self.diagonals(r)
        j = np.arange(n, dtype=np.int64)
        return (j // d) * self.chunk_dim + j % d

    def layout(self, n_rows: int) -> tuple[Block, ...]:
        """Every block of ``n_rows`` rows in reply order, laid out once for the code that scores or reads it."""
        blocks: list[Block] = []
        for r in self.block_rows(n_rows):
            start = blocks[-1].start + blocks[-1].rows if blocks else 0
            present, d = min(r, n_rows - start), self.diagonals(r)
            slots = self.output_slots(r, present)
            blocks.append(Block(start, r, present, d, *self.split(r), d < self.chunk_dim, slots))
        return tuple(blocks)

    def _sizes(self) -> list[int]:
        sizes, r = [], self.min_block_rows
        while r <= self.rows_per_block:
            sizes.append(r)
            r *= 2
        return sizes

    @property
    def galois_steps(self) -> tuple[int, ...]:
        """Rotation steps the seller needs: ``baby`` (giant steps, Horner) and every fold step
        D, 2D, ..., k_c/2 of the smallest block (larger blocks use a subset)."""
        steps: set[int] = set()
        if self.chunk_dim > self.baby:
            steps.add(self.baby)
        step = min(_MIN_BLOCK_PRODUCTS, self.chunk_dim)  # D of the smallest block
        while step < self.chunk_dim:
            steps.add(step)
            step *= 2
        return tuple(sorted(steps))

    # ---- estimates -------------------------------------------------------------------------
    def _ct_bytes(self, n_polys: int, n_primes: int) -> int:
        # SEAL stores residues in 64-bit words and zstd-compresses them: measured about
        # min(8, bits/8 + 0.9) bytes per residue (8 for 60-bit primes, ~5.9 for 40-bit ones).
        per_coeff = sum(min(8.0, b / 8 + 0.9) for b in self.params.coeff_mod_bit_sizes[:n_primes])
        return int(n_polys * self.params.poly_modulus_degree * per_coeff) + 128

    @property
    def query_bytes(self) -> int:
        """Estimated upload: ``baby`` seeded (half-size) top-level ciphertexts per chunk."""
        n_data = len(self.params.coeff_mod_bit_sizes) - 1
        return self.chunks * self.baby * self._ct_bytes(1, n_data)

    def reply_bytes(self, n_rows: int) -> int:
        """Estimated download: one ciphertext at the last level (first prime only) per block."""
        return self.blocks(n_rows) * self._ct_bytes(2, 1)

    def est_seconds(self, n_rows: int) -> float:
        """Rough single-core seller time from the measured constants above."""
        total = self.chunks * self.baby * _COST_COPY_S
        for r in self.block_rows(n_rows):
            d = self.diagonals(r)
            _, giant = self.split(r)
            rotations = giant - 1 + int(math.log2(self.chunk_dim // d))
            total += self.chunks * d * _COST_PLAINTEXT_S + rotations * _COST_ROT_S + _COST_BLOCK_FIXED_S
        ratio = self.params.poly_modulus_degree / 8192
        factor = ratio * (_COST_FACTOR_16384 / 2.0) ** math.log2(ratio)
        return float(total * factor)

    # ---- transport ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params.to_dict(), "dim": int(self.dim), **self._fields()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PackingPlan:
        """Rebuild a plan received from the buyer, re-deriving and checking every field."""
        if not isinstance(data, dict):
            raise ConfigError(f"a packing plan must be a dict, got {type(data).__name__}")
        known = {"params", "dim", "padded_dim", "chunks", "replication", "baby", "giant", "rows_per_block"}
        unknown = set(data) - known
        missing = known - set(data)
        if unknown or missing:
            raise ConfigError(
                f"packing plan keys wrong: unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        params = HEParams.from_dict(data["params"])
        check_params(params)
        plan = _derive(params, _as_int(data["dim"], "dim"), _as_int(data["baby"], "baby"))
        got = {k: _as_int(data[k], k) for k in plan._fields()}
        if got != plan._fields():
            raise ConfigError(
                f"packing plan fields {got} do not match what dim={plan.dim}, baby={plan.baby} "
                f"and N={params.poly_modulus_degree} imply ({plan._fields()}); rebuild it with "
                "plan_packing()"
            )
        return plan


@dataclass(frozen=True, eq=False)
class Block:
    """One reply ciphertext's share of the rows (:meth:`PackingPlan.layout`)."""

    start: int  # its first row
    rows: int  # r, its size: a power of two
    present: int  # rows of the request in it (the last block may hold fewer than r)
    diagonals: int  # D: plaintext products per chunk
    baby: int  # baby steps used; baby * giant = D
    giant: int
    folded: bool  # D < k_c: the fold leaves partial sums in the other slots, which the mask clears
    output_slots: np.ndarray  # the slots of the present rows' scores


def _geometry(params: HEParams, dim: int) -> tuple[int, int]:
    """(padded_dim, chunks) for a query of ``dim`` values."""
    if not isinstance(params, HEParams):
        raise ConfigError(f"expected HEParams, got {type(params).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ConfigError(f"dim must be an integer >= 1, got {dim!r}")
    if dim > _MAX_DIM:
        raise ConfigError(f"dim {dim} exceeds the supported maximum {_MAX_DIM}; project further")
    padded = 1 << max(int(dim) - 1, 0).bit_length()
    return padded, max(1, padded // params.slots)


def _derive(params: HEParams, dim: int, baby: int) -> PackingPlan:
    """The one place that turns (params, dim, query copies) into a layout."""
    padded, chunks = _geometry(params, dim)
    s = params.slots
    chunk_dim = padded // chunks
    limit = min(chunk_dim, MAX_QUERY_COPIES)
    if isinstance(baby, bool) or not isinstance(baby, (int, np.integer)) or not 1 <= baby <= limit or baby & (baby - 1):
        raise ConfigError(
            f"query copies (baby steps) must be a power of two in 1..{limit} for dim={dim} at "
            f"N={params.poly_modulus_degree}, got {baby!r}"
        )
    return PackingPlan(
        params=params,
        dim=int(dim),
        padded_dim=padded,
        chunks=chunks,
        replication=s // chunk_dim,
        baby=int(baby),
        giant=chunk_dim // int(baby),
        rows_per_block=s,
        _check=False,
    )


def _default_copies(params: HEParams, dim: int, n_rows: int) -> int:
    """The number of query copies (a power of two, at most DEFAULT_MAX_QUERY_COPIES) with the
    lowest estimated seller time for ``n_rows`` rows: each copy costs the seller a load once
    per query and saves it one giant-step rotation per block."""
    padded, chunks = _geometry(params, dim)
    limit = min(DEFAULT_MAX_QUERY_COPIES, padded // chunks)
    options = [1 << i for i in range(limit.bit_length())]
    return min(options, key=lambda b: _derive(params, dim, b).est_seconds(n_rows))


def plan_packing(
    dim: int, n_rows: int, params: HEParams | None = None, *, query_copies: int | None = None
) -> PackingPlan:
    """Choose parameters and layout for scoring ``n_rows`` rows of dimension ``dim``.

    With ``params`` given they are used as they are (after the security check). Otherwise
    N = 8192 (60,40,40,60) is the default; N = 16384 is taken only if the cost model says it is
    at least twice as fast, which with these constants does not happen (larger N costs more per
    operation and per reply byte than it saves in operation count), so 8192 is what you get.
    ``query_copies`` (a power of two) trades upload size for seller time; by default the cost
    model picks it for ``n_rows`` (at most DEFAULT_MAX_QUERY_COPIES).
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)) or n_rows < 1:
        raise ConfigError(f"n_rows must be an integer >= 1, got {n_rows!r}")

    def make(p: HEParams) -> PackingPlan:
        copies = query_copies if query_copies is not None else _default_copies(p, dim, n_rows)
        return _derive(p, dim, copies)

    if params is not None:
        check_params(params)
        return make(params)
    small = make(HEParams())
    big_params = HEParams(poly_modulus_degree=16384)
    big = make(big_params)
    if big.est_seconds(n_rows) < 0.5 * small.est_seconds(n_rows):
        check_params(big_params)
        return big
    check_params(small.params)
    return small
