"""CKKS layer of tip_fed: parameters and packing plans, session keys, packed encrypted scoring.

The only package that imports TenSEAL. Buyer: :func:`plan_packing` -> :meth:`SessionKeys.generate`
-> ship :meth:`SessionKeys.public_context_bytes`, ``plan.to_dict()`` and :func:`encrypt_query`;
seller: :func:`load_public_context` -> :func:`score_rows`; buyer: :func:`decrypt_scores`, then
:meth:`SessionKeys.destroy`. Capacity planning: :func:`measure_op_costs` times the scoring's
CKKS operations on this machine.
"""

from .encoding_cache import EncodingCache
from .keys import PublicContext, SessionKeys, load_public_context
from .naive import baseline_public_context_bytes, decrypt_naive, encrypt_query_naive, score_rows_naive
from .op_costs import OpCosts, measure_op_costs
from .packing import decrypt_scores, encrypt_query, score_rows
from .params import (
    DEFAULT_FILL_BOUND,
    MAX_QUERY_NORM,
    HEParams,
    PackingPlan,
    check_params,
    plan_packing,
    security_bits,
)

__all__ = [
    "DEFAULT_FILL_BOUND",
    "MAX_QUERY_NORM",
    "EncodingCache",
    "HEParams",
    "OpCosts",
    "PackingPlan",
    "PublicContext",
    "SessionKeys",
    "baseline_public_context_bytes",
    "check_params",
    "decrypt_naive",
    "decrypt_scores",
    "encrypt_query",
    "encrypt_query_naive",
    "load_public_context",
    "measure_op_costs",
    "plan_packing",
    "score_rows",
    "score_rows_naive",
    "security_bits",
]
