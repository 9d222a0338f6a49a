"""`tip-fed bench --quick` end to end: every headline key is written and finite (no timing checks)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tip_fed.bench import SUMMARY_KEYS

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "tip-fed"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_bench_quick_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([str(CLI), "bench", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "quick"
    for key in SUMMARY_KEYS:
        section, field = key.split(".")
        value = result[section][field]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        assert result["summary"][key] == value
    assert result["scale"]["runtime"]
    assert result["gradients"]["max_rel_diff"] < 1e-3  # hooks and full gradients agree
    assert result["packing"]["max_abs_error"] < 1e-3
    for field in ("platform", "cpu_count", "ram_gb"):
        assert result["machine"][field]
    assert result["versions"]["tenseal"] != "not installed"
