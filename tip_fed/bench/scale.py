"""Many sellers end to end: ``tip-fed simulate`` on the healthcare market in scale mode.

Each point runs ``tip-fed simulate configs/healthcare.toml --set sellers=N --set
runtime=<runtime>`` in a child process (market, buyer, every seller's encrypted reply, settling,
ground truth and report) and samples the summed resident memory of the whole process tree (the
Flower/Ray workers included) every 0.2 s. ``scale.seconds`` and ``scale.peak_rss_mb`` are the
largest point; ``seconds_per_seller`` per point shows whether the time per seller stays flat.
Synthetic hospitals have 20-200 records each (log-uniform), so samples are reported as counted.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import tree_rss_mb

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "healthcare.toml"


def measure(sellers: int, runtime: str, out_dir: Path) -> dict[str, Any]:
    """One simulate run: wall seconds, peak tree RSS, sellers and samples valued."""
    cmd = [sys.executable, "-m", "tip_fed.cli", "simulate", str(CONFIG), "--out", str(out_dir), "--quiet",
           "--set", f"sellers={sellers}", "--set", f"runtime={runtime}", "--set", "healthcare.dataset=synthetic"]
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
        raise RuntimeError(f"simulate with {sellers} sellers failed (exit {proc.returncode}); see {log}:\n"
                           + log.read_text()[-2000:])
    with open(out_dir / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    samples = sum(int(r["n_samples"]) for r in rows)
    return {"sellers": sellers, "valued": len(rows), "samples": samples, "seconds": seconds,
            "seconds_per_seller": seconds / sellers, "peak_rss_mb": peak, "runtime": runtime}


def run(quick: bool, runtime: str | None = None) -> dict[str, Any]:
    """The ``scale`` section: points at increasing seller counts, same runtime.

    Full mode: 100, 300 and 1000 sellers under ``flower-simulation``. Quick mode: 12 sellers
    in-process (Ray's start-up alone would take most of the two-minute budget).
    """
    counts = (12,) if quick else (100, 300, 1000)
    runtime = runtime or ("inprocess" if quick else "flower-simulation")
    with tempfile.TemporaryDirectory(prefix="tip-bench-scale-") as tmp:
        points = [measure(n, runtime, Path(tmp) / f"sellers-{n}") for n in counts]
    last = points[-1]
    per_seller = [p["seconds_per_seller"] for p in points]
    return {
        "runtime": runtime,
        "sellers": last["sellers"],
        "samples": last["samples"],
        "seconds": last["seconds"],
        "peak_rss_mb": last["peak_rss_mb"],
        "seconds_per_seller": last["seconds_per_seller"],
        "per_seller_spread": max(per_seller) / min(per_seller) - 1.0,
        "marginal_seconds_per_seller": (
            (last["seconds"] - points[0]["seconds"]) / (last["sellers"] - points[0]["sellers"])
            if len(points) > 1 else None
        ),
        "what": "whole `tip-fed simulate` (healthcare scale mode): market, buyer, encrypted replies, settle, "
        "ground truth, report; peak = summed RSS of the process tree",
        "points": points,
    }
