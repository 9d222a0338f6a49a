"""Put two runs' payouts side by side (``tip-fed compare DIR1 DIR2``).

Typical uses: the same market on two runtimes (in-process vs Flower) must pay the same; two
configs (e.g. preconditioners) show how much the payout depends on the choice. Payouts are matched
by (session, seller, rule), so runs of any number of sessions compare session by session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tip_fed.errors import DataError
from tip_fed.market.metrics import spearman
from tip_fed.market.results import read_results

Key = tuple[str, str, str]


def _shares(run: Path) -> dict[Key, tuple[float, float]]:
    rows = read_results(run).rows("payouts.csv")
    return {(r["session"], r["seller_id"], r["rule"]): (float(r["payout"]), float(r["share"])) for r in rows}


def compare_runs(dir1: str | Path, dir2: str | Path) -> str:
    """Markdown: per-rule agreement of the two runs' shares, then every seller's payouts side by side."""
    a, b = _shares(Path(dir1)), _shares(Path(dir2))
    common = sorted(set(a) & set(b))
    if not common:
        raise DataError(
            f"{dir1} and {dir2} have no (seller, rule) payouts in common; were they runs of the same market?"
        )
    lines = [
        f"# Payouts: {dir1} vs {dir2}",
        "",
        f"{len(common)} (seller, rule) pairs in both; only in the first: {len(set(a) - set(b))}, "
        f"only in the second: {len(set(b) - set(a))}.",
        "",
        "| rule | Spearman of shares | L1 distance of shares | max abs payout difference |",
        "|---|---|---|---|",
    ]
    for rule in sorted({k[2] for k in common}):
        keys = [k for k in common if k[2] == rule]
        s1, s2 = [a[k][1] for k in keys], [b[k][1] for k in keys]
        rho = spearman(s1, s2)
        l1 = float(np.abs(np.subtract(s1, s2)).sum())
        dmax = max(abs(a[k][0] - b[k][0]) for k in keys)
        lines.append(f"| {rule} | {'–' if rho is None else f'{rho:.4f}'} | {l1:.4g} | {dmax:.4g} |")
    lines += [
        "",
        "| session | seller | rule | payout 1 | payout 2 | share 1 | share 2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in common:
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {a[k][0]:.4g} | {b[k][0]:.4g} | {a[k][1]:.4f} | {b[k][1]:.4f} |")
    return "\n".join(lines) + "\n"
