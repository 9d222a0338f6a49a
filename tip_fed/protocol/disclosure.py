"""Disclosure controls: Gaussian noise in gradient space, its seed commitment, and rounding.

Why gradient space: the protection is against the *buyer*, who chooses the encrypted query and
can declare anything about it. Noise calibrated to a declared query norm protects nothing when
the declaration is false. So the seller perturbs what it owns before any query touches it:

* aggregate disclosure: the sum of the clipped projected gradients gets ``N(0, sigma^2 I_k)``,
* per-sample disclosure: every clipped projected gradient row gets its own ``N(0, sigma^2 I_k)``,

and everything the buyer decrypts (any linear functional, for any query, of these noisy vectors)
is post-processing of that Gaussian mechanism. sigma depends only on the seller's clip bound C.

Neighbouring datasets: replace one record (the record count ``n`` is published in every Reply, so
add/remove neighbours would not describe what is released). Rows are clipped to norm C, so the
L2 sensitivity of the gradient sum, and of the matrix of rows (only one row changes), is ``2C``.
All quantities below are in units of C (rows are ``g / C``): sensitivity 2, noise std
``sigma_C = gaussian_sigma(epsilon, delta, 2)`` (analytic Gaussian mechanism, Balle & Wang 2018),
noise multiplier ``sigma_C / 2`` (what an accountant composes, see :mod:`tip_fed.protocol.ledger`).

The noise is drawn from a fresh 256-bit seed. The Reply carries a hiding, binding commitment to the
seed (SHA-256 with a domain tag and the session and seller ids); the seed is revealed only with the
purchased records, so the buyer's audit can recompute the released values exactly.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tip_fed.config import ProtocolConfig
from tip_fed.core.influence import released_rows
from tip_fed.errors import ConfigError, ProtocolError

_SQRT2 = math.sqrt(2.0)
#: L2 sensitivity of the clipped gradient sum (and of the row matrix) in units of C, replace-one.
SENSITIVITY = 2.0
SEED_BYTES = 32
_SEED_TAG = b"tip-fed/noise-seed/v1\x00"


@dataclass(frozen=True)
class NoisePolicy:
    """A Gaussian-mechanism target: (epsilon, delta) per answered query; ``None`` epsilon = no noise."""

    epsilon: float | None = None
    delta: float = 1e-6

    def __post_init__(self) -> None:
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"dp epsilon must be a finite number > 0 (or unset for no noise), got {self.epsilon!r}")
        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise ConfigError(f"dp delta must be in (0, 1), got {self.delta!r}")

    @property
    def enabled(self) -> bool:
        """True when noise is asked for."""
        return self.epsilon is not None

    def stricter(self, other: NoisePolicy) -> NoisePolicy:
        """The policy giving both guarantees: the smaller epsilon and the smaller delta."""
        active = [p for p in (self, other) if p.epsilon is not None]
        if not active:
            return self
        return NoisePolicy(min(p.epsilon for p in active if p.epsilon), min(p.delta for p in active))

    @property
    def gradient_std(self) -> float:
        """Std of the Gaussian added per gradient coordinate, in units of C (0 when off)."""
        if self.epsilon is None:
            return 0.0
        return gaussian_sigma(self.epsilon, self.delta, SENSITIVITY)

    @property
    def noise_multiplier(self) -> float | None:
        """sigma / sensitivity, what a privacy accountant composes (None when off)."""
        return None if self.epsilon is None else self.gradient_std / SENSITIVITY


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / _SQRT2))


def _delta_of(sigma: float, epsilon: float, sensitivity: float) -> float:
    """Exact delta of the Gaussian mechanism with noise ``sigma`` at ``epsilon`` (Balle & Wang, Thm 8)."""
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    # e^eps * Phi(-a - b) computed in log space so large epsilon does not overflow.
    tail = _phi(-a - b)
    second = math.exp(epsilon + math.log(tail)) if tail > 0 else 0.0
    return _phi(a - b) - second


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest noise std giving (epsilon, delta)-DP for an L2 ``sensitivity`` (analytic mechanism)."""
    policy = NoisePolicy(epsilon, delta)  # validates
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ConfigError(f"sensitivity must be a finite number > 0, got {sensitivity!r}")
    eps = float(policy.epsilon)  # type: ignore[arg-type]
    lo, hi = 0.0, sensitivity
    while _delta_of(hi, eps, sensitivity) > delta:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid > 0 and _delta_of(mid, eps, sensitivity) <= delta:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


# ---- the buyer's ceiling on declared noise ----------------------------------------------------------
def noise_ceiling(protocol: ProtocolConfig) -> float:
    """The largest gradient-noise std (units of C) a buyer accepts in a reply: ``max-noise-std``, or
    the noise the buyer's own ``dp-epsilon`` asks for when that is larger (it asked for that much).

    The buyer's range check admits ``8 x`` the declared noise beyond the honest bound, so a seller
    declaring a tiny epsilon could otherwise pass a forged total of any size before the audit.
    """
    asked = NoisePolicy(protocol.dp_epsilon, protocol.dp_delta)
    return max(protocol.max_noise_std, asked.gradient_std * (1 + 1e-9))


