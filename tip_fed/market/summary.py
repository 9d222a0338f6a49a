"""A few lines a person reads when a run ends; the whole story stays in ``metrics.json`` and ``report.md``.

Works on the metrics of a single session and of replicated runs (pooled statistics), and on
runs without ground truth: a line is printed only for what the run computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_LINES = 15


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}g}"
    return str(value)


def _duration(seconds: Any) -> str:
    """``2.4 s``, ``95 s``, ``19 min 34 s``: a run's wall time as a person reads it."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return f"{seconds} s"
    if seconds < 100:
        return f"{_num(seconds)} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def _gini(value: Any) -> Any:
    """A Gini coefficient as printed: floating-point residue of an equal split (-1.8e-17) is 0."""
    return 0.0 if isinstance(value, float) and abs(value) < 1e-9 else value


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _validity(m: Mapping[str, Any]) -> list[str]:
    v = m.get("validity")
    if not isinstance(v, Mapping):
        return []
    rho = v.get("spearman")
    if isinstance(rho, Mapping):
        rho = rho.get("pooled")
    line = f"validity    signed Spearman with realised benefit {_num(rho)}"
    sessions = _get(m, "run.sessions") or 1
    if "top1_rate" in v:
        measured = v.get("n_sellers")
        among = (f" among the {measured} with measured benefit"
                 if isinstance(measured, int) and measured < (_get(m, "run.sellers") or 0) else "")
        line += (f", top seller{among} {'found' if v['top1_rate'] else 'missed'}" if sessions == 1
                 else f", top seller found in {100 * v['top1_rate']:.0f} % of sessions")
    lines = [line]
    paired = _get(v, "paired_vs_gradient_cosine.spearman")
    if isinstance(paired, Mapping):
        lines.append(
            "            vs gradient cosine: "
            + ", ".join(
                f"{k} {_num(paired[k])}"
                for k in ("delta_z", "p_sign_flip", "p_wilcoxon", "n_replicates")
                if paired.get(k) is not None
            )
        )
    return lines


def summary_lines(metrics: Mapping[str, Any], out_dir: str) -> list[str]:
    """At most :data:`MAX_LINES` lines: who was valued, how well, how faithfully, where the files are."""
    run = metrics.get("run", {}) if isinstance(metrics.get("run"), Mapping) else {}
    lines = []
    if run.get("sessions", 1) > 1:
        lines.append(
            f"valued      {run.get('sellers')} sellers x {run['sessions']} sessions "
            f"over {run.get('runtime', '?')} in {_duration(run.get('seconds'))}"
        )
    elif "sellers" in run:
        phase = run.get("valuation_seconds")  # None where the buyer ran in another process (Flower deployment)
        lines.append(
            f"valued      {run['sellers']} sellers in {_duration(run.get('seconds'))}"
            + (f" (valuation phase {_num(phase)} s)" if phase is not None else "")
        )
        if run.get("top_by_score") is not None:
            by_benefit = f"; {run['top_by_benefit']} by realised benefit" if run.get("top_by_benefit") else ""
            lines.append(f"top seller  {run['top_by_score']} by score{by_benefit}")
        if run.get("missing"):
            lines.append(f"missing     {', '.join(map(str, run['missing']))} (no reply; see report.md)")
    lines += _validity(metrics)
    fid = metrics.get("fidelity")
    if isinstance(fid, Mapping) and fid.get("n_scores"):
        lines.append(
            f"fidelity    encrypted vs plaintext: Pearson {_num(fid.get('pearson'), 6)}, "
            f"max relative error {_num(fid.get('max_rel_error'), 2)} over {fid['n_scores']} scores"
        )
    rules = _get(metrics, "payouts.rules")
    if isinstance(rules, Mapping) and rules:
        ref = _get(metrics, "payouts.reference")
        lines.append(
            f"payouts     {len(rules)} rules compared"
            + (f" against {ref}" if ref else "")
            + "; gini "
            + ", ".join(f"{r} {_num(_gini(c.get('gini')), 2)}" for r, c in rules.items() if isinstance(c, Mapping))
        )
    lines.append(f"results     {out_dir}/ (report.md explains every number; metrics.json has them all)")
    return lines[:MAX_LINES]
