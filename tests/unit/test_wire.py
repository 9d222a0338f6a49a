"""The generated protobuf code is up to date with protos/ and round-trips messages."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from tip_fed.wire.tip.v1 import valuation_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed")
def test_generated_code_matches_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    committed = ROOT / "tip_fed" / "wire"
    for fresh in tmp_path.rglob("*_pb2*.py*"):
        rel = fresh.relative_to(tmp_path)
        assert (committed / rel).read_text() == fresh.read_text(), f"{rel} is stale: run python protos/generate.py"


def test_offer_round_trip():
    offer = pb.Offer(protocol_version=1, session_id="ab" * 16, query=[b"\x01\x02", b"\x03"], grad_norm_bound=2.5,
                     disclosure=pb.DISCLOSURE_PER_SAMPLE)
    back = pb.Offer.FromString(offer.SerializeToString())
    assert back == offer
    assert list(back.query) == [b"\x01\x02", b"\x03"]
