"""Hostile Offers that pass structural validation but would exhaust a long-lived seller, and a
benchmark of what they cost a real ``tip-fed seller serve`` process.

Each builder starts from an honest buyer's Offer and changes what an attacker controls, keeping
the Offer well-formed (fresh session id, fingerprint recomputed, packing consistent with the new
dimension, as many query ciphertexts as the packing announces). Used by the security tests and by
:func:`run`, which measures the seller's peak RSS under each one (kernel VmHWM, reset between
Offers) and an honest buyer's latency with and without a concurrent attack.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tip_fed.core.models import MLP
from tip_fed.crypto.params import HEParams, plan_packing
from tip_fed.protocol.model import encode_model, fingerprint
from tip_fed.protocol.offer import params_to_pb, plan_to_pb
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

MiB = 1 << 20
F_WIDE = 8192  # Linear(1, F) / Linear(F, 10) with ranks (1, F) / (F, 1): two F x F float64 matrices, 1 GiB


def _refit(offer: pb.Offer, dim: int, rows: int, params: HEParams | None = None) -> None:
    """Give ``offer`` a fresh session, a packing for ``dim`` (and ``params``), and the query count it announces."""
    offer.session_id = uuid.uuid4().hex
    params = params or HEParams()
    plan = plan_packing(dim, rows, params, query_copies=1)
    offer.he.CopyFrom(params_to_pb(params))
    offer.packing.CopyFrom(plan_to_pb(plan))
    del offer.query[:]
    offer.query.extend([b"\x00" * 64] * (plan.chunks * plan.baby))


def _layers(offer: pb.Offer, layers: list[tuple[str, int, int, int, int]]) -> None:
    del offer.projection.layers[:]
    offer.projection.layers.extend(
        pb.LayerProjection(name=n, in_features=i, out_features=o, rank_in=ri, rank_out=ro) for n, i, o, ri, ro in layers
    )


def _set_model(offer: pb.Offer, payload: pb.ModelPayload) -> None:
    offer.model.CopyFrom(payload)


def rank_f(honest: bytes, rows: int, f: int = F_WIDE) -> bytes:
    """A real MLP([1, F, 10]) with legal ranks (1, F) and (F, 1): 8F^2 bytes of matrices for ~50F of weights."""
    offer = pb.Offer.FromString(honest)
    _set_model(offer, encode_model(MLP([1, f, 10])))
    _layers(offer, [("0", 1, f, 1, f), ("2", f, 10, f, 1)])
    _refit(offer, 2 * f, rows)
    return offer.SerializeToString()


def many_layers(honest: bytes, rows: int, count: int = 40_000) -> bytes:
    """40,000 distinct 1 x 1 layer entries (about 700 KB of spec)."""
    offer = pb.Offer.FromString(honest)
    _layers(offer, [(f"layer.{i}", 1, 1, 1, 1) for i in range(count)])
    _refit(offer, count, rows)
    return offer.SerializeToString()


def huge_dim(honest: bytes, rows: int) -> bytes:
    """One 1024 x 1024 layer at full rank: k = 2^20 projected coordinates per sample."""
    offer = pb.Offer.FromString(honest)
    _layers(offer, [("net.0", 1024, 1024, 1024, 1024)])
    _refit(offer, 1 << 20, rows)
    return offer.SerializeToString()


def uint8_weights(honest: bytes, rows: int) -> bytes:
    """The honest model's tensors as uint8 (4x fewer bytes shipped than a float32 model would hold)."""
    offer = pb.Offer.FromString(honest)
    m = offer.model
    state = {k: torch.zeros_like(v, dtype=torch.uint8) for k, v in st_load(m.weights).items()}
    m.weights = st_save(state)
    m.fingerprint = fingerprint(m.architecture, m.config_json, m.weights)
    offer.session_id = uuid.uuid4().hex
    return offer.SerializeToString()


def big_context(honest: bytes, rows: int) -> bytes:
    """CKKS parameters N = 32768 with 15 primes (secure: 718 of 881 bits), the packing refitted to them."""
    offer = pb.Offer.FromString(honest)
    params = HEParams(32768, (60,) + (46,) * 13 + (60,), 46)
    _refit(offer, offer.packing.dim, rows, params)
    return offer.SerializeToString()


