"""Single-operation CKKS timings, for the benchmark's floor ``k * t_mul / S``.

Kept inside the crypto package (the only one that imports TenSEAL) so benchmarks measure the very
operations :func:`tip_fed.crypto.score_rows` runs, on the seller's own query ciphertext.
"""

from __future__ import annotations

import time

import numpy as np
import tenseal.sealapi as sa

from .codec import ciphertext_from_bytes
from .keys import PublicContext
from .params import PackingPlan

__all__ = ["op_timings"]


def op_timings(ctx: PublicContext, plan: PackingPlan, query: list[bytes], n: int) -> dict[str, float]:
    """Seconds per ``multiply_plain`` (out of place; wall and CPU), ``add_inplace`` and
    ``rotate_vector`` on the first query ciphertext at the query level (n calls; n // 32 rotations)."""
    h = ctx.handles
    ct = ciphertext_from_bytes(
        h.seal_context, plan.params, query[0], what="query", parms_id=h.first_parms_id,
        scale=plan.params.global_scale,
    )
    values = np.random.default_rng(0).uniform(-1, 1, plan.slots).tolist()
    pt = sa.Plaintext()
    h.encoder.encode(values, h.first_parms_id, plan.params.global_scale, pt)
    ev, out, acc = h.evaluator, sa.Ciphertext(), sa.Ciphertext()
    ev.multiply_plain(ct, pt, acc)
    n_rot = max(1, n // 32)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        ev.multiply_plain(ct, pt, out)
    w1, c1 = time.perf_counter(), time.process_time()
    for _ in range(n):
        ev.add_inplace(acc, out)
    w2 = time.perf_counter()
    steps = plan.galois_steps or (0,)  # rotation by 0 is a copy: a plan without rotations
    for _ in range(n_rot):
        ev.rotate_vector(ct, steps[0], ctx.galois_keys, out)
    w3 = time.perf_counter()
    return {"t_mul": (w1 - w0) / n, "t_mul_cpu": (c1 - c0) / n, "t_add": (w2 - w1) / n, "t_rot": (w3 - w2) / n_rot}
