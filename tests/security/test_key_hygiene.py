"""The session secret key never leaves the buyer: not in any message, log line, output or file,
and it is destroyed at settlement (DESIGN §1.4, IND-CPA-D mitigation)."""

import base64
import contextlib
import logging
import os
from pathlib import Path

import pytest

from tip_fed.crypto import codec
from tip_fed.errors import CryptoError, SessionError
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.audit import Delivery
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.testing import buyer_session, secret_key_bytes
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

WINDOW = 48


def _forms(keys):
    """The key as bytes (serialised and raw coefficients), and text forms of windows of both."""
    blobs = [secret_key_bytes(keys), secret_key_bytes(keys, raw=True)]
    windows = [b[i : i + WINDOW] for b in blobs for i in (0, len(b) // 2, len(b) - WINDOW)]
    texts = [f(w) for w in windows for f in (lambda w: w.hex(), lambda w: base64.b64encode(w).decode(), repr)]
    return blobs, windows, texts


def _assert_absent(blobs, windows, data: bytes, where: str):
    for w in windows:
        assert w not in data, f"a {WINDOW}-byte window of the secret key appears in {where}"
    for b in blobs:
        assert b not in data


@pytest.fixture
def captured_temp_files(monkeypatch):
    """Every byte that passes through the codec's short-lived temp files during a session."""
    seen: list[bytes] = []
    real = codec._temp_path

    @contextlib.contextmanager
    def spy():
        with real() as path:
            yield path
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
                seen.append(fh.read())

    monkeypatch.setattr(codec, "_temp_path", spy)
    return seen


@pytest.mark.parametrize("disclosure", ["aggregate", "per-sample"])
def test_secret_key_absent_from_messages_logs_outputs_and_files(
    make_buyer, seller_data, disclosure, caplog, capfd, tmp_path, monkeypatch, captured_temp_files
):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    buyer = make_buyer(disclosure=disclosure, dp_epsilon=8.0)
    offer = buyer.offer(max_samples=100)
    keys = buyer_session(buyer).keys
    blobs, windows, texts = _forms(keys)
    assert len(blobs[0]) > 1000
    sellers = [Seller(s, d, policy=SellerPolicy(noise=NoisePolicy(4.0))) for s, d in seller_data.items()]
    replies = [s.respond(offer) for s in sellers]
    valuation = buyer.settle([*replies, b"garbage", replies[0]])  # error paths log/raise too
    assert len(valuation.sellers) == 3 and len(valuation.rejected) == 2
    record = buyer.record(valuation)
    record.save(tmp_path / "session.json")
    for s in sellers:
        s.deliver(valuation.session_id).save(tmp_path / f"{s.seller_id}.safetensors")

    for name, data in [("the offer", offer), *((f"reply {i}", r) for i, r in enumerate(replies))]:
        _assert_absent(blobs, windows, data, name)
    # inside the offer, every field that may carry key material is public
    ctx = codec.parse_context_proto(pb.Offer.FromString(offer).public_context, keys.params)
    assert not ctx.private_context.secret_key
    out, err = capfd.readouterr()
    lines = [r.getMessage() for r in caplog.records] + out.splitlines() + err.splitlines()
    lines += [str(reason) for reason in valuation.rejected.values()]
    for line in lines:
        assert not any(t in line for t in texts), f"key material in output line {line[:80]!r}"
    for i, data in enumerate(captured_temp_files):
        _assert_absent(blobs, windows, data, f"temp file {i}")
    assert captured_temp_files  # the spy saw the codec's traffic
    for path in Path(tmp_path).rglob("*"):
        if path.is_file():
            _assert_absent(blobs, windows, path.read_bytes(), str(path))
            assert not any(t.encode() in path.read_bytes() for t in texts)
    assert keys.destroyed


def test_key_is_destroyed_at_settle_even_when_settlement_fails(make_buyer, seller_data):
    buyer = make_buyer()
    buyer.offer(max_samples=100)
    keys = buyer_session(buyer).keys

    def exploding():
        yield b"not a reply"
        raise OSError("network went away")

    with pytest.raises(OSError):
        buyer.settle(exploding())
    assert keys.destroyed
    with pytest.raises(CryptoError, match="destroyed"):
        secret_key_bytes(keys)
    with pytest.raises(CryptoError, match="destroyed"):
        keys.decrypt_slots(b"x" * 64, "anything")
    with pytest.raises(SessionError, match="already settled"):
        buyer.settle([])


def test_every_session_has_a_fresh_key(make_buyer):
    buyer = make_buyer()
    fingerprints = set()
    for _ in range(3):
        buyer.offer(max_samples=10)
        fingerprints.add(buyer_session(buyer).keys.secret_key_fingerprint())
    assert len(fingerprints) == 3


def test_record_and_delivery_files_are_owner_only_and_atomic(make_buyer, seller_data, tmp_path):
    buyer = make_buyer()
    offer = buyer.offer(max_samples=100)
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True))
    valuation = buyer.settle([seller.respond(offer)])
    path = buyer.record(valuation).save(tmp_path / "r" / "session.json")
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    assert [p.name for p in path.parent.iterdir()] == ["session.json"]  # no temp file left behind
    delivery = seller.deliver(valuation.session_id)
    back = Delivery.load(delivery.save(tmp_path / "d.safetensors"))
    assert (back.gradients == delivery.gradients).all() and back.data.keys() == delivery.data.keys()


def test_secret_key_absent_from_grpc_runtime_logs(make_buyer, seller_data, caplog, capfd):
    """Over the gRPC runtime (which logs every request and refusal), at DEBUG, with an error path."""
    from tip_fed.grpc import SellerEndpoint, start_server, value_sellers

    caplog.set_level(logging.DEBUG)
    buyer = make_buyer(disclosure="per-sample")
    offer = buyer.offer(max_samples=100)
    keys = buyer_session(buyer).keys
    blobs, windows, texts = _forms(keys)
    running = start_server(Seller("s1", seller_data["s1"], policy=SellerPolicy(exact_per_sample=True)), insecure=True)
    try:
        endpoint = SellerEndpoint("s1", running.address)
        replies, failures = value_sellers([endpoint], offer, insecure=True, timeout_s=60, retries=0)
        _, refused = value_sellers([endpoint], offer, insecure=True, timeout_s=60, retries=0)  # budget spent
    finally:
        running.stop(0)
    assert failures == {} and "budget" in refused["s1"]
    valuation = buyer.settle(list(replies.values()))
    assert len(valuation.sellers) == 1
    out, err = capfd.readouterr()
    lines = [r.getMessage() for r in caplog.records] + out.splitlines() + err.splitlines() + list(refused.values())
    assert any("answered an offer" in line for line in lines)  # the service did log
    for line in lines:
        assert not any(t in line for t in texts), f"key material in log line {line[:80]!r}"
    for data in replies.values():
        _assert_absent(blobs, windows, data, "the gRPC reply")
