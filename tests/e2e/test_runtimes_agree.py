"""One config, four runtimes: the same per-seller valuations and the same payout rankings.

Each runtime is run as a user runs it, ``tip-fed simulate CONFIG --set runtime=R``: in-process
objects, Flower simulation (Ray), Flower deployment (SuperLink + SuperNodes as separate processes,
TLS and node authentication) and native gRPC seller services (TLS). Sellers add fresh CKKS noise to
every release, so scores are compared to 1e-5 of each score, or to the session's noise floor for
scores near zero. A replicated market (two healthcare replicates) checks that every party of every
runtime values the replicate it is given, not replicate 0, within the CKKS tolerance each run states.
"""

import csv
import json
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
WAITS = ["flower.node-wait-s=90", "flower.timeout-s=180"]
SETTINGS = ["ground-truth.enabled=false", "causal.seller-classes=[[1], [3], [4]]", *WAITS]
# the smallest replicated market the pooled statistics accept: 2 replicates of 4 hospitals
REPLICATED = ["seed=5", "healthcare.replicates=2", "healthcare.sellers=4", "healthcare.sites=6", *WAITS]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _simulate(runtime: str, out: Path, config: str = "configs/causal.toml", settings: list[str] = SETTINGS) -> None:
    args = [str(CLI), "simulate", config, "--quiet", "--out", str(out), "--set", f"runtime={runtime}"]
    for s in settings:
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


def _replicate_scores(out: Path) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(session, seller) -> (decrypted score, plaintext score, n_samples) from valuations.csv."""
    with (out / "valuations.csv").open() as fh:
        return {(r["session"], r["seller_id"]): (float(r["score"]), float(r["score_plaintext"]), int(r["n_samples"]))
                for r in csv.DictReader(fh)}


def _tolerance(out: Path, replicate: str, n: int) -> float:
    """The CKKS tolerance of one seller total that the run itself applied (see simulations/fidelity.py)."""
    fid = json.loads((out / "metrics.json").read_text())["sessions"][int(replicate)]["fidelity"]
    session = json.loads((out / "manifest.json").read_text())["sessions"][int(replicate)]
    step = session["valuation"]["disclosure_controls"]["release_quantum"]
    assert fid["within_tolerance"] and fid["worst_error_over_tolerance"] <= 1
    return n * fid["slot_tolerance"] * fid["score_unit"] + step / 2


def _seeds(out: Path) -> list[dict]:
    return [s["seeds"] for s in json.loads((out / "manifest.json").read_text())["sessions"]]


def test_four_runtimes_value_every_replicate_of_a_replicated_market_alike(tmp_path):
    outs = {}
    for runtime in RUNTIMES:
        outs[runtime] = tmp_path / runtime
        _simulate(runtime, outs[runtime], "configs/healthcare.toml", REPLICATED)

    ref = _replicate_scores(outs["inprocess"])
    assert {rep for rep, _ in ref} == {"0", "1"} and len(ref) == 8
    seeds = _seeds(outs["inprocess"])
    assert [s["replicate"] for s in seeds] == [0, 1] and seeds[0]["projection"] != seeds[1]["projection"]
    # the replicates are different markets: a runtime scoring replicate 1 with replicate 0's buyer stands out
    per_rep = [{round(plain, 6) for (r, _), (_, plain, _) in ref.items() if r == rep} for rep in ("0", "1")]
    assert per_rep[0].isdisjoint(per_rep[1])
    for runtime in RUNTIMES:
        scores = _replicate_scores(outs[runtime])
        assert sorted(scores) == sorted(ref), runtime
        assert _seeds(outs[runtime]) == seeds, runtime
        for key, (tip, plain, n) in scores.items():
            tol = _tolerance(outs[runtime], key[0], n)
            # the simulator's own reference does not depend on the runtime
            assert abs(plain - ref[key][1]) <= 1e-9 * abs(ref[key][1]), (runtime, key)
            assert abs(tip - plain) <= tol, (runtime, key, tip, plain, tol)
            assert abs(tip - ref[key][0]) <= 2 * tol, (runtime, key, tip, ref[key][0], tol)
