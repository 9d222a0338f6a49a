"""Ciphertext sanitisation: every returned ciphertext hides the computation's residual noise.

Why: a CKKS decryption is ``message + e`` where ``e`` (rescale rounding, the query's encryption
noise times the seller's encoded rows, key switching) is a deterministic function of the seller's
rows and of inputs the buyer knows. A buyer holding the secret key reads ``e`` out of every slot,
real and imaginary, and can test a candidate dataset by recomputing it (IND-CPA-D; Li &
Micciancio 2021). Noise flooding adds fresh noise ``f`` whose distribution barely moves when
``e`` changes, so the reply's distribution is nearly independent of ``e``.

What is added to every reply (a fresh public-key encryption of one complex vector, so the
ciphertext is also re-randomised):

* imaginary part of every slot: uniform on ``[-imag_bound, imag_bound]`` (OS entropy). The message
  has no imaginary part, so the buyer loses nothing. Shifting a uniform of width ``2B`` by ``|e|``
  moves it by statistical distance ``|e| / (2B)``.
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
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import tenseal.sealapi as sa

from tip_fed.errors import CryptoError

from .codec import ciphertext_from_bytes, tenseal_errors
from .keys import SessionKeys

__all__ = ["FLOOD_STD", "decrypt_complex", "sanitising_fill", "statistical_distance_bound"]

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