def fake_offer(session_id: str) -> bytes:
    """86 bytes: a rival's session id and nothing a seller could answer."""
    fake = pb.Offer(protocol_version=1, session_id=session_id, query_budget=1, max_samples=1,
                    grad_norm_bound=1.0, query_norm=1.0, task="x" * 26)
    return fake.SerializeToString()


BUILDERS = {
    "rank_f": rank_f,
    "many_layers": many_layers,
    "huge_dim": huge_dim,
    "uint8_weights": uint8_weights,
    "big_context": big_context,
}


# ---- the benchmark ---------------------------------------------------------------------------

def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(pid: int) -> None:
    """Reset the process's VmHWM to its current RSS (Linux clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _start_seller(root: Path, data: Path, certs: dict[str, Any]) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "tip_fed.cli", "seller", "serve", "--data", str(data), "--port", "0",
           "--tls-cert", str(certs["server"].cert), "--tls-key", str(certs["server"].key),
           "--tls-client-ca", str(certs["ca"].cert)]
    log = (root / "seller.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    match = re.search(r"ready on (127\.0\.0\.1:\d+) ", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"the seller did not start: {line!r}; see {root / 'seller.log'}")
    return proc, match.group(1)


def run(quick: bool) -> dict[str, Any]:
    """Peak seller RSS per hostile Offer, honest latency idle and under attack (one seller process)."""
    from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
    from tip_fed.core.tasks import get_task
    from tip_fed.grpc import ClientTLS, SellerEndpoint, value_sellers
    from tip_fed.protocol import Buyer, BuyerSettings
    from tip_fed.protocol.data import save_dataset
    from tip_fed.tls import create_ca, issue_cert

    n_rows, rounds, repeats = (60, 3, 2) if quick else (1000, 10, 5)
    torch.manual_seed(0)
    x = torch.randn(n_rows, 10)
    data = {"x": x, "y": (x[:, 0] > 0).long()}
    settings = BuyerSettings(projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="identity"),
                             protocol=ProtocolConfig(disclosure="aggregate"))
    model = MLP([10, 16, 2]).eval()

    def buyer() -> Buyer:
        return Buyer(model, get_task("classification"), objective=data, train=data, settings=settings)

    with tempfile.TemporaryDirectory(prefix="tip-fed-hostile-") as tmp:
        root = Path(tmp)
        ca = create_ca(root)
        certs = {"ca": ca, "server": issue_cert(ca, root, "seller")}
        tls = {who: ClientTLS(ca.cert, c.cert, c.key)
               for who in ("alice", "mallory") for c in [issue_cert(ca, root, who, client=True)]}
        proc, address = _start_seller(root, save_dataset(data, root / "seller.safetensors"), certs)
        endpoint = [SellerEndpoint("seller", address)]
        try:
            def honest() -> float:
                b = buyer()
                offer = b.offer(max_samples=n_rows)
                t0 = time.perf_counter()
                _, failures = value_sellers(endpoint, offer, tls=tls["alice"], timeout_s=600, retries=0)
                if failures:
                    raise RuntimeError(f"the honest buyer was refused: {failures}")
                return time.perf_counter() - t0

            honest()  # warm-up: the seller's first Offer builds its tables
            start_mb = _status_mb(proc.pid, "VmRSS:")
            _reset_peak(proc.pid)
            idle = [honest() for _ in range(rounds)]
            honest_peak = _status_mb(proc.pid, "VmHWM:")
            base = buyer().offer(max_samples=n_rows)
            offers = {name: build(base, n_rows + 1) for name, build in BUILDERS.items()}
            offers["fake_rival_session"] = fake_offer(pb.Offer.FromString(base).session_id)
            hostile: dict[str, Any] = {}
            for name, blob in offers.items():
                _reset_peak(proc.pid)
                refusals = [value_sellers(endpoint, blob, tls=tls["mallory"], timeout_s=600, retries=0)[1]
                            .get("seller", "answered") for _ in range(repeats)]
                hostile[name] = {
                    "offer_bytes": len(blob),
                    "peak_rss_mb": _status_mb(proc.pid, "VmHWM:"),
                    "rss_after_mb": _status_mb(proc.pid, "VmRSS:"),
                    "refusal": refusals[0].split(": ", 1)[-1][:200],
                    "all_refused": all(r != "answered" for r in refusals),
                }
            stop = threading.Event()
            sent = [0]

            def attack(blob: bytes) -> None:
                while not stop.is_set():
                    value_sellers(endpoint, blob, tls=tls["mallory"], timeout_s=600, retries=0)
                    sent[0] += 1

            threads = [threading.Thread(target=attack, args=(blob,), daemon=True) for blob in offers.values()]
            attacked = _under_attack(threads, stop, honest, rounds, proc.pid)
            attack_peak = _status_mb(proc.pid, "VmHWM:")
            flood = _valid_flood(endpoint, tls, honest, rounds, proc.pid, n_rows, settings, data,
                                 width=200_000 if quick else 1_000_000)
        finally:
            proc.terminate()
            proc.wait(30)
    return {
        "n_rows": n_rows,
        "seller_rss_start_mb": start_mb,
        "honest_peak_rss_mb": honest_peak,
        "hostile": hostile,
        "honest_latency_s": {"idle": idle, "under_attack": attacked},
        "honest_median_s_idle": statistics.median(idle),
        "honest_median_s_under_attack": statistics.median(attacked),
        "latency_ratio_under_attack": statistics.median(attacked) / statistics.median(idle),
        "attack_offers_sent": sent[0],
        "peak_rss_mb_under_attack": attack_peak,
        "max_hostile_peak_rss_mb": max(h["peak_rss_mb"] for h in hostile.values()),
        "valid_flood": flood,
    }


def _under_attack(threads: list[threading.Thread], stop: threading.Event, honest: Any, rounds: int,
                  pid: int) -> list[float]:
    """Honest latencies while ``threads`` attack (the seller's peak RSS reset first); stops them."""
    _reset_peak(pid)
    for t in threads:
        t.start()
    attacked = [honest() for _ in range(rounds)]
    stop.set()
    for t in threads:
        t.join(600)
    return attacked


def _valid_flood(endpoint: Any, tls: Any, honest: Any, rounds: int, pid: int, n_rows: int, settings: Any,
                 data: dict[str, torch.Tensor], *, width: int, callers: int = 6) -> dict[str, Any]:
    """One buyer's callers resend *valid* Offers of a wide MLP (the budget accepts each) while the
    honest buyer values the seller: what the per-buyer cap leaves of the stall."""
    from tip_fed.core.tasks import get_task
    from tip_fed.grpc import value_sellers
    from tip_fed.protocol import Buyer

    wide = Buyer(MLP([10, width, 2]).eval(), get_task("classification"), objective=data, train=data, settings=settings)
    pending = [wide.offer(max_samples=n_rows) for _ in range(callers + 4)]
    offer_bytes = len(pending[0])
    lock, stop = threading.Lock(), threading.Event()
    counts = {"answered": 0, "refused_max_offers_per_peer": 0, "other": 0}

    def attack() -> None:
        while not stop.is_set():
            with lock:
                if not pending:
                    return
                blob = pending.pop()
            failure = value_sellers(endpoint, blob, tls=tls["mallory"], timeout_s=600, retries=0)[1].get("seller")
            capped = failure is not None and "max-offers-per-peer" in failure
            with lock:
                counts["answered" if failure is None else "refused_max_offers_per_peer" if capped else "other"] += 1
                if capped:
                    pending.append(blob)  # keep the flood going

    threads = [threading.Thread(target=attack, daemon=True) for _ in range(callers)]
    attacked = _under_attack(threads, stop, honest, rounds, pid)
    return {"model": f"MLP([10, {width}, 2]) rank 4", "offer_bytes": offer_bytes, "callers": callers,
            "honest_latency_s": attacked, "honest_median_s": statistics.median(attacked),
            "peak_rss_mb": _status_mb(pid, "VmHWM:"), **counts}
