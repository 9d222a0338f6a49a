"""Flower simulation runtime: the buyer's ServerApp and one virtual ClientApp per seller under Ray, here.

Every seller is a data file on disk (seller id -> file), so each virtual SuperNode loads only its
own file and memory stays bounded with thousands of sellers. The buyer is the object handed in,
so the session is the one this process prepared (and timed, where the buyer times itself).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tip_fed.config import FlowerConfig
from tip_fed.flower.runs import files_loader, simulate_session
from tip_fed.flower.server_app import Session
from tip_fed.protocol import Buyer, SellerPolicy, Valuation
from tip_fed.runtimes.deployment import flower_env
from tip_fed.runtimes.processes import PrivateRun


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def value_flower_simulation(buyer: Buyer, files: Mapping[str, Path], max_samples: int, *,
                            flower: FlowerConfig | None = None, policy: SellerPolicy | None = None,
                            progress: bool = False, run: PrivateRun | None = None) -> Valuation:
    """Value the sellers of ``files`` (seller id -> safetensors data file) in one Flower simulation.

    Each virtual seller answers under ``policy`` (default: :class:`SellerPolicy`'s, aggregate scores
    only), its privacy ledger a file in ``run`` unless ``policy.ledger`` names one (as an in-process
    seller's lives for one run). Flower's home directory lives in ``run`` (a new private run when None),
    so nothing of the simulation outlives it.
    """
    flower = flower or FlowerConfig()
    session = Session(buyer, max_samples, list(files), flower)
    with ExitStack() as stack:
        if run is None:
            run = stack.enter_context(PrivateRun("tip-flower-sim-"))
        stack.enter_context(environment(flower_env(run.root / "flwr-home")))
        loader = files_loader(files, policy or SellerPolicy(), run.root / "ledgers")  # a ledger per seller, per run
        return simulate_session(session, loader, len(files), progress=progress)
