"""Many sellers end to end: ``tip-fed simulate`` on the healthcare market in scale mode.

Each point runs ``tip-fed simulate`` on the healthcare scenario (the settings of the repository's
``configs/healthcare.toml``, written out in :data:`HEALTHCARE`, so an installed tip_fed needs no
checkout) ``--set sellers=N --set runtime=<runtime> --set healthcare.dataset=synthetic --set
healthcare.samples-per-seller=100`` in a child process, so every point values exactly N x 100 samples, and samples the
summed resident memory of the whole
process tree (the Flower/Ray workers included) every 0.2 s.

Two times per point, because only one of them is per-seller work:

- ``valuation_seconds``: from the buyer's Offer going out to the last seller settled (every
  seller's encrypted reply, Flower's waves, decryption), as the run records it in ``metrics.json``
  (``run.valuation_seconds``). ``per_seller_spread`` (max/min - 1 of its per-seller figure over the
  points) is the flatness the acceptance criterion asks about (within +-20 %).
- ``seconds``: the whole ``simulate`` wall time. It adds fixed costs (interpreter and Ray start-up,
  buyer training, writing the report) and, since the healthcare scenario always validates against
  ground truth, the per-seller fine-tuning, baselines and decile checks that follow the session;
  it is kept for the record (``scale.seconds``), not as the per-seller figure.

``seller_seconds_mean`` (each seller's own reported time to answer, averaged) is the yardstick for
machine load: on a shared machine it moves with other work, and the valuation time per seller
with it; what the valuation time per seller gains beyond it is runtime overhead.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import tree_rss_mb

#: The healthcare scenario as ``configs/healthcare.toml`` sets it, over the library defaults.
HEALTHCARE: dict[str, str | int | float] = {
    "scenario": "healthcare",
    "seed": 0,
    "projection.rank": "auto",
    "preconditioner.kind": "identity",
    "protocol.disclosure": "aggregate",
    "ground-truth.lr": 0.01,
    "ground-truth.epochs": 1,
    "ground-truth.batch-size": 16,
    "healthcare.dataset": "diabetes",
    "healthcare.sites": 12,
    "healthcare.sellers": 8,
    "healthcare.replicates": 20,
    "healthcare.hidden": 16,
    "healthcare.train-epochs": 50,
}
SAMPLES_PER_SELLER = 100
#: The issue's acceptance criterion: peak RSS under 8 GB, valuation time per seller flat within +-20 %.
RSS_LIMIT_MB = 8 * 1024
FLAT_WITHIN = 0.20


WINDOW = 8


def write_config(path: Path) -> Path:
    """:data:`HEALTHCARE` as a TOML file (dotted keys) for ``tip-fed simulate``."""
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in HEALTHCARE.items()))
    return path


def measure(sellers: int, runtime: str, out_dir: Path, config: Path) -> dict[str, Any]:
    """One simulate run of ``config``: valuation-phase and whole-run seconds, peak tree RSS, sellers and samples
    valued."""
    cmd = [
        sys.executable,
        "-m",
        "tip_fed.cli",
        "simulate",
        str(config),
        "--out",
        str(out_dir),
        "--quiet",
        "--set",
        f"sellers={sellers}",
        "--set",
        f"runtime={runtime}",
        "--set",
        "healthcare.dataset=synthetic",
        "--set",
        f"healthcare.samples-per-seller={SAMPLES_PER_SELLER}",
        # Flower's simulation engine scans every stored message for every node each 0.1 s:
        # a small in-flight window keeps that scan cheap at 1000 nodes on 2 cores.
        "--set",
        f"flower.wave-size={WINDOW}",
    ]
    log = out_dir.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(0.2)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"simulate with {sellers} sellers failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-2000:]
        )
    with open(out_dir / "valuations.csv") as fh:
        rows = list(csv.DictReader(fh))
    valued, samples = len(rows), sum(int(r["n_samples"]) for r in rows)
    if samples != sellers * SAMPLES_PER_SELLER or valued != sellers:
        raise RuntimeError(
            f"expected {sellers} sellers x {SAMPLES_PER_SELLER} samples, the run valued "
            f"{valued} sellers and {samples} samples; see {out_dir}"
        )
    phase = json.loads((out_dir / "metrics.json").read_text())["run"].get("valuation_seconds")
    if phase is None:
        raise RuntimeError(f"runtime {runtime!r} does not time the valuation phase (the buyer runs elsewhere)")
    own = [float(r["seconds"]) for r in rows if r["session"] == "0"]
    return {
        "sellers": sellers,
        "samples": samples,
        "runtime": runtime,
        "valuation_seconds": phase,
        "valuation_seconds_per_seller": phase / sellers,
        "seller_seconds_mean": sum(own) / len(own),
        "seconds": seconds,
        "seconds_per_seller": seconds / sellers,
        "peak_rss_mb": peak,
    }


def _spread(values: list[float]) -> float:
    """max/min - 1: 0 when every point costs the same per seller."""
    return max(values) / min(values) - 1.0


def run(quick: bool, runtime: str | None = None, config: Path | None = None) -> dict[str, Any]:
    """The ``scale`` section: points at increasing seller counts, same runtime.

    Full mode: 100, 300 and 1000 sellers under ``flower-simulation``. Quick mode: 12 sellers
    in-process (Ray's start-up alone would take most of the two-minute budget). ``config``: a
    healthcare TOML to start from (default: :data:`HEALTHCARE`).
    """
    counts = (12,) if quick else (100, 300, 1000)
    runtime = runtime or ("inprocess" if quick else "flower-simulation")
    with tempfile.TemporaryDirectory(prefix="tip-bench-scale-") as tmp:
        config = config or write_config(Path(tmp) / "healthcare.toml")
        points = [measure(n, runtime, Path(tmp) / f"sellers-{n}", config) for n in counts]
    first, last = points[0], points[-1]
    spread = _spread([p["valuation_seconds_per_seller"] for p in points])
    return {
        "runtime": runtime,
        "sellers": last["sellers"],
        "samples": last["samples"],
        "samples_per_seller": SAMPLES_PER_SELLER,
        "valuation_seconds": last["valuation_seconds"],
        "valuation_seconds_per_seller": last["valuation_seconds_per_seller"],
        "per_seller_spread": spread,
        "seconds": last["seconds"],
        "whole_run_seconds_per_seller": last["seconds_per_seller"],
        "whole_run_per_seller_spread": _spread([p["seconds_per_seller"] for p in points]),
        "marginal_seconds_per_seller": (
            (last["seconds"] - first["seconds"]) / (last["sellers"] - first["sellers"]) if len(points) > 1 else None
        ),
        "peak_rss_mb": last["peak_rss_mb"],
        "acceptance": {
            "peak_rss_under_8gb": max(p["peak_rss_mb"] for p in points) < RSS_LIMIT_MB,
            "valuation_per_seller_flat": spread <= FLAT_WITHIN if len(points) > 1 else None,
        },
        "what": "valuation_* = buyer's Offer out to last seller settled (per-seller work); seconds / whole_run_* / "
        "marginal_* = whole `tip-fed simulate` incl. start-up, buyer training, ground truth and report; "
        "peak = summed RSS of the process tree",
        "points": points,
    }
