"""Ciphertext sanitisation: every returned ciphertext hides the computation's residual noise.

Why: a CKKS decryption is ``message + e`` where ``e`` (rescale rounding, the query's encryption
noise times the seller's encoded rows, key switching) is a deterministic function of the seller's
rows and of inputs the buyer knows. A buyer holding the secret key reads ``e`` out of every slot,
real and imaginary, and can test a candidate dataset by recomputing it (IND-CPA-D; Li &
Micciancio 2021). Noise flooding adds fresh noise ``f`` whose distribution barely moves when
``e`` changes, so the reply's distribution is nearly independent of ``e``.

What is added to every reply (a fresh public-key encryption of one complex vector, so the
ciphertext is also re-randomised):

* imaginary part of every slot: uniform on ``[-imag_bound, imag_bound]`` (OS entropy). An honest
  query has no imaginary part, so the buyer loses nothing. Shifting a uniform of width ``2B`` by
  ``|e|`` moves it by statistical distance ``|e| / (2B)``.
* real part of non-output slots: uniform on ``[-fill_bound, fill_bound]`` (the caller's fill).
* real part of output slots: independent Gaussians of std ``flood_std``; shifting them by the vector
  ``e`` moves them by at most ``||e||_2 / (2 flood_std)`` (Pinsker on the Gaussian KL divergence
  ``||e||^2 / (2 flood_std^2)``).

So a buyer comparing two candidate datasets whose residual noises differ by ``d`` distinguishes
them with advantage at most ``||d_out||_2 / (2 flood_std) + sum_all |d| / (2 B)``
(:func:`statistical_distance_bound`). The output slots limit it: their flooding must stay below
the released precision. With the default parameters (N = 8192, scale 2^40, last prime 2^60) the
residual noise is ~2^-29 to 2^-24 in slot units (measured in ``tests/security/test_sanitise.py``),
``flood_std`` = 2^-18 (below the release rounding step, 1e-8 of the score bound ~ 2^-16.6 slot
units), so the statistical parameter is ~6 bits per output slot (advantage <= 2^-6 for one
released value, growing with the square root of the number of released values), and ~42 bits per
slot for the imaginary and non-output parts (B = 2^12; ~30 bits summed over a reply's 4096 slots). A 40-bit parameter
on the output slots
needs ``flood_std >= 2^40 ||d||`` ~ 2^16 slot units, larger than the scores
themselves: it would take a ~2^32 larger scale and last modulus (N = 16384 or 32768 parameters),
which this planner does not offer. With differential privacy on, the output slots also carry the
gradient-space Gaussian (std 2^10 sigma_C / n slot units for the aggregate, 2^10 sigma_C per
sample; sigma_C ~ 9 at epsilon = 1), ~2^38 / n resp. ~2^38 times the residual noise.

Imaginary pad (:func:`add_imaginary_pad`, unless ``imag_bound`` is 0). CKKS slots are complex and a
seller cannot see what a query encrypts: a buyer that encrypts ``v + i S w`` reads ``<v, row> +
i S <w, row>`` from each released slot, a second functional to ~``imag_bound / S`` (2.6e-6 at
S = 2^27). So at the last level (modulus ``q0``) the reply's first half gets a plaintext ``P`` with
``P_0 = 0`` and ``P_k = P_{N-k}`` uniform in ``[-L, L]``: conjugating the slots maps ``X`` to
``X^{-1} = -X^{N-1}``, under which ``P`` changes sign, so its slots are purely imaginary and the
real parts are untouched. ``L = q0/2 - B`` where ``B`` bounds an honest decryption's coefficients:
the sanitising plaintext's own (known exactly), the scores' (a coefficient is a mean over the N
roots, ``2 n_out`` of which hold a score: ``scale n_out score_bound / S``) and one slot unit for the
CKKS noise, so no honest reply wraps. Every imaginary part then carries noise of std
``~L sqrt(N/3) / scale`` (~2^24 slot units at the defaults); a buyer's imaginary signal larger than
the slack left in ``B`` wraps and spoils its own answer, real part included. Residual: ``P`` is
uniform on ``[-L, L]``, not on all of ``Z_q0``, so a change of the buyer's signal moves one
coefficient by statistical distance at most ``B / L`` (2^-12 for an aggregate, 2^-7 for a full
block of 4096 scores at the defaults).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import numpy as np
import tenseal.sealapi as sa

from tip_fed.errors import CryptoError

from .codec import ciphertext_from_bytes, ciphertext_polys, load_seal, polys_blob, tenseal_errors
from .keys import SessionKeys

__all__ = [
    "FLOOD_STD",
    "add_imaginary_pad",
    "decrypt_complex",
    "imaginary_pad",
    "pad_room",
    "sanitising_fill",
    "statistical_distance_bound",
]

#: Std (slot units) of the Gaussian flooding added to output slots: 2^-18 of a score whose bound
#: is 2^10 is a relative error of ~4e-9, below the default release rounding (1e-8 steps).
FLOOD_STD: float = 2.0**-18


def sanitising_fill(fill: np.ndarray, out_slots: np.ndarray, flood_std: float, imag_bound: float) -> np.ndarray:
    """The complex vector added (encrypted) to a reply: ``fill`` in non-output real parts, Gaussian
    flooding in output real parts, uniform noise in every imaginary part (OS entropy)."""
    gen = np.random.default_rng(secrets.randbits(128))
    values = np.asarray(fill, dtype=np.float64).copy()
    n_out = int(np.size(out_slots))
    values[out_slots] = gen.normal(0.0, flood_std, n_out) if flood_std > 0 else 0.0
    imag = gen.uniform(-imag_bound, imag_bound, values.shape[0]) if imag_bound > 0 else 0.0
    return values + 1j * imag


def pad_room(fill_coeffs: np.ndarray, q0: int, score_coeff_bound: int) -> int:
    """``L``: the largest pad half-width that no honest reply can wrap. An honest decryption's
    coefficients are the sanitising plaintext's (``fill_coeffs``, signed, known exactly) plus the
    scores' (at most ``score_coeff_bound``) plus the CKKS noise (~2^16 units; one slot unit of
    margin, ``2^{scale bits}``, is reserved for it by the caller)."""
    honest = int(np.abs(fill_coeffs).max()) + int(score_coeff_bound)
    return max(0, q0 // 2 - honest - 1)  # 0 only with scores near the last level's capacity


def imaginary_pad(n: int, room: int) -> np.ndarray:
    """Signed coefficients of a polynomial whose canonical embedding is purely imaginary:
    ``P_0 = 0``, ``P_k = P_{N-k}`` uniform in ``[-room, room]`` (OS entropy). Conjugating the slots
    maps ``X`` to ``X^{-1} = -X^{N-1}``, i.e. ``P_k`` to ``-P_{N-k}``; these coefficients change sign
    under it, so every slot of ``P`` is imaginary."""
    gen = np.random.default_rng(secrets.randbits(128))
    pad = np.zeros(n, dtype=np.int64)
    pad[1 : n // 2 + 1] = gen.integers(-room, room + 1, n // 2, dtype=np.int64)
    pad[n // 2 + 1 :] = pad[1 : n // 2][::-1]
    return pad


def _coefficient_form(ev: Any, seal_context: Any, version: tuple[int, int], members: tuple[Any, ...],
                      polys: np.ndarray) -> np.ndarray:
    """The coefficients (uint64, size x N) of NTT-form polynomials at the one-prime last level."""
    ct = load_seal(sa.Ciphertext(), seal_context, polys_blob(version, members, polys))
    ev.transform_from_ntt_inplace(ct)
    return ciphertext_polys(ct, "a reply in coefficient form")[2][:, 0, :]


def add_imaginary_pad(ev: Any, seal_context: Any, reply: Any, fill_pt: Any, score_coeff_bound: int) -> Any:
    """``reply`` (at the last level, modulus ``q0``) plus the plaintext :func:`imaginary_pad` of the
    largest half-width :func:`pad_room` allows, given the sanitising plaintext ``fill_pt`` it holds."""
    with tenseal_errors("padding a reply's imaginary parts", CryptoError):
        version, members, polys = ciphertext_polys(reply, "a reply")
        pid, _ntt, size, n, n_primes, scale, corr = members
        q0 = int(seal_context.last_context_data().parms().coeff_modulus()[0].value())
        if n_primes != 1 or not _ntt:
            raise CryptoError("a reply must be at the last level, in NTT form, before its imaginary pad")
        fill_ntt = np.array([fill_pt.data(i) for i in range(n)], dtype=np.uint64)[None, None, :]
        fill = _coefficient_form(ev, seal_context, version, (pid, 1, 2, n, 1, scale, corr),
                                 np.concatenate([fill_ntt, fill_ntt]))[0].astype(np.int64)
        fill = np.where(fill > q0 // 2, fill - q0, fill)
        pad = imaginary_pad(n, pad_room(fill, q0, score_coeff_bound))
        coeffs = _coefficient_form(ev, seal_context, version, members, polys)
        coeffs[0] = (coeffs[0] + np.mod(pad, q0).astype(np.uint64)) % np.uint64(q0)  # both < 2^60
        ct = load_seal(sa.Ciphertext(), seal_context,
                       polys_blob(version, (pid, 0, size, n, 1, scale, corr), coeffs[:, None, :]))
        ev.transform_to_ntt_inplace(ct)
        return ct


def statistical_distance_bound(
    diff: np.ndarray, out_slots: np.ndarray, flood_std: float, fill_bound: float, imag_bound: float
) -> float:
    """Upper bound on the statistical distance between two sanitised replies whose residual
    noises differ by the complex slot vector ``diff`` (see the module doc)."""
    d = np.asarray(diff)
    out = np.zeros(d.shape[0], dtype=bool)
    out[out_slots] = True
    real_out = float(np.linalg.norm(d.real[out])) / (2 * flood_std) if flood_std > 0 else math.inf
    real_rest = np.abs(d.real[~out]).sum() / (2 * fill_bound)
    imag = np.abs(d.imag).sum() / (2 * imag_bound) if imag_bound > 0 else math.inf
    return float(min(1.0, real_out + real_rest + imag))


def decrypt_complex(keys: SessionKeys, data: bytes) -> np.ndarray:
    """Every slot of a reply, real and imaginary (what a buyer holding the secret key can read;
    test and diagnostic use only: the protocol decrypts only the real output slots)."""
    _, h = keys._live()
    ct = ciphertext_from_bytes(
        h.seal_context, keys.params, data, what="reply", parms_id=h.last_parms_id, scale=h.output_scale()
    )
    pt = sa.Plaintext()
    with tenseal_errors("decrypting a reply", CryptoError):
        keys._decryptor.decrypt(ct, pt)
        return np.asarray(h.encoder.decode_complex(pt), dtype=np.complex128)
