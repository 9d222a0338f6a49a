"""Hostile Offers that pass structural validation but would exhaust a long-lived seller.

Each builder starts from an honest buyer's Offer and changes what an attacker controls, keeping
the Offer well-formed (fingerprint recomputed, packing consistent with the new dimension, as many
query ciphertexts as the packing announces). :func:`run_in_child` answers Offers in a fresh Python
process and reports each outcome with the process's peak-RSS growth, so "refused before the
allocation" is checked on the real process, not inferred from time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from tip_fed.core.models import MLP
from tip_fed.crypto.params import HEParams, plan_packing
from tip_fed.protocol.convert import params_to_pb, plan_to_pb
from tip_fed.protocol.model import encode_model, fingerprint
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
    from safetensors.torch import load as st_load

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

_CHILD = r"""
import json, resource, sys, torch
from safetensors.torch import load_file
from tip_fed.errors import TipError
from tip_fed.config import SellerBudgetConfig
from tip_fed.protocol import Seller, SellerPolicy

data_path, budget, honest_path, *cases = sys.argv[1:]
seller = Seller("s", load_file(data_path), policy=SellerPolicy(budget=SellerBudgetConfig(**json.loads(budget))))
seller.respond(open(honest_path, "rb").read())  # warm-up: imports, tables, one honest answer
for path in cases:
    offer = open(path, "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        seller.respond(offer)
        out = {"error": None}
    except TipError as exc:
        out = {"error": type(exc).__name__, "message": str(exc), "limit": getattr(exc, "limit", None)}
    out["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps(out), flush=True)
"""


def run_in_child(tmp: Path, data_path: Path, honest: bytes, offers: dict[str, bytes],
                 budget: dict[str, object] | None = None) -> dict[str, dict]:
    """Answer ``offers`` one after another in a fresh process holding ``data_path`` (after one
    honest Offer, so imports and tables are already resident); outcome per name."""
    (tmp / "honest.offer").write_bytes(honest)
    paths = []
    for name, blob in offers.items():
        path = tmp / f"{name}.offer"
        path.write_bytes(blob)
        paths.append(str(path))
    args = [str(data_path), json.dumps(budget or {}), str(tmp / "honest.offer"), *paths]
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return dict(zip(offers, lines, strict=True))
