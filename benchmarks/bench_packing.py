"""Packed (BSGS) vs naive (one TenSEAL ``dot`` per score) encrypted scoring, in one run.

    python benchmarks/bench_packing.py --out results/packing.json [--samples 4096 --dim 1024]

Scores ``--samples`` unit-norm rows of dimension ``--dim`` against one encrypted query at
N = 8192. The naive baseline is timed on a subset (``--naive-samples``, default 256) and
extrapolated per score (it is linear in the number of scores: one ``dot`` and one ciphertext
each). Exits with status 1 if the packed path is less than ``--min-speedup`` (default 20) times
faster per score than the baseline. Seller-side times are single-process wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tip_fed.crypto import (
    HEParams,
    SessionKeys,
    decrypt_naive,
    decrypt_scores,
    encrypt_query,
    encrypt_query_naive,
    load_public_context,
    plan_packing,
    score_rows,
    score_rows_naive,
)
from tip_fed.crypto.codec import new_context_proto


def _timed(fn: Any, repeat: int = 1) -> tuple[Any, float]:
    """Result of the last call and the median wall time over ``repeat`` calls."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("tenseal", "numpy", "tip-fed"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def run(samples: int, dim: int, naive_samples: int, repeat: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dim)
    x *= 3.0 / np.linalg.norm(x)
    rows = rng.normal(size=(samples, dim))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    expected = rows @ x

    plan = plan_packing(dim, samples, HEParams(poly_modulus_degree=8192))
    keys, t_keygen = _timed(lambda: SessionKeys.generate(plan))
    public, t_public = _timed(keys.public_context_bytes)
    ctx, t_load = _timed(lambda: load_public_context(public, plan.params))
    query, t_query = _timed(lambda: encrypt_query(keys, plan, x), repeat)
    replies, t_score = _timed(
        lambda: score_rows(ctx, plan, query, rows, rng=np.random.default_rng(seed)), repeat
    )
    scores, t_decrypt = _timed(lambda: decrypt_scores(keys, plan, replies, samples), repeat)
    galois_min = len(new_context_proto(public).public_context.galois_keys)

    # ---- naive baseline: one dot product and one ciphertext per score (subset) -------------
    n_naive = min(naive_samples, samples)
    baseline_public, t_baseline_ctx = _timed(keys.baseline_public_context_bytes)
    baseline_ctx = load_public_context(baseline_public, plan.params)
    naive_query, t_naive_query = _timed(lambda: encrypt_query_naive(keys, x))
    naive_replies, t_naive = _timed(
        lambda: score_rows_naive(baseline_ctx, naive_query, rows[:n_naive])
    )
    naive_scores, t_naive_dec = _timed(lambda: decrypt_naive(keys, naive_replies))
    galois_default = len(new_context_proto(baseline_public).public_context.galois_keys)
    keys.destroy()

    us_packed = t_score / samples * 1e6
    us_naive = t_naive / n_naive * 1e6
    return {
        "config": {
            "samples": samples,
            "dim": dim,
            "seed": seed,
            "repeat": repeat,
            "params": plan.params.to_dict(),
            "plan": plan.to_dict(),
            "galois_steps": list(plan.galois_steps),
        },
        "packing": {
            "us_per_score": us_packed,
            "us_per_score_end_to_end": (t_query + t_score + t_decrypt) / samples * 1e6,
            "seller_seconds": t_score,
            "seller_seconds_estimated": plan.est_seconds(samples),
            "speedup_vs_naive": us_naive / us_packed,
            "keygen_seconds": t_keygen,
            "public_context_build_seconds": t_public,
            "public_context_load_seconds": t_load,
            "encrypt_query_seconds": t_query,
            "decrypt_seconds": t_decrypt,
            "query_bytes": sum(len(q) for q in query),
            "query_bytes_estimated": plan.query_bytes,
            "reply_ciphertexts": len(replies),
            "reply_bytes": sum(len(r) for r in replies),
            "reply_bytes_estimated": plan.reply_bytes(samples),
            "reply_bytes_per_score": sum(len(r) for r in replies) / samples,
            "max_rel_error": _rel_err(scores, expected),
            "max_abs_error": float(np.max(np.abs(scores - expected))),
        },
        "naive": {
            "method": "one TenSEAL CKKSVector.dot + one ciphertext per score (paper's way)",
            "timed_samples": n_naive,
            "extrapolated": n_naive < samples,
            "note": f"timed on the first {n_naive} samples; per-score cost extrapolated to "
            f"{samples} (linear: one dot and one ciphertext per score)",
            "us_per_score": us_naive,
            "seller_seconds_extrapolated": us_naive * samples / 1e6,
            "encrypt_query_seconds": t_naive_query,
            "decrypt_us_per_score": t_naive_dec / n_naive * 1e6,
            "query_bytes": len(naive_query),
            "reply_bytes_per_score": sum(len(r) for r in naive_replies) / n_naive,
            "reply_bytes_extrapolated": sum(len(r) for r in naive_replies) / n_naive * samples,
            "max_rel_error": _rel_err(naive_scores, expected[:n_naive]),
        },
        "keys": {
            "minimal_galois_keys": True,
            "public_context_bytes": len(public),
            "galois_key_bytes": galois_min,
            "galois_key_count": len(plan.galois_steps),
            "default_public_context_bytes": len(baseline_public),
            "default_galois_key_bytes": galois_default,
            "default_public_context_build_seconds": t_baseline_ctx,
            "public_context_saving_factor": len(baseline_public) / len(public),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "affinity_cpus": (
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            ),
        },
        "versions": _versions(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="JSON file to write")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--naive-samples", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="median over this many packed runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-speedup", type=float, default=20.0)
    args = ap.parse_args(argv)
    result = run(args.samples, args.dim, args.naive_samples, args.repeat, args.seed)
    result["packing"]["min_speedup"] = args.min_speedup
    ok = result["packing"]["speedup_vs_naive"] >= args.min_speedup
    result["packing"]["speedup_ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    p, n = result["packing"], result["naive"]
    print(
        f"packed {p['us_per_score']:.1f} us/score, naive {n['us_per_score']:.1f} us/score "
        f"-> {p['speedup_vs_naive']:.1f}x ({'ok' if ok else 'BELOW'} target "
        f"{args.min_speedup:g}x); max rel err {p['max_rel_error']:.2e}; public context "
        f"{result['keys']['public_context_bytes']} B vs default "
        f"{result['keys']['default_public_context_bytes']} B; wrote {args.out}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
