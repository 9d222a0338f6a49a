"""The `tip-fed` console command end to end, as a user runs it."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "tip-fed"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([str(CLI), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("seed", [0, 1])
def test_causal_simulation_writes_valid_results(tmp_path, seed):
    out = tmp_path / f"causal-{seed}"
    proc = _run("simulate", "configs/causal.toml", "--out", str(out), "--quiet", "--set", f"seed={seed}")
    assert proc.returncode == 0, proc.stderr
    for name in ("manifest.json", "valuations.csv", "samples.csv", "ground_truth.csv", "metrics.json", "report.md",
                 "seller_values.png", "score_vs_benefit.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fidelity"]["pearson"] >= 0.99999
    assert metrics["fidelity"]["max_rel_error"] <= 1e-6
    assert metrics["fidelity"]["within_tolerance"] and metrics["fidelity"]["worst_error_over_tolerance"] <= 1
    # the seller holding the class the buyer's model never saw is valued first, and realises most benefit
    assert metrics["run"]["top_by_score"] == metrics["run"]["expected_best"] == "digits-4"
    assert metrics["run"]["top_by_benefit"] == "digits-4"
    assert metrics["validity"]["top1_rate"] == 1.0 and metrics["run"]["sessions"] == 1
    rows = list(csv.DictReader((out / "valuations.csv").open()))
    assert {r["seller_id"] for r in rows} == {"digits-1", "digits-2", "digits-3", "digits-4"}
    manifest = json.loads((out / "manifest.json").read_text())
    [session] = manifest["sessions"]  # a single market is a run of one session
    assert manifest["config"]["seed"] == seed and session["valuation"]["he_params"]["poly_modulus_degree"] == 8192
    # a single market projects with the config seed; the manifest says so
    assert session["seeds"] == {"config": seed, "replicate": None, "projection": seed}
    assert session["valuation"]["projection"]["seed"] == seed

    # the report re-renders from the saved files alone
    (out / "report.md").unlink()
    proc = _run("report", str(out))
    assert proc.returncode == 0 and (out / "report.md").is_file()
    assert "digits-4" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["simulate", "configs/missing.toml"], "does not exist"),
        (["simulate", "configs/causal.toml", "--set", "projection.rank=zero"], "projection.rank must be an integer"),
        (["simulate", "configs/causal.toml", "--set", "crypto.coeff-mod-bit-sizes=[60,60,60,60]"], "128-bit"),
        (["report", "/nonexistent-dir"], "does not exist"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    proc = _run(*args, "--out", str(tmp_path)) if args[0] == "simulate" else _run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
