"""The buyer's encrypted query as a seller holds it, and the checks every packed message shares
(plan against parameters, ciphertext count, noise against the last level's headroom). A seller
loads the query when it opens an Offer, so a damaged query or noise the last level cannot hold is
refused before it spends anything on the Offer; :mod:`.packing` then scores the loaded copies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tip_fed.errors import CodecError, ConfigError, CryptoError

from .codec import ciphertext_from_bytes, tenseal_errors
from .keys import PublicContext
from .params import MAX_QUERY_NORM, HEParams, PackingPlan

__all__ = ["LoadedQuery", "blob_list", "check_noise", "load_query", "same_params"]


def same_params(plan: PackingPlan, params: HEParams, who: str) -> None:
    if not isinstance(plan, PackingPlan):
        raise ConfigError(f"expected a PackingPlan, got {type(plan).__name__}")
    if plan.params != params:
        raise ConfigError(
            f"the packing plan is for {plan.params} but the {who} uses {params}; use the plan "
            "the session keys were generated for"
        )



def blob_list(items: object, count: int, what: str) -> list[bytes]:
    if not isinstance(items, (list, tuple)):
        raise CodecError(f"{what} must be a list of bytes, got {type(items).__name__}")
    if len(items) != count:
        raise CodecError(f"expected {count} {what} ciphertext(s), got {len(items)}")
    return list(items)



def check_noise(per_coord: float, headroom: int) -> None:
    limit = (2.0 ** (headroom - 1) - MAX_QUERY_NORM) / (8 * MAX_QUERY_NORM)
    if not per_coord <= limit:
        raise ConfigError(
            f"gradient noise of std {per_coord:.4g} (units of the norm bound) exceeds {limit:.4g}, what "
            "these CKKS parameters can hold without overflowing the last level; use a larger epsilon "
            "or aggregate disclosure"
        )


@dataclass(frozen=True, eq=False)
class LoadedQuery:
    """The buyer's query copies parsed and checked against one public context and plan, so that a
    seller can refuse a damaged query before it spends anything on the Offer (then scored as is)."""

    ctx: PublicContext
    plan: PackingPlan
    copies: list[list[Any]]  # per chunk, its ``plan.baby`` SEAL ciphertexts


def load_query(ctx: PublicContext, plan: PackingPlan, query: list[bytes], noise_std: float = 0.0) -> LoadedQuery:
    """Everything :func:`score_rows` checks of a query before it scores: the ``plan.chunks * plan.baby``
    ciphertexts parse at the first level and scale, the context holds the rotation keys the plan needs
    (CodecError/CryptoError if not), and gradient noise of per-coordinate ``noise_std`` (units of the
    norm bound) fits the last level (ConfigError if not)."""
    same_params(plan, ctx.params, "public context")
    check_noise(noise_std, plan.params.coeff_mod_bit_sizes[0] - plan.params.global_scale_bits)
    ctx.require_rotations(plan.galois_steps)
    blobs = blob_list(query, plan.chunks * plan.baby, "query")
    h = ctx.handles
    with tenseal_errors("loading the query", CryptoError):
        copies = [
            [
                ciphertext_from_bytes(h.seal_context, plan.params, blobs[i * plan.baby + j],
                                      what=f"query ciphertext {i * plan.baby + j}", parms_id=h.first_parms_id,
                                      scale=plan.params.global_scale)
                for j in range(plan.baby)
            ]
            for i in range(plan.chunks)
        ]
    return LoadedQuery(ctx, plan, copies)
