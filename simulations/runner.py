"""Run a market scenario end to end and write its results directory.

Steps: build the market; the buyer prepares its encrypted query; every seller answers the Offer
over the configured runtime; the buyer settles; then, with the simulator's view of both sides, the
plaintext reference and the ground truth (fine-tuning on each seller's data) are computed and
compared with what was decrypted. A replicated scenario runs one such session per replicate.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from simulations.exchanges import EXCHANGES
from simulations.fidelity import check_session
from simulations.replicates import run_replicated
from simulations.results import RunResult, session_result, write_run
from simulations.scenarios import build_markets, make_buyer, plaintext_reference
from tip_fed.config import TipConfig
from tip_fed.market.ground_truth import finetune_benefit


def run_scenario(config: TipConfig, out_dir: str | Path, *, progress: bool = True) -> RunResult:
    """Run the configured scenario over its runtime and write every result file into ``out_dir``."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    bar = tqdm(total=4, desc="tip-fed", disable=not progress, unit="phase")
    bar.set_postfix_str("building market and buyer")
    built = build_markets(config)
    if isinstance(built, list):
        bar.close()
        return run_replicated(config, built, out, progress=progress, started=t0)
    market = built
    buyer = make_buyer(market, config)
    bar.update()

    bar.set_postfix_str(f"sellers scoring under encryption ({config.runtime})")
    valuation = EXCHANGES[config.runtime](config, market, buyer, progress)
    bar.update()

    bar.set_postfix_str("plaintext reference and ground truth")
    plain = {v.seller_id: plaintext_reference(buyer, market, v.seller_id) for v in valuation.sellers}
    tolerance = check_session(buyer, valuation, plain)
    truth = {}
    if config.ground_truth.enabled:
        gt = config.ground_truth
        for i, sid in enumerate(tqdm(list(plain), desc="fine-tuning", leave=False, disable=not progress)):
            truth[sid] = finetune_benefit(
                market.model, market.task, market.sellers[sid], market.objective,
                lr=gt.lr, epochs=gt.epochs, batch_size=gt.batch_size, seed=config.seed + i, layers=gt.layers,
            )
    bar.update()

    bar.set_postfix_str("writing results")
    session = session_result(config, market, buyer, valuation, plain, truth, time.perf_counter() - t0,
                             tolerance=tolerance)
    result = write_run(out, config, market.name, [session], t0, valuation)
    bar.update()
    bar.close()
    return result
