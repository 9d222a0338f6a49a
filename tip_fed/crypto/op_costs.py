"""What the CKKS operations of packed scoring cost on this machine, measured.

Capacity planning: a seller's scoring is built of plaintext products (``D`` per block and chunk),
additions and rotations (giant steps and folds, :mod:`tip_fed.crypto.params`), so the seconds of
each on the machine that will serve tell what it can answer, and give the floor ``dim * t_mul / S``
seconds per score that no packing can beat (``tip-fed bench`` reports :func:`score_rows` against it).
The cost model that refuses costly Offers uses such figures measured once on a reference machine
(``params._COST_*``). The operations run here are the very ones :func:`score_rows` runs, on a
session's own query ciphertext at the query level.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as sa

from tip_fed.errors import ConfigError, CryptoError

from .codec import ciphertext_from_bytes, tenseal_errors
from .keys import PublicContext
from .params import PackingPlan

__all__ = ["OpCosts", "measure_op_costs"]


@dataclass(frozen=True)
class OpCosts:
    """Seconds per CKKS operation at a plan's query level (medians are the caller's to take)."""

    multiply_plain_s: float  # one out-of-place plaintext product, wall clock
    multiply_plain_cpu_s: float  # the same, CPU time of this process (load on other cores excluded)
    add_s: float  # one in-place ciphertext addition
    rotate_s: float  # one rotation by the plan's first Galois step (0.0 for a plan that rotates nothing)


def measure_op_costs(context: PublicContext, plan: PackingPlan, query: Sequence[bytes], calls: int = 128) -> OpCosts:
    """Time ``calls`` plaintext products and additions and ``calls // 32`` rotations (at least one)
    on the first query ciphertext of a session (``query`` as :func:`encrypt_query` made it for ``plan``)."""
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ConfigError(f"calls must be an integer >= 1, got {calls!r}")
    if plan.params != context.params:
        raise ConfigError(f"the packing plan is for {plan.params} but the public context uses {context.params}")
    if not query:
        raise ConfigError("measuring op costs needs the session's query ciphertexts; got none")
    h = context.handles
    scale = plan.params.global_scale
    ct = ciphertext_from_bytes(h.seal_context, plan.params, query[0], what="query", parms_id=h.first_parms_id,
                               scale=scale)
    values = np.random.default_rng(0).uniform(-1, 1, plan.slots).tolist()
    with tenseal_errors("measuring CKKS op costs", CryptoError):
        pt = sa.Plaintext()
        h.encoder.encode(values, h.first_parms_id, scale, pt)
        ev, out, acc = h.evaluator, sa.Ciphertext(), sa.Ciphertext()
        ev.multiply_plain(ct, pt, acc)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            ev.multiply_plain(ct, pt, out)
        w1, c1 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            ev.add_inplace(acc, out)
        w2 = time.perf_counter()
        rotate_s = 0.0
        if plan.galois_steps and context.galois_keys is not None:
            n_rot = max(1, calls // 32)
            for _ in range(n_rot):
                ev.rotate_vector(ct, plan.galois_steps[0], context.galois_keys, out)
            rotate_s = (time.perf_counter() - w2) / n_rot
    return OpCosts((w1 - w0) / calls, (c1 - c0) / calls, (w2 - w1) / calls, rotate_s)
