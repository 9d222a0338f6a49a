"""What a packing plan costs a seller before anything is loaded: memory of the SEAL context, keys and
ciphertexts, and the scoring's seconds, so that an Offer is costed before it is allocated."""

from __future__ import annotations

from dataclasses import dataclass

from .params import HEParams, PackingPlan

__all__ = ["SellerCost", "ciphertext_memory_bytes", "context_memory_bytes", "key_memory_bytes", "seller_cost"]

# ---- memory costs (what a seller must hold to load and use a public context) -----------------
#: SEAL keeps several uint64 tables per prime per level (NTT roots and their inverses, Shoup
#: companions); 10 words per coefficient matches the measured 270 MB of N = 32768 with 15 primes.
_TABLE_WORDS = 10


def ciphertext_memory_bytes(params: HEParams, n_primes: int | None = None) -> int:
    """Bytes of one expanded 2-polynomial ciphertext in memory (uint64 residues)."""
    primes = len(params.coeff_mod_bit_sizes) - 1 if n_primes is None else n_primes
    return 2 * primes * params.poly_modulus_degree * 8


def context_memory_bytes(params: HEParams) -> int:
    """Rough bytes of a SEALContext: per-level tables for every prime still present at that level."""
    n = len(params.coeff_mod_bit_sizes)
    return (n * (n + 1) // 2) * params.poly_modulus_degree * 8 * _TABLE_WORDS


def key_memory_bytes(params: HEParams, n_galois_keys: int) -> int:
    """Bytes of the expanded public key and ``n_galois_keys`` Galois keys in memory.

    A key-switching key holds one 2-polynomial ciphertext over all primes per data prime.
    """
    n_all = len(params.coeff_mod_bit_sizes)
    public = ciphertext_memory_bytes(params, n_all)
    return public + n_galois_keys * (n_all - 1) * ciphertext_memory_bytes(params, n_all)


@dataclass(frozen=True)
class SellerCost:
    """What a plan costs a seller scoring ``n_rows`` rows, before anything is loaded: bytes of the
    SEALContext's tables, of the expanded public key and the plan's Galois keys, and of one expanded
    top-level ciphertext; and the rough single-core seconds of the scoring (:meth:`PackingPlan.est_seconds`)."""

    context: int
    keys: int
    ciphertext: int
    seconds: float


def seller_cost(plan: PackingPlan, n_rows: int) -> SellerCost:
    """Memory and time ``plan`` costs a seller scoring ``n_rows`` rows (costed before its context is loaded)."""
    params = plan.params
    return SellerCost(
        context=context_memory_bytes(params),
        keys=key_memory_bytes(params, len(plan.galois_steps)),
        ciphertext=ciphertext_memory_bytes(params),
        seconds=plan.est_seconds(n_rows),
    )
