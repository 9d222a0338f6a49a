"""CKKS parameters, the 128-bit security check, and the packing planner.

Everything here is pure Python/numpy (no TenSEAL objects), so a plan can be built, checked and
shipped to sellers as a plain dict before any key exists.

Packing (BSGS diagonal method over an interleaved query layout, reference/platform.md §3.4):
the query of dimension ``dim`` is zero-padded to ``padded_dim`` k' (a power of two with
k'^2 >= S, S = N/2 slots). If k' <= S the whole query is one ciphertext; each residue class
b = 0..R-1 (R = S/k') holds the query pre-rotated by b*K' (K' = k'/R diagonals per class), and one
block of k' seller rows becomes one result ciphertext with row j's score in slot j*R. If k' > S the
dimension is split into k'/S chunks of S (one query ciphertext each, R = 1) whose products are
summed, and a block holds S rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tip_fed.errors import ConfigError, InsecureParametersError

__all__ = [
    "HEParams",
    "PackingPlan",
    "MAX_QUERY_NORM",
    "DEFAULT_FILL_BOUND",
    "security_bits",
    "check_params",
    "plan_packing",
]

#: Largest L2 norm of a buyer query. Scores satisfy |y_j| <= ||x|| (rows have norm <= 1), and
#: every output slot must stay far below q0 / scale = 2^(first prime bits - scale bits) = 2^20
#: with the default primes, so 2^12 leaves room for the random fill and flooding noise.
MAX_QUERY_NORM: float = 2.0**12
#: Default bound of the uniform values written into every non-output slot of a reply.
DEFAULT_FILL_BOUND: float = 2.0**12
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
# one rotation at the query level 1.5 ms (all rotations run before the single rescale); mask,
# fill encryption and serialisation 10 ms per block. At N = 16384 each operation costs about
# 2.3x as much (scaled as (N/8192) * 1.15^log2(N/8192) for other N).
_COST_PLAINTEXT_S = 0.65e-3
_COST_ROT_S = 1.5e-3
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
    (params, dim) and refuses inconsistent plans, so a seller never trusts derived numbers.
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
            expected = _derive(self.params, self.dim)
            if expected != self:
                raise ConfigError(
                    f"inconsistent packing plan for dim={self.dim}, "
                    f"N={self.params.poly_modulus_degree}: "
                    f"got {self._fields()}, expected {expected._fields()}; build plans with "
                    "plan_packing() or PackingPlan.from_dict()"
                )

    def _fields(self) -> dict[str, int]:
        return {
            "padded_dim": self.padded_dim,
            "chunks": self.chunks,
            "replication": self.replication,
            "baby": self.baby,
            "giant": self.giant,
            "rows_per_block": self.rows_per_block,
        }

    @property
    def slots(self) -> int:
        return self.params.slots

    @property
    def chunk_dim(self) -> int:
        """Dimension handled by one query ciphertext (k' unchunked, S when chunked)."""
        return self.padded_dim // self.chunks

    @property
    def diagonals(self) -> int:
        """K': generalised diagonals per residue class = plaintexts per block and chunk."""
        return self.chunk_dim // self.replication

    def blocks(self, n_rows: int) -> int:
        """Number of reply ciphertexts for ``n_rows`` seller rows."""
        n = _as_int(n_rows, "n_rows")
        if n < 0:
            raise ConfigError(f"n_rows must be >= 0, got {n}")
        return -(-n // self.rows_per_block)

    def output_slots(self, n_in_block: int) -> np.ndarray:
        """Slots holding the scores of the first ``n_in_block`` rows of a block (row j at j*R)."""
        n = _as_int(n_in_block, "n_in_block")
        if not 0 <= n <= self.rows_per_block:
            raise ConfigError(f"a block holds 0..{self.rows_per_block} rows, got {n}")
        return np.arange(n, dtype=np.int64) * self.replication

    @property
    def galois_steps(self) -> tuple[int, ...]:
        """Rotation steps the seller needs: R (baby steps, chained), R*B' (giant steps,
        Horner), R/2, R/4, ..., 1 (fold). Chaining keeps this at 2 + log2(R) keys."""
        steps: set[int] = set()
        r = self.replication
        if self.baby > 1:
            steps.add(r)
        if self.giant > 1:
            steps.add(r * self.baby)
        step = r // 2
        while step >= 1:
            steps.add(step)
            step //= 2
        return tuple(sorted(steps))

    # ---- estimates -------------------------------------------------------------------------
    def _ct_bytes(self, n_polys: int, n_primes: int) -> int:
        # SEAL stores residues in 64-bit words and zstd-compresses them: measured about
        # min(8, bits/8 + 0.9) bytes per residue (8 for 60-bit primes, ~5.9 for 40-bit ones).
        per_coeff = sum(min(8.0, b / 8 + 0.9) for b in self.params.coeff_mod_bit_sizes[:n_primes])
        return int(n_polys * self.params.poly_modulus_degree * per_coeff) + 128

    @property
    def query_bytes(self) -> int:
        """Estimated upload: one seeded (half-size) ciphertext per chunk at the top level."""
        n_data = len(self.params.coeff_mod_bit_sizes) - 1
        return self.chunks * self._ct_bytes(1, n_data)

    def reply_bytes(self, n_rows: int) -> int:
        """Estimated download: one ciphertext at the last level (first prime only) per block."""
        return self.blocks(n_rows) * self._ct_bytes(2, 1)

    def est_seconds(self, n_rows: int) -> float:
        """Rough single-core seller time from the measured constants above."""
        blocks = self.blocks(n_rows)
        per_block = (
            self.chunks * self.diagonals * _COST_PLAINTEXT_S
            + (self.giant - 1 + int(math.log2(self.replication))) * _COST_ROT_S
            + _COST_BLOCK_FIXED_S
        )
        baby = self.chunks * (self.baby - 1) * _COST_ROT_S
        ratio = self.params.poly_modulus_degree / 8192
        factor = ratio * (_COST_FACTOR_16384 / 2.0) ** math.log2(ratio)
        return float((baby + blocks * per_block) * factor)

    # ---- transport ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params.to_dict(), "dim": int(self.dim), **self._fields()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PackingPlan:
        """Rebuild a plan received from the buyer, re-deriving and checking every field."""
        if not isinstance(data, dict):
            raise ConfigError(f"a packing plan must be a dict, got {type(data).__name__}")
        known = {
            "params",
            "dim",
            "padded_dim",
            "chunks",
            "replication",
            "baby",
            "giant",
            "rows_per_block",
        }
        unknown = set(data) - known
        missing = known - set(data)
        if unknown or missing:
            raise ConfigError(
                f"packing plan keys wrong: unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        params = HEParams.from_dict(data["params"])
        check_params(params)
        plan = _derive(params, _as_int(data["dim"], "dim"))
        got = {k: _as_int(data[k], k) for k in plan._fields()}
        if got != plan._fields():
            raise ConfigError(
                f"packing plan fields {got} do not match what dim={plan.dim} and "
                f"N={params.poly_modulus_degree} imply ({plan._fields()}); rebuild it with "
                "plan_packing()"
            )
        return plan


def _derive(params: HEParams, dim: int) -> PackingPlan:
    """The one place that turns (params, dim) into a layout."""
    if not isinstance(params, HEParams):
        raise ConfigError(f"expected HEParams, got {type(params).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ConfigError(f"dim must be an integer >= 1, got {dim!r}")
    if dim > _MAX_DIM:
        raise ConfigError(f"dim {dim} exceeds the supported maximum {_MAX_DIM}; project further")
    s = params.slots
    padded = 1 << max(int(dim) - 1, 0).bit_length()
    while padded * padded < s:
        padded *= 2
    chunks = max(1, padded // s)
    chunk_dim = padded // chunks
    r = s // chunk_dim
    diagonals = chunk_dim // r
    baby = 1 << math.ceil(math.log2(math.sqrt(diagonals))) if diagonals > 1 else 1
    giant = diagonals // baby
    return PackingPlan(
        params=params,
        dim=int(dim),
        padded_dim=padded,
        chunks=chunks,
        replication=r,
        baby=baby,
        giant=giant,
        rows_per_block=chunk_dim,
        _check=False,
    )


def plan_packing(dim: int, n_rows: int, params: HEParams | None = None) -> PackingPlan:
    """Choose parameters and layout for scoring ``n_rows`` rows of dimension ``dim``.

    With ``params`` given they are used as they are (after the security check). Otherwise
    N = 8192 (60,40,40,60) is the default; N = 16384 is taken only if the cost model says it is
    at least twice as fast, which with these constants does not happen (larger N costs more per
    operation and per reply byte than it saves in operation count), so 8192 is what you get.
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)) or n_rows < 1:
        raise ConfigError(f"n_rows must be an integer >= 1, got {n_rows!r}")
    if params is not None:
        check_params(params)
        return _derive(params, dim)
    small = _derive(HEParams(), dim)
    big_params = HEParams(poly_modulus_degree=16384)
    big = _derive(big_params, dim)
    if big.est_seconds(n_rows) < 0.5 * small.est_seconds(n_rows):
        check_params(big_params)
        return big
    check_params(small.params)
    return small
