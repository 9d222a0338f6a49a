"""Refuse a session whose decrypted scores are not the simulated buyer's and sellers' scores.

The simulator knows both sides, so it recomputes every released score in plaintext. A runtime
that valued with another buyer (say, another replicate's) or other seller data gives decrypted
scores that disagree with that reference by far more than CKKS can explain; such a run must fail,
not write results.

Tolerance, per released score, first in *slot units* (what one ciphertext slot holds: a clipped
gradient row of norm <= 1 against the query scaled to norm ``QUERY_NORM``):

* CKKS: ``QUERY_NORM * N / 2**s`` for ring dimension N and scale 2^s: encoding, the
  ciphertext x plaintext product and the rescale each err by about N / 2^s relative to operands
  bounded by ``QUERY_NORM`` (7.6e-6 slot units at N = 8192, s = 40);
* arithmetic: ``eps * QUERY_NORM * sqrt(dim)`` for the machine epsilon of the model's dtype and
  the projected dimension: each seller computes its gradients in its own process, where another
  summation order may move each coordinate of a row by a few ulps;
* flooding: 8 sigma of the sellers' statistical flooding noise (std ``FLOOD_STD``);
* differential privacy: 6 sigma of the noise each seller declared (the buyer has checked the
  declared std against the seller's epsilon and delta), so DP-noised runs are held to their noise;

then in score units: times the session's unit (query norm x gradient-norm bound / ``QUERY_NORM``),
times n for a seller total (the released mean slot times the seller's n), plus half the release
rounding step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tip_fed.errors import TipError
from tip_fed.protocol import Buyer, Valuation
from tip_fed.protocol.buyer import QUERY_NORM

#: Std (slot units) of the flooding noise sellers add to every released slot (crypto.packing's default).
FLOOD_STD = 2.0**-24
CKKS_SIGMAS, DP_SIGMAS = 8.0, 6.0


class FidelityError(TipError):
    """Decrypted scores disagree with the plaintext reference beyond CKKS tolerance."""


def slot_tolerance(buyer: Buyer) -> float:
    """Largest error (slot units) of one released slot under the buyer's CKKS parameters and model dtype."""
    p = buyer.params
    ckks = QUERY_NORM * p.poly_modulus_degree / 2.0**p.global_scale_bits
    dtype = next((t.dtype for t in buyer.model.parameters() if t.is_floating_point()), torch.float32)
    arithmetic = torch.finfo(dtype).eps * QUERY_NORM * buyer.spec.dim**0.5
    return ckks + arithmetic + CKKS_SIGMAS * FLOOD_STD


def check_session(buyer: Buyer, valuation: Valuation, plain: dict[str, np.ndarray]) -> dict[str, Any]:
    """Raise :class:`FidelityError` unless every decrypted score is the plaintext one within tolerance.

    ``plain`` holds each valued seller's per-sample plaintext scores. Returns the tolerance used
    and the worst error as a fraction of its tolerance (the ``fidelity`` block of metrics.json).
    """
    _check_same_buyer(buyer, valuation)
    unit = buyer.query_norm * buyer.grad_norm_bound / QUERY_NORM
    slot = slot_tolerance(buyer)
    half_step = buyer.release_quantum / 2
    failures, worst = [], 0.0
    for v in valuation.sellers:
        ref = plain[v.seller_id]
        dp = DP_SIGMAS * v.noise["std"] if v.noise else 0.0  # score units per slot
        pairs = [("total", v.total, float(ref.sum()), v.n_samples * (slot * unit + dp) + half_step)]
        if v.per_sample is not None:
            err = np.abs(v.per_sample - ref)
            i = int(err.argmax()) if err.size else 0
            if err.size:
                pairs.append((f"sample {i}", float(v.per_sample[i]), float(ref[i]), slot * unit + dp + half_step))
        for what, enc, pt, tol in pairs:
            ratio = abs(enc - pt) / tol
            worst = max(worst, ratio)
            if ratio > 1:
                failures.append(f"{v.seller_id} {what}: decrypted {enc:.6g}, plaintext {pt:.6g}, "
                                f"|error| {abs(enc - pt):.3g} > tolerance {tol:.3g}")
    if failures:
        shown = "; ".join(failures[:10]) + (f"; and {len(failures) - 10} more" if len(failures) > 10 else "")
        raise FidelityError(
            f"encrypted scores disagree with the plaintext reference for {len(failures)} score(s) in session "
            f"{valuation.session_id[:8]}: {shown}. Tolerance per slot: {slot:.3g} "
            f"(QUERY_NORM x N / 2^s + eps x QUERY_NORM x sqrt(dim) + {CKKS_SIGMAS:g} sigma flooding, N = "
            f"{buyer.params.poly_modulus_degree}, s = "
            f"{buyer.params.global_scale_bits}) x unit {unit:.3g}, plus {DP_SIGMAS:g} sigma of declared DP noise "
            "and half the release step. The runtime valued other data or another buyer than this market's "
            "(check that every party rebuilt the same scenario and replicate); this session's results were not written"
        )
    return {"slot_tolerance": slot, "score_unit": unit, "worst_error_over_tolerance": worst, "within_tolerance": True}


def _check_same_buyer(buyer: Buyer, valuation: Valuation) -> None:
    """The session was opened by a buyer with this model and projection (a rebuilt one must match)."""
    session = valuation.manifest
    got = (session.get("model_fingerprint"), session.get("projection", {}).get("seed"))
    want = (buyer.model_fingerprint, buyer.spec.seed)
    if got != want:
        raise FidelityError(
            f"the session was valued by another buyer than this market's: model fingerprint {str(got[0])[:16]}, "
            f"projection seed {got[1]} (expected {want[0][:16]}, {want[1]}); the runtime rebuilt another "
            "scenario or replicate (check the run config's 'set' and 'replicate'); "
            "this session's results were not written"
        )
