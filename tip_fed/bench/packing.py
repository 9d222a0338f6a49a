"""Packed encrypted scoring against its floor ``k * t_mul / S`` and against one score per ciphertext.

All figures come from one run with the same keys, so machine load affects every side alike; the
repetitions are interleaved (op costs measured, then a scoring run, ...) and medians are reported.

- ``t_mul``: one ``Evaluator.multiply_plain`` (out of place) on a query-level ciphertext
  (:func:`~tip_fed.crypto.measure_op_costs`).
- ``bound_us_per_score = k * t_mul / S``: scoring n samples needs at least n k / S products.
- ``us_per_score``: **steady state** - a seller answering a repeated query over the same rows
  with its :class:`~tip_fed.crypto.EncodingCache` warm (encoding skipped), blocks spread over
  every core (``workers``, forked processes). ``us_per_score_serial`` is the same on one core;
  ``us_per_score_cold`` is the first query on one core (every diagonal encoded). All include
  loading the query copies, giant-step and fold rotations, masking, fill encryption and
  serialisation, i.e. all of :func:`score_rows`. Full mode scores 8,192 rows: two full blocks
  of S = 4,096, one per core.
- ``speedup_vs_naive``: TenSEAL ``dot``, one score and one ciphertext per sample, same
  parameters and keys (timed on a subset; it is linear in the number of scores).
- ``breakdown_us_per_score``: the phases of :func:`score_rows` (cold run and steady run).

sealapi calls hold the GIL (benchmarks/gil_probe.py), so the second core is used through forked
workers (:mod:`tip_fed.crypto.parallel`), not threads.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tip_fed.crypto import (
    EncodingCache,
    HEParams,
    SessionKeys,
    decrypt_scores,
    encrypt_query,
    load_public_context,
    measure_op_costs,
    plan_packing,
    score_rows,
)
from tip_fed.crypto.naive import baseline_public_context_bytes, decrypt_naive, encrypt_query_naive, score_rows_naive
from tip_fed.crypto.parallel import default_workers

from .common import median, timed


def run(quick: bool, seed: int = 0, dim: int = 1024, n_poly: int = 8192) -> dict[str, Any]:
    """The ``packing`` section of the benchmark JSON."""
    samples, naive_n, reps, op_calls = (1024, 32, 2, 128) if quick else (8192, 256, 5, 512)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dim)
    x *= 3.0 / np.linalg.norm(x)
    rows = rng.normal(size=(samples, dim))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    expected = rows @ x

    plan = plan_packing(dim, samples, HEParams(poly_modulus_degree=n_poly))
    keys = SessionKeys.generate(plan)
    public = keys.public_context_bytes()
    ctx = load_public_context(public, plan.params)
    query = encrypt_query(keys, plan, x)

    cache = EncodingCache(max_bytes=2 * 1024**3)
    cold_phases: dict[str, float] = {}
    w0, c0 = time.perf_counter(), time.process_time()
    replies = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(seed), cache=cache,
                         timings=cold_phases)
    t_cold, t_cold_cpu = time.perf_counter() - w0, time.process_time() - c0
    scores = decrypt_scores(keys, plan, replies, samples)

    workers = default_workers()
    op_costs, steady, serial, serial_cpu, serial_phases = [], [], [], [], []
    for _ in range(reps):  # interleaved: load changes hit both sides of the ratio alike
        op_costs.append(measure_op_costs(ctx, plan, query, op_calls))
        phases: dict[str, float] = {}
        w0, c0 = time.perf_counter(), time.process_time()
        score_rows(ctx, plan, query, rows, rng=np.random.default_rng(seed), cache=cache, timings=phases)
        serial.append(time.perf_counter() - w0)
        serial_cpu.append(time.process_time() - c0)
        serial_phases.append(phases)
        w0 = time.perf_counter()
        replies = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(seed), cache=cache,
                             workers=workers)
        steady.append(time.perf_counter() - w0)
    warm_scores = decrypt_scores(keys, plan, replies, samples)

    n_naive = min(naive_n, samples)
    base_public = baseline_public_context_bytes(keys)
    base_ctx = load_public_context(base_public, plan.params)
    naive_query = encrypt_query_naive(keys, x)
    naive_replies, t_naive = timed(lambda: score_rows_naive(base_ctx, naive_query, rows[:n_naive]))
    naive_scores = decrypt_naive(keys, naive_replies)
    keys.destroy()

    t_mul = median([p.multiply_plain_s for p in op_costs])
    t_mul_cpu = median([p.multiply_plain_cpu_s for p in op_costs])
    us = median(steady) / samples * 1e6
    us_serial = median(serial) / samples * 1e6
    us_cpu = median(serial_cpu) / samples * 1e6
    bound = dim * t_mul / plan.slots * 1e6
    bound_cpu = dim * t_mul_cpu / plan.slots * 1e6
    us_naive = t_naive / n_naive * 1e6
    per_score = 1e6 / samples
    mid = serial_phases[int(np.argsort(serial)[len(serial) // 2])]
    return {
        "definition": "us_per_score = steady state (repeated query, encodings cached, blocks over "
        "`workers` forked processes); _serial = same on one core; _cold = first query, one core",
        "dim": dim,
        "poly_modulus_degree": n_poly,
        "slots": plan.slots,
        "samples": samples,
        "plan": plan.to_dict(),
        "t_mul_us": t_mul * 1e6,
        "t_mul_cpu_us": t_mul_cpu * 1e6,
        "t_add_us": median([p.add_s for p in op_costs]) * 1e6,
        "t_rot_us": median([p.rotate_s for p in op_costs]) * 1e6,
        "workers": workers,
        "us_per_score": us,
        "us_per_score_serial": us_serial,
        "us_per_score_cold": t_cold / samples * 1e6,
        "bound_us_per_score": bound,
        "ratio_to_bound": us / bound,
        "ratio_to_bound_serial": us_serial / bound,
        "ratio_to_bound_cold": t_cold / samples * 1e6 / bound,
        "ratio_to_bound_serial_cpu": us_cpu / bound_cpu,
        "speedup_vs_naive": us_naive / us,
        "speedup_vs_naive_cold": us_naive / (t_cold / samples * 1e6),
        "naive_us_per_score": us_naive,
        "naive_timed_samples": n_naive,
        "steady_seconds_all": steady,
        "serial_seconds_all": serial,
        "cold_seconds": t_cold,
        "cold_cpu_seconds": t_cold_cpu,
        "breakdown_us_per_score_cold": {k: v * per_score for k, v in cold_phases.items()},
        "breakdown_us_per_score_serial": {k: v * per_score for k, v in mid.items()},
        "cache_bytes": cache.bytes,
        "query_bytes": sum(len(q) for q in query),
        "public_context_bytes": len(public),
        "naive_public_context_bytes": len(base_public),
        "reply_bytes_per_score": sum(len(r) for r in replies) / samples,
        "max_abs_error": float(np.max(np.abs(scores - expected))),
        "max_abs_error_cached": float(np.max(np.abs(warm_scores - expected))),
        "max_abs_error_naive": float(np.max(np.abs(naive_scores - expected[:n_naive]))),
    }
