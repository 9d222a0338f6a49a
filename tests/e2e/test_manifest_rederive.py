"""A run's payouts re-derived from its manifest alone: the manifest records the effective settings
(the quick preset applied), so loading its config and running again gives the payouts written."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.runner import run_scenario
from simulations.settings import config_from_dict

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "tip-fed"

pytestmark = [pytest.mark.e2e]


def _payouts(out: Path) -> dict[tuple[str, str], float]:
    return {(r["seller_id"], r["rule"]): float(r["payout"]) for r in csv.DictReader((out / "payouts.csv").open())}


def test_payouts_are_re_derived_from_the_manifest_alone(tmp_path):
    first = tmp_path / "first"
    proc = subprocess.run([str(CLI), "simulate", "configs/causal.toml", "--out", str(first), "--quiet",
                           "--set", "quick=true", "--set", "payouts.budget=700"],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads((first / "manifest.json").read_text())["config"]
    assert recorded["quick"] is True and recorded["payouts"]["budget"] == 700

    again = run_scenario(config_from_dict(recorded), tmp_path / "again", progress=False)

    written, derived = _payouts(first), _payouts(again.out_dir)
    assert set(derived) == set(written) and len(written) >= 8
    # CKKS decryptions (and sellers' fresh sanitising noise) differ between sessions around the 8th
    # significant digit of the scores; payouts follow the scores, so they agree to ~1e-6 of the budget
    assert derived == pytest.approx(written, rel=1e-6, abs=1e-6 * 700)
    assert sum(v for (_, rule), v in written.items() if rule == "proportional") == pytest.approx(700, rel=1e-6)
    assert json.loads((again.out_dir / "manifest.json").read_text())["config"] == recorded