def check_declared_std(seller_id: str, std: float, epsilon: float, delta: float, ceiling: float) -> None:
    """ProtocolError when a reply declares more gradient noise than the buyer's ceiling accepts."""
    if std > ceiling:
        raise ProtocolError(
            f"seller {seller_id} declares gradient noise of std {std:.4g} (epsilon {epsilon:g}, delta {delta:g}), "
            f"above this buyer's protocol.max-noise-std = {ceiling:g}: its score would be mostly noise and the "
            "noise would widen the range its reply is checked against; raise protocol.max-noise-std to accept it"
        )


# ---- the noise seed ----------------------------------------------------------------------------
def new_noise_seed() -> bytes:
    """A fresh 256-bit seed from the OS (never derived from anything the buyer can see)."""
    return secrets.token_bytes(SEED_BYTES)


def seed_commitment(seed: bytes, session_id: str, seller_id: str) -> bytes:
    """SHA-256 commitment to a noise seed, bound to one session and seller (hiding: the seed has
    256 bits of entropy; binding: collision resistance)."""
    if len(seed) != SEED_BYTES:
        raise ProtocolError(f"a noise seed has {SEED_BYTES} bytes, got {len(seed)}")
    h = hashlib.sha256(_SEED_TAG)
    for part in (session_id.encode(), seller_id.encode(), seed):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def release_rows(rows: np.ndarray, per_sample: bool, seed: bytes | None, std: float) -> tuple[np.ndarray, np.ndarray]:
    """The rows a seller scores, as (clean part, noise part); their sum is what is released.

    ``rows`` are clipped gradients in units of C (norm <= 1). Aggregate: one row, the mean of the
    noisy sum ``(sum rows + z) / n``. Per-sample: every row plus its own noise, then the mean of
    those noisy rows. ``std`` is the gradient-noise std in units of C; the noise is a deterministic
    function of ``seed`` so the audit can regenerate it.
    """
    rows = np.asarray(rows, dtype=np.float64)
    return released_rows(rows, per_sample), noise_rows(seed, rows.shape, per_sample, std)


def noise_rows(seed: bytes | None, shape: tuple[int, ...], per_sample: bool, std: float) -> np.ndarray:
    """The noise part of :func:`release_rows` for ``shape`` = (records, dimension): it depends on no
    record, so a seller draws it before reading any."""
    n, k = shape
    if std == 0:
        return np.zeros((n + 1 if per_sample else 1, k))
    if seed is None or not (math.isfinite(std) and std > 0):
        raise ConfigError(f"gradient noise needs a seed and a finite std > 0, got std {std!r}")
    gen = np.random.Generator(np.random.Philox(np.random.SeedSequence(int.from_bytes(seed, "big"))))
    if per_sample:
        z = gen.standard_normal((n, k)) * std
        return np.vstack([z, z.mean(axis=0, keepdims=True)])
    return gen.standard_normal((1, k)) * (std / n)


@dataclass(frozen=True, eq=False)
class Release:
    """How one answer is released, decided before any record is read (:func:`plan_release`)."""

    noise: NoisePolicy  # the stricter of the seller's policy and the Offer's request
    gradient_std: float  # its std per gradient coordinate, units of C (0 without noise)
    noise_multiplier: float | None  # what the privacy ledger composes (None without noise)
    per_sample: bool
    seed: bytes | None  # fresh, under noise; opened at delivery
    commitment: bytes  # to the seed, bound to the session and seller (b"" without noise)
    row_noise: np.ndarray | None  # added to :func:`released_rows` of the clipped gradients (None: no noise)


def plan_release(
    policy: NoisePolicy, epsilon: float, delta: float, *, per_sample: bool, shape: tuple[int, int], session_id: str,
    seller_id: str,
) -> Release:
    """The release of one answer of a seller holding ``shape`` = (records, dimension): the stricter of
    its ``policy`` and the Offer's request (``epsilon`` 0 = none), and under noise a fresh seed, its
    commitment and the noise drawn from it."""
    noise = policy.stricter(NoisePolicy(epsilon, delta) if epsilon > 0 else NoisePolicy())
    std = noise.gradient_std
    seed = new_noise_seed() if noise.enabled else None
    commitment = b"" if seed is None else seed_commitment(seed, session_id, seller_id)
    row_noise = None if seed is None else noise_rows(seed, shape, per_sample, std)
    return Release(noise, std, None if seed is None else std / SENSITIVITY, per_sample, seed, commitment, row_noise)


# ---- rounding ----------------------------------------------------------------------------------
def release_quantum(score_bound: float, digits: int) -> float:
    """Rounding step of released scores: ``score_bound * 10**-digits`` (0 digits = no rounding)."""
    if digits < 0:
        raise ConfigError(f"release digits must be >= 0, got {digits}")
    return 0.0 if digits == 0 else score_bound * 10.0 ** (-digits)


def round_release(values: npt.ArrayLike, quantum: float) -> np.ndarray:
    """Released values rounded to multiples of ``quantum`` (0 = unrounded; non-finite values stay as
    they are): exact decryptions never leave the buyer."""
    arr = np.asarray(values, dtype=np.float64)
    if quantum <= 0:
        return arr
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(arr), np.round(arr / quantum) * quantum, arr)
