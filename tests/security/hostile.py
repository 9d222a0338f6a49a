"""Running hostile Offers (:mod:`tip_fed.bench.hostile`) in a fresh seller process.

:func:`run_in_child` answers Offers in a new Python process and reports each outcome with the
process's own peak-RSS growth, so "refused before the allocation" is checked on the real process,
not inferred from time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tip_fed.bench.hostile import (
    BUILDERS,
    big_context,
    fake_offer,
    huge_dim,
    many_layers,
    rank_f,
    uint8_weights,
)
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.ledger import LedgerPolicy

__all__ = [
    "BUILDERS",
    "N_ROWS",
    "UNCAPPED",
    "big_context",
    "fake_offer",
    "hostile_offers",
    "huge_dim",
    "many_layers",
    "rank_f",
    "run_in_child",
    "target",
    "uint8_weights",
]

#: records held by the seller that hostile Offers are sent to
N_ROWS = 60
#: these tests are about resources, not privacy: exact answers are not capped
UNCAPPED = LedgerPolicy(max_exact=None, total_max_exact=None)


def target(records, **policy) -> Seller:
    """The seller "s" that hostile Offers are sent to: exact answers, no lifetime cap, ``policy`` on top."""
    return Seller("s", records, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED, **policy))


def hostile_offers(buyer) -> dict[str, bytes]:
    """Each hostile Offer, built from one honest Offer of ``buyer``, by name."""
    honest = buyer.offer(max_samples=100)
    return {name: build(honest, N_ROWS + 1) for name, build in BUILDERS.items()}


_CHILD = r"""
import json, sys, torch
from safetensors.torch import load_file
from tip_fed.errors import TipError
from tip_fed.config import SellerBudgetConfig
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.ledger import LedgerPolicy

data_path, budget, honest_path, *cases = sys.argv[1:]
policy = SellerPolicy(budget=SellerBudgetConfig(**json.loads(budget)), exact_per_sample=True,
                      lifetime=LedgerPolicy(max_exact=None, total_max_exact=None))
seller = Seller("s", load_file(data_path), policy=policy)
seller.respond(open(honest_path, "rb").read())  # warm-up: imports, tables, one honest answer


def peak_mb():  # this process's own peak RSS (ru_maxrss would include the parent's size at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


for path in cases:
    offer = open(path, "rb").read()
    before = peak_mb()
    try:
        seller.respond(offer)
        out = {"error": None}
    except TipError as exc:
        out = {"error": type(exc).__name__, "message": str(exc), "limit": getattr(exc, "limit", None)}
    out["rss_growth_mb"] = peak_mb() - before
    print(json.dumps(out), flush=True)
"""


def run_in_child(
    tmp: Path, data_path: Path, honest: bytes, offers: dict[str, bytes], budget: dict[str, object] | None = None
) -> dict[str, dict]:
    """Answer ``offers`` one after another in a fresh process holding ``data_path`` (after one
    honest Offer, so imports and tables are already resident); outcome per name."""
    (tmp / "honest.offer").write_bytes(honest)
    paths = []
    for name, blob in offers.items():
        path = tmp / f"{name}.offer"
        path.write_bytes(blob)
        paths.append(str(path))
    args = [str(data_path), json.dumps(budget or {}), str(tmp / "honest.offer"), *paths]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return dict(zip(offers, lines, strict=True))
