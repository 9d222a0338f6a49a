"""Run a market scenario end to end and write its results directory.

Steps: build the market; the buyer prepares its encrypted query; every seller answers the Offer
over the configured runtime; the buyer settles; then, with the simulator's view of both sides, the
plaintext reference and the ground truth (fine-tuning on each seller's data) are computed and
compared with what was decrypted. A replicated scenario runs one such session per replicate.
"""

from __future__ import annotations

import time
from pathlib import Path

from simulations.exchanges import EXCHANGES
from simulations.fidelity import check_session
from simulations.replicates import run_replicated
from simulations.results import RunResult, session_result, write_run
from simulations.scenarios import build_markets, make_buyer, plaintext_reference
from simulations.settings import SimulationConfig
from tip_fed.console import counted, phase, quiet_third_party, run_progress, step
from tip_fed.market.ground_truth import finetune_benefit


def run_scenario(config: SimulationConfig, out_dir: str | Path, *, progress: bool = True) -> RunResult:
    """Run the configured scenario over its runtime and write every result file into ``out_dir``."""
    quiet_third_party()
    out = Path(out_dir)
    t0 = time.perf_counter()
    with run_progress("tip-fed", 4, enabled=progress, unit="phase"):
        step(f"building the {config.scenario} market")
        built = build_markets(config)
        if isinstance(built, list):
            return run_replicated(config, built, out, progress=progress, started=t0)
        market = built
        phase("the buyer's preconditioner and query")
        buyer = make_buyer(market, config)

        step(f"{len(market.sellers)} sellers scoring under encryption ({config.runtime})")
        valuation = EXCHANGES[config.runtime](config, market, buyer, progress)

        step("plaintext reference and ground truth")
        plain = {v.seller_id: plaintext_reference(buyer, market, v.seller_id) for v in valuation.sellers}
        tolerance = check_session(buyer, valuation, plain)
        truth = {}
        if config.ground_truth.enabled:
            gt = config.ground_truth
            for i, sid in enumerate(counted(list(plain), "ground-truth fine-tunes")):
                truth[sid] = finetune_benefit(
                    market.model, market.task, market.sellers[sid], market.objective,
                    lr=gt.lr, epochs=gt.epochs, batch_size=gt.batch_size, seed=config.seed + i, layers=gt.layers,
                )

        step("writing results")
        session = session_result(config, market, buyer, valuation, plain, truth, time.perf_counter() - t0,
                                 tolerance=tolerance)
        return write_run(out, config, market.name, [session], t0, valuation)
