"""A run's metrics from its sessions: per-session correlations, then pooled over sessions.

One code path for any number of sessions: with one session the pooled correlation is that
session's own, with no interval; intervals and paired tests appear only when the number of
sessions can support them (:mod:`tip_fed.market.stats`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tip_fed.market import metrics, stats
from tip_fed.market.results import METHODS, Session


def _f(x: Any) -> float | None:
    return None if x in ("", None) else float(x)


def per_session(sessions: Sequence[Session], k: int) -> list[dict[str, Any]]:
    """``sessions.csv`` rows: each method's signed correlations with realised benefit, top-1 and top-k agreement,
    over the sellers of a session whose ground truth was measured (sessions without ground truth are skipped)."""
    out = []
    for i, s in enumerate(sessions):
        benefit = {t["seller_id"]: float(t["benefit"]) for t in s.ground_truth}
        rows = [r for r in s.valuations if r["seller_id"] in benefit]
        if len(rows) < 2:
            continue
        b = [benefit[r["seller_id"]] for r in rows]
        row: dict[str, Any] = {"session": i, "n_sellers": len(rows)}
        for m in METHODS:
            vals = [_f(r.get("score" if m == "tip" else m)) for r in rows]
            if None in vals:
                continue
            row[f"{m}_spearman"], row[f"{m}_pearson"] = metrics.spearman(vals, b), metrics.pearson(vals, b)  # type: ignore[arg-type]
            if m in ("tip", "gradient_cosine"):
                row[f"{m}_top1"] = metrics.top1_match(vals, b)  # type: ignore[arg-type]
                row[f"{m}_topk"] = stats.topk_agreement(vals, b, k)  # type: ignore[arg-type]
        out.append(row)
    return out


def _validity(reps: list[dict[str, Any]], k: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    ns = [r["n_sellers"] for r in reps]

    def block(m: str) -> dict[str, Any]:
        return {c: stats.pool([r.get(f"{m}_{c}") for r in reps], ns, seed=seed) for c in ("spearman", "pearson")}

    validity = {**block("tip"), "top1_rate": float(np.mean([r["tip_top1"] for r in reps])),
                f"top{k}_agreement": float(np.mean([r["tip_topk"] for r in reps])),
                "n_sellers": int(np.mean(ns))}
    methods = [m for m in METHODS[1:] if all(f"{m}_spearman" in r for r in reps)]
    base = {m: block(m) for m in methods}
    if "gradient_cosine" in base:
        base["gradient_cosine"]["top1_rate"] = float(np.mean([r["gradient_cosine_top1"] for r in reps]))
        base["gradient_cosine"][f"top{k}_agreement"] = float(np.mean([r["gradient_cosine_topk"] for r in reps]))
        if len(reps) >= 2:
            validity["paired_vs_gradient_cosine"] = {
                c: stats.paired([r[f"tip_{c}"] for r in reps], [r[f"gradient_cosine_{c}"] for r in reps], ns,
                                seed=seed) for c in ("spearman", "pearson")}
    return validity, base


def _mean_over(sessions: Sequence[Session], key: str) -> dict[str, Any] | None:
    """A per-session metric block averaged over the sessions that have it (numbers only; booleans as rates)."""
    blocks = [s.metrics[key] for s in sessions if s.metrics.get(key)]
    if len(blocks) <= 1:
        return dict(blocks[0]) if blocks else None
    out: dict[str, Any] = {}
    for name in blocks[0]:
        vals = [b[name] for b in blocks if isinstance(b.get(name), (int, float))]
        if vals and len(vals) == len(blocks):
            out[name] = float(np.mean(vals))
    return out


def _payouts(sessions: Sequence[Session]) -> dict[str, Any]:
    per_rule: dict[str, dict[str, list[float]]] = {}
    reference = None
    for s in sessions:
        pm = s.metrics.get("payouts", {})
        reference = pm.get("reference") or reference
        for rule, comp in pm.get("rules", {}).items():
            for key, val in comp.items():
                if val is not None:
                    per_rule.setdefault(rule, {}).setdefault(key, []).append(val)
    return {"reference": reference,
            "rules": {rule: {k: float(np.mean(v)) for k, v in d.items()} for rule, d in per_rule.items()}}


def _fidelity(sessions: Sequence[Session]) -> dict[str, Any] | None:
    pairs = [(float(r["score"]), float(r["score_plaintext"])) for s in sessions for r in (*s.valuations, *s.samples)
             if r.get("score_plaintext") is not None]
    if not pairs:
        return None
    fid: dict[str, Any] = metrics.fidelity([e for e, _ in pairs], [p for _, p in pairs])
    checked = [s.metrics["fidelity"] for s in sessions if "within_tolerance" in s.metrics.get("fidelity", {})]
    if checked:
        fid["within_tolerance"] = all(c["within_tolerance"] for c in checked)
        fid["worst_error_over_tolerance"] = max(c["worst_error_over_tolerance"] for c in checked)
    return fid


def _distribution(sessions: Sequence[Session]) -> dict[str, Any]:
    per = [stats.value_distribution([float(r["score"]) for r in s.valuations]) for s in sessions if s.valuations]
    if not per:
        return {}
    out: dict[str, Any] = {k: float(np.mean([d[k] for d in per])) for k in ("gini", "top10_share", "fraction_negative")}
    return {**out, "n_sellers": int(sum(d["n_sellers"] for d in per))}


def _run(sessions: Sequence[Session], runtime: str, seconds: float | None) -> dict[str, Any]:
    runs = [s.metrics.get("run", {}) for s in sessions]
    phases = [r.get("valuation_seconds") for r in runs]
    phase = None if None in phases or not phases else float(sum(phases))
    total = sum(len(s.valuations) for s in sessions)
    out: dict[str, Any] = {**(runs[0] if len(runs) == 1 else {}), "sessions": len(sessions), "runtime": runtime,
                           "seconds": seconds, "sellers": max((len(s.valuations) for s in sessions), default=0),
                           "valuation_seconds": phase,
                           "valuation_seconds_per_seller": phase / total if phase is not None and total else None,
                           "missing": sorted({m for r in runs for m in r.get("missing", [])}),
                           "rejected": {k: v for r in runs for k, v in (r.get("rejected") or {}).items()}}
    return out


def run_metrics(sessions: Sequence[Session], *, runtime: str, seconds: float | None, seed: int = 0,
                extra: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``metrics.json`` (pooled over sessions) and the ``sessions.csv`` rows of a run."""
    n_sellers = min((len(s.valuations) for s in sessions), default=0)
    k = max(1, min(3, n_sellers // 3))
    reps = per_session(sessions, k)
    m: dict[str, Any] = {"run": _run(sessions, runtime, seconds), "payouts": _payouts(sessions),
                         "distribution": _distribution(sessions)}
    if (fid := _fidelity(sessions)) is not None:
        m["fidelity"] = fid
    if reps:
        m["validity"], base = _validity(reps, k, seed)
        if base:
            m["baselines"] = base
    if (dec := _mean_over(sessions, "deciles")) is not None:
        m["deciles"] = dec
    return {**m, **(extra or {})}, reps
