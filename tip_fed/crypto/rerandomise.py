"""A seller's encryptions of zero under a buyer's public key, with randomness the key cannot expose.

Why: a seller re-randomises every reply by adding ``Enc_pk(0) = ((u b + e0) / p, (u a + e1) / p)``
(computed at the key level, then divided and rounded by the special prime ``p``, as SEAL does). The
second half is masked by ``u a``; the first half carries ``u b`` so that ``c0 + c1 s`` cancels it
for the ``s`` the key was made with, leaving ``u (b + a s) / p``. SEAL draws ``u`` ternary. A buyer
whose ``b`` is far from ``-a s`` (``b + a s = p k`` with a large known ``k``: a seller cannot tell
such a ``b`` from an honest one) then reads ``u k`` out of the decryption, rounds it to ``u``,
subtracts ``u a / p`` from the second half and holds a second exact functional of the seller's rows.

The fix: ``u`` uniform in ``[-2^54, 2^54]`` (OS entropy). An honest key's error ``e`` then adds
``u e / p``, a few coefficient units (~2e-10 in a slot at scale 2^40: far below the reply's
flooding, 2^-18, and the CKKS rounding noise itself). A lying key gains at most
``log2(q0 / (2 R))`` bits per coefficient of ``u`` from the first half, where ``R`` is the noise
there the buyer cannot remove: the seller's fill (~2^46 coefficient units with the default
bounds: ~13 of u's 55 bits) or, with every fill and flood bound at 0, the rounding (~2^5: ~54
bits). ``u`` must be known exactly to strip ``u a / p``; what is left is an LWE instance
(dimension N, modulus q0, rounding error) whose secret is the unknown part of ``u``.

How: the polynomial products are taken in the NTT domain (pointwise, exact Python integers); the
NTT and the division by ``p`` are SEAL's own, run in a context whose first level holds the key's
primes (a throwaway context for arithmetic only: nothing is encrypted under it).
"""

from __future__ import annotations

import secrets
import threading
from typing import Any

import numpy as np
import tenseal.sealapi as sa

from tip_fed.errors import CryptoError

from .codec import ciphertext_polys, load_seal, polys_blob, tenseal_errors

__all__ = ["U_BITS", "WideZero"]

#: ``u`` is uniform in [-2^U_BITS, 2^U_BITS] (see the module doc).
U_BITS = 54
_EXT: dict[tuple[int, ...], Any] = {}  # extended SEALContexts by key primes
_EXT_LOCK = threading.Lock()


def _extended(n: int, primes: list[int]) -> Any:
    """A SEALContext whose first data level has exactly ``primes`` (one more prime on top)."""
    key = (n, *primes)
    with _EXT_LOCK:
        if key in _EXT:
            return _EXT[key]
    extra = next(int(m.value()) for m in sa.CoeffModulus.Create(n, [59] * (len(primes) + 1))
                 if int(m.value()) not in primes)
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus([sa.Modulus(q) for q in [*primes, extra]])
    ctx = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.NONE)  # arithmetic only, never encryption
    with _EXT_LOCK:
        return _EXT.setdefault(key, ctx)


class WideZero:
    """Encryptions of zero under one public key (b, a), with ``u`` uniform in [-2^U_BITS, 2^U_BITS]."""

    def __init__(self, seal_context: Any, public_key: Any) -> None:
        key_data = seal_context.key_context_data()
        self.n = int(key_data.parms().poly_modulus_degree())
        self.primes = [int(m.value()) for m in key_data.parms().coeff_modulus()]
        self.seal_context = seal_context
        self.ext = _extended(self.n, self.primes)
        self.ev = sa.Evaluator(self.ext)
        self.version, members, polys = ciphertext_polys(public_key, "the loaded public key")
        if polys.shape != (2, len(self.primes), self.n) or members[1] != 1:
            raise CryptoError("the public key is not a key-level NTT pair; cannot re-randomise under it")
        self.a = polys[1]
        q = np.array(self.primes, dtype=np.uint64)[:, None]
        # (u, u) x (b, a - b) = (u b, u a, u (a - b)): the first two are the pair, found by SEAL
        self._key = self._load_ext(self._ext_blob(polys[0], (polys[1] + q - polys[0]) % q, ntt=True))

    def _ext_blob(self, c0: np.ndarray, c1: np.ndarray, ntt: bool) -> bytes:
        pid = np.asarray(self.ext.first_parms_id(), dtype="<u8").tobytes()
        return polys_blob(self.version, (pid, int(ntt), 2, self.n, len(self.primes), 1.0, 1), np.stack([c0, c1]))

    def _load_ext(self, blob: bytes) -> Any:
        return load_seal(sa.Ciphertext(), self.ext, blob)

    def _rns(self, coeffs: np.ndarray) -> np.ndarray:
        """Signed int64 coefficients reduced mod every key prime (primes x N, uint64)."""
        return np.stack([np.mod(coeffs, np.int64(q)).astype(np.uint64) for q in self.primes])

    def _ntt(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NTT forms (key primes x N) of two signed coefficient vectors, by SEAL's own transform."""
        ct = self._load_ext(self._ext_blob(self._rns(x), self._rns(y), ntt=False))
        self.ev.transform_to_ntt_inplace(ct)
        polys = ciphertext_polys(ct, "an NTT transform")[2]
        return polys[0], polys[1]

    def encrypt_zero(self, parms_id: Any, scale: float) -> Any:
        """A fresh encryption of zero at ``parms_id`` (the first data level) with scale ``scale``:
        ``(round(u b / p), round(u a / p))``. (SEAL also adds small errors e0, e1 before dividing;
        divided by p ~ 2^60 they round away, so the rounding is the error, as in SEAL's replies.)"""
        gen = np.random.default_rng(secrets.randbits(128))  # OS entropy, like the sanitising fill
        u = gen.integers(-(1 << U_BITS), (1 << U_BITS) + 1, self.n, dtype=np.int64)
        with tenseal_errors("re-randomising a reply", CryptoError):
            ct = self._load_ext(self._ext_blob(self._rns(u), self._rns(u), ntt=False))
            self.ev.transform_to_ntt_inplace(ct)
            prod = sa.Ciphertext()
            self.ev.multiply(ct, self._key, prod)
            prod.resize(self.ext, self.ext.first_parms_id(), 2)
            self.ev.rescale_to_next_inplace(prod)  # SEAL's divide-and-round by the special prime
            polys = ciphertext_polys(prod, "the re-randomiser")[2]
            pid = np.asarray(parms_id, dtype="<u8").tobytes()
            blob = polys_blob(self.version, (pid, 1, 2, self.n, polys.shape[1], scale, 1), polys)
            return load_seal(sa.Ciphertext(), self.seal_context, blob)
