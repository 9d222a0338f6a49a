"""One config, four runtimes: the same per-seller valuations and the same payout rankings.

Each runtime is run as a user runs it, ``tip-fed simulate CONFIG --set runtime=R``: in-process
objects, Flower simulation (Ray), Flower deployment (SuperLink + SuperNodes as separate processes,
TLS and node authentication) and native gRPC seller services (TLS). Sellers add fresh CKKS noise to
every release, so scores are compared to 1e-5 of each score, or to the session's noise floor for
scores near zero.
"""

import csv
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "tip-fed"
RUNTIMES = ("inprocess", "flower-simulation", "flower-deployment", "grpc")
# three sellers keep the deployment small; generous waits for a loaded 2-core machine
SETTINGS = ["ground-truth.enabled=false", "causal.seller-classes=[[1], [3], [4]]",
            "flower.node-wait-s=90", "flower.timeout-s=180"]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _simulate(runtime: str, out: Path) -> None:
    args = [str(CLI), "simulate", "configs/causal.toml", "--quiet", "--out", str(out), "--set", f"runtime={runtime}"]
    for s in SETTINGS:
        args += ["--set", s]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{runtime}: {proc.stderr[-3000:]}"


def _scores(out: Path) -> dict[str, float]:
    with (out / "valuations.csv").open() as fh:
        return {r["seller_id"]: float(r["score"]) for r in csv.DictReader(fh)}


def _payout_rankings(out: Path) -> dict[str, list[str]]:
    by_rule: dict[str, list[tuple[float, str]]] = defaultdict(list)
    with (out / "payouts.csv").open() as fh:
        for r in csv.DictReader(fh):
            by_rule[r["rule"]].append((float(r["payout"]), r["seller_id"]))
    return {rule: [sid for _, sid in sorted(rows, key=lambda t: (-t[0], t[1]))] for rule, rows in by_rule.items()}


def test_four_runtimes_give_the_same_valuations_and_payout_rankings(tmp_path):
    outs = {}
    for runtime in RUNTIMES:
        outs[runtime] = tmp_path / runtime
        _simulate(runtime, outs[runtime])

    ref_scores = _scores(outs["inprocess"])
    ref_payouts = _payout_rankings(outs["inprocess"])
    assert sorted(ref_scores) == ["digits-1", "digits-3", "digits-4"]
    assert {"flat", "proportional", "softmax", "budget_balanced"} <= set(ref_payouts)
    scale = max(abs(s) for s in ref_scores.values())
    for runtime in RUNTIMES[1:]:
        scores = _scores(outs[runtime])
        assert sorted(scores) == sorted(ref_scores), runtime
        for sid, ref in ref_scores.items():
            # sanitising noise: ~1e-8 of the largest total per session
            assert abs(scores[sid] - ref) <= max(1e-5 * abs(ref), 1e-7 * scale), (runtime, sid, scores[sid], ref)
        assert _payout_rankings(outs[runtime]) == ref_payouts, runtime
