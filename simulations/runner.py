"""Run a market scenario end to end and write its results directory.

Steps: build the market; the buyer prepares its encrypted query; every seller answers the Offer
over the configured runtime; the buyer settles; then, with the simulator's view of both sides, the
plaintext reference and the ground truth (fine-tuning on each seller's data) are computed and
compared with what was decrypted. A replicated scenario runs one such session per replicate.
"""

from __future__ import annotations

import time
from pathlib import Path

from simulations.replicates import run_replicated
from simulations.results import RunResult
from simulations.scenarios import build_markets
from simulations.settings import SimulationConfig
from tip_fed.console import quiet_third_party, run_progress, step


def run_scenario(config: SimulationConfig, out_dir: str | Path, *, progress: bool = True) -> RunResult:
    """Run the configured scenario over its runtime and write every result file into ``out_dir``.

    Every run is N valuation sessions with one results format; a single market is N = 1.
    """
    quiet_third_party()
    t0 = time.perf_counter()
    with run_progress("tip-fed", 1, enabled=progress, unit="phase"):
        step(f"building the {config.scenario} market")
        built = build_markets(config)
        markets = built if isinstance(built, list) else [built]
        return run_replicated(config, markets, Path(out_dir), progress=progress, started=t0)
