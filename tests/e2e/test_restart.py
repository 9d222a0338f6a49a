"""A killed and restarted buyer run: rerunning into the same directory is idempotent and no file
is ever half-written (results are written atomically: temp file + rename)."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "tip-fed"
ARGS = ["simulate", "configs/causal.toml", "--quiet", "--force", "--set", "quick=true"]
# Encrypted scores carry fresh CKKS noise each run (~1e-9 of the score bound); everything else is exact.
NOISY = {"score", "mean_score", "seconds", "commitment"}  # fresh noise and commitment salt every session

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _simulate(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([str(CLI), *ARGS, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_same_results(a: Path, b: Path) -> None:
    assert (a / "ground_truth.csv").read_bytes() == (b / "ground_truth.csv").read_bytes()
    for name in ("valuations.csv", "samples.csv"):
        ra, rb = _rows(a / name), _rows(b / name)
        assert len(ra) == len(rb) and ra and ra[0].keys() == rb[0].keys()
        for x, y in zip(ra, rb, strict=True):
            for key in x:
                if key in NOISY:
                    continue
                assert x[key] == y[key], f"{name}: {key} differs ({x[key]} vs {y[key]})"
            if "commitment" in x:  # salted per session: a root of the right size, never the same twice
                assert len(x["commitment"]) == len(y["commitment"]) == 64 and x["commitment"] != y["commitment"]
            if x.get("score"):
                bound = json.loads((a / "manifest.json").read_text())["sessions"][0]["valuation"]["disclosure_controls"]
                assert abs(float(x["score"]) - float(y["score"])) <= 100 * bound["release_quantum"] * 60
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m["sessions"][0]["valuation"].pop("session_id")
        m.pop("versions", None)
        for sent in m["sessions"][0]["valuation"].get("transport", {}).get("offers", {}).values():
            sent.pop("offer_bytes")  # fresh keys and ciphertexts: a few bytes more or less every session
    assert _diff(ma, mb) == []


def _diff(a, b, path=""):
    """Dotted paths where two JSON values differ (readable failures for big manifests)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _no_partial_files(out: Path, *, killed: bool = False) -> None:
    """No temporary file left behind, except (right after a SIGKILL) the hidden one being written, which
    the next run removes; and every visible JSON file complete."""
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    if killed:
        leftovers = [n for n in leftovers if not (n.startswith(".") and n.endswith(".tmp"))]
    assert leftovers == [], f"temporary or half-written files left behind: {leftovers}"
    for p in out.glob("*.json"):
        json.loads(p.read_text())  # every JSON file is complete


def test_killed_and_restarted_buyer_run_matches_a_clean_run(tmp_path):
    clean = tmp_path / "clean"
    proc = _simulate(clean)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    out = tmp_path / "restarted"
    first = _simulate(out)
    try:  # kill it while it is writing results: as soon as the first results file appears
        wait_until(lambda: first.poll() is not None or any(out.glob("*.csv")), 300, poll_s=0.005)
        assert first.poll() is None, "the run finished before it could be killed, so nothing was tested"
        assert any(out.glob("*.csv")), "no results file appeared"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL, "the run was not killed mid-write"
    written = {p.name for p in out.iterdir()}
    assert "metrics.json" not in written or "report.md" not in written, f"the run had finished writing: {written}"
    _no_partial_files(out, killed=True)
    again = _simulate(out)
    assert again.wait(timeout=600) == 0, again.stderr.read()
    _no_partial_files(out)
    _assert_same_results(clean, out)

    # and a second rerun over complete results changes nothing but the noise
    third = _simulate(out)
    assert third.wait(timeout=600) == 0
    _assert_same_results(clean, out)
