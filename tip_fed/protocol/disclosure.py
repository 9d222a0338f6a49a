"""Disclosure controls: Gaussian-mechanism noise on released scores, and rounding of released values.

Why the seller adds the noise: the protection is against the *buyer* (a crafted query, e.g. a
basis vector, reads one gradient coordinate per score), so the noise goes into the encrypted result
before it leaves the seller, never into the buyer's decryption.

Neighbouring datasets differ in one record (replace-one, the seller's size n is public). Every row
sent to the scorer is a clipped gradient divided by the public norm bound (L2 norm <= 1) and the
query is scaled to L2 norm ``query_norm``, so one released slot moves by at most
``2 * query_norm`` when one record is replaced, and the seller mean by ``2 * query_norm / n``.
The released vector's L2 sensitivity is therefore

* aggregate disclosure:   ``2 * query_norm / n``
* per-sample disclosure:  ``2 * query_norm * sqrt(1 + 1 / n**2)``

and independent N(0, sigma^2) noise on every released slot, with sigma from the analytic Gaussian
mechanism (Balle & Wang 2018), gives (epsilon, delta)-DP per query. A session of ``budget``
queries composes to (budget * epsilon, budget * delta) (basic composition).

Limit (stated in docs/threat-model.md): the seller cannot see the encrypted query, so the guarantee
assumes the buyer's query really has the norm it declares in the Offer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tip_fed.errors import ConfigError, ProtocolError
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

_SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class NoisePolicy:
    """A Gaussian-mechanism target: (epsilon, delta) per query; ``None`` epsilon = no noise."""

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


def release_sensitivity(query_norm: float, n_samples: int, per_sample: bool) -> float:
    """L2 sensitivity of the slots a seller releases (replace-one neighbours; see module doc)."""
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
    mean_part = 2.0 * query_norm / n_samples
    return math.hypot(2.0 * query_norm, mean_part) if per_sample else mean_part


def release_quantum(score_bound: float, digits: int) -> float:
    """Rounding step of released scores: ``score_bound * 10**-digits`` (0 digits = no rounding)."""
    if digits < 0:
        raise ConfigError(f"release digits must be >= 0, got {digits}")
    return 0.0 if digits == 0 else score_bound * 10.0 ** (-digits)


def round_release(value: float, quantum: float) -> float:
    """Round one released value to a multiple of ``quantum`` (exact decryptions never leave the buyer)."""
    if quantum <= 0 or not math.isfinite(value):
        return value
    return round(value / quantum) * quantum


def offer_noise(offer: pb.Offer) -> NoisePolicy:
    """The noise an (already validated) Offer asks for; no noise when its epsilon is 0."""
    if offer.dp_epsilon <= 0:
        return NoisePolicy()
    try:
        return NoisePolicy(offer.dp_epsilon, offer.dp_delta)
    except ConfigError as exc:
        raise ProtocolError(f"the offer's differential-privacy request is invalid: {exc}") from exc
