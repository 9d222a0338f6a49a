"""The native gRPC seller service and buyer client, in one process over real sockets on 127.0.0.1.

A real grpcio server wraps a real protocol Seller; the buyer's client reaches it insecurely, over
TLS and over mutual TLS. Decrypted scores are checked against plaintext, every refusal against
its gRPC status code and message, and failures must come back as reasons, never as exceptions.
"""

import socket
import threading

import grpc
import numpy as np
import pytest
import torch

from tip_fed.config import SellerBudgetConfig
from tip_fed.core.models import MLP
from tip_fed.errors import (
    CodecError,
    ConfigError,
    DataError,
    FingerprintMismatchError,
    InsecureParametersError,
    ModelNotHeldError,
    TipError,
)
from tip_fed.grpc import ClientTLS, SellerEndpoint, ServerTLS, start_server, value_sellers, wait_until_healthy
from tip_fed.grpc.server import SERVICE_NAME, MiB
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.model import encode_model
from tip_fed.protocol.resources import ResourceLimitError
from tip_fed.wire.tip.v1 import valuation_pb2 as pb
from tip_fed.wire.tip.v1 import valuation_pb2_grpc as rpc

from ..conftest import free_port, make_data, plaintext_scores, seller_serve_error

SECURITY = {
    "insecure": (lambda p: None, lambda p: None),
    "tls": (lambda p: ServerTLS(p["server"].cert, p["server"].key), lambda p: ClientTLS(p["ca"].cert)),
    "mtls": (
        lambda p: ServerTLS(p["server"].cert, p["server"].key, client_ca=p["ca"].cert),
        lambda p: ClientTLS(p["ca"].cert, p["client"].cert, p["client"].key),
    ),
}


def _serve(seller, pki, mode, **kw):
    server_tls = SECURITY[mode][0](pki)
    running = start_server(seller, tls=server_tls, insecure=server_tls is None, server_tls_only=mode == "tls", **kw)
    return running, SECURITY[mode][1](pki)


@pytest.mark.parametrize("mode", ["insecure", "tls", "mtls"])
def test_buyer_values_a_seller_service(model, make_buyer, pki, mode):
    data = make_data(12, 7, 0.3)
    running, client_tls = _serve(Seller("clinic-a", data, policy=SellerPolicy(exact_per_sample=True)), pki, mode)
    try:
        endpoint = SellerEndpoint("clinic-a", running.address)
        health = wait_until_healthy(endpoint, tls=client_tls, insecure=client_tls is None, timeout_s=10)
        assert (health.seller_id, health.n_samples, running.security) == ("clinic-a", 12, mode)
        buyer = make_buyer()
        replies, failures = value_sellers(
            [endpoint], buyer.offer(max_samples=50), tls=client_tls, insecure=client_tls is None, timeout_s=30
        )
    finally:
        running.stop(0)
    assert failures == {} and list(replies) == ["clinic-a"]
    valuation = buyer.settle(list(replies.values()), expected=["clinic-a"])
    assert valuation.missing == [] and valuation.rejected == {}
    plain = plaintext_scores(buyer, model, data)
    v = valuation.sellers[0]
    assert np.max(np.abs(v.per_sample - plain)) <= 1e-5 * np.abs(plain).max()
    assert abs(v.total - plain.sum()) <= 1e-5 * np.abs(plain).sum()


def test_tls_is_required_unless_insecure_is_explicit():
    with pytest.raises(ConfigError, match="needs TLS"):
        start_server(Seller("s", make_data(3, 1), policy=SellerPolicy(exact_per_sample=True)))
    with pytest.raises(ConfigError, match="needs TLS"):
        value_sellers([SellerEndpoint("s", "127.0.0.1:1")], b"")


def test_wrong_credentials_are_reported_not_raised(make_buyer, pki):
    running, _ = _serve(Seller("s", make_data(4, 1), policy=SellerPolicy(exact_per_sample=True)), pki, "mtls")
    try:
        offer = make_buyer().offer(max_samples=10)
        endpoint = [SellerEndpoint("s", running.address)]
        no_client_cert = value_sellers(endpoint, offer, tls=ClientTLS(pki["ca"].cert), timeout_s=5, retries=0)
        plaintext = value_sellers(endpoint, offer, insecure=True, timeout_s=5, retries=0)
    finally:
        running.stop(0)
    for replies, failures in (no_client_cert, plaintext):
        assert replies == {} and failures["s"].startswith(f"{running.address}: UNAVAILABLE")


def test_refusals_map_to_status_codes_with_the_sellers_message(make_buyer, pki):
    running, _ = _serve(Seller("s", make_data(4, 1), policy=SellerPolicy(exact_per_sample=True)), pki, "insecure")
    endpoint = [SellerEndpoint("s", running.address)]
    try:
        buyer = make_buyer()
        offer = buyer.offer(max_samples=10)
        first = value_sellers(endpoint, offer, insecure=True, timeout_s=30)
        again = value_sellers(endpoint, offer, insecure=True, timeout_s=30, retries=3)
        newer = pb.Offer.FromString(offer)
        newer.protocol_version = 2
        version = value_sellers(endpoint, newer.SerializeToString(), insecure=True, timeout_s=30)
        bad_session = value_sellers(
            endpoint, pb.Offer(protocol_version=1, session_id="zz").SerializeToString(), insecure=True, timeout_s=30
        )
        with grpc.insecure_channel(running.address) as channel:
            raw = channel.unary_unary(f"/{SERVICE_NAME}/Value")
            with pytest.raises(grpc.RpcError) as garbage:
                raw(b"\xff\xfe not protobuf", timeout=10)
    finally:
        running.stop(0)
    assert list(first[0]) == ["s"]
    assert again[1]["s"].startswith(f"{running.address}: RESOURCE_EXHAUSTED: seller s already answered 1 query")
    assert version[1]["s"].startswith(f"{running.address}: FAILED_PRECONDITION: the offer speaks protocol version 2")
    assert "INVALID_ARGUMENT: the offer has malformed session id 'zz'" in bad_session[1]["s"]
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert garbage.value.details().startswith("the request is not a valid tip.v1 ValueRequest")
    assert "Traceback" not in garbage.value.details()



def _rust_panic() -> BaseException:
    """A real ``pyo3_runtime.PanicException`` of the tokenizers library (a regex past its retry limit)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(\w+\s?)+\d$"), behavior="isolated")
    try:
        tok.encode(" ".join(["word"] * 30) + " !")
    except BaseException as exc:  # the panic is what this helper is for
        return exc
    raise AssertionError("the tokenizers library no longer panics on a backtracking regex")


def test_a_panic_inside_the_seller_is_logged_and_answered_internal(make_buyer, monkeypatch, caplog):
    """A BaseException that is no Exception (a Rust panic) must end the call with INTERNAL and a log
    line, not leave it open until the buyer's deadline; the service keeps answering afterwards."""
    panic = _rust_panic()
    assert not isinstance(panic, Exception)
    seller = Seller("s", make_data(4, 1), policy=SellerPolicy(exact_per_sample=True))

    def respond(*_args, **_kwargs):
        raise panic

    monkeypatch.setattr(seller, "respond", respond)
    running, _ = _serve(seller, None, "insecure")
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rpc.SellerStub(channel)
            with pytest.raises(grpc.RpcError) as failed:
                stub.Value(pb.ValueRequest(offer=pb.Offer.FromString(make_buyer().offer(max_samples=10))), timeout=60)
            assert stub.Health(pb.HealthRequest(), timeout=10).seller_id == "s"
    finally:
        running.stop(0)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "seller s failed internally; see its log"
    assert "internal error while answering an offer" in caplog.text and "retry-limit" in caplog.text


def _damaged_query(offer):
    offer.query[0] = b"\x00" * len(offer.query[0])


def _unknown_weights(offer):
    offer.model.weights = offer.model.weights[:-4] + b"\x00\x01\x02\x03"


def _weak_keys(offer):
    offer.he.coeff_mod_bit_sizes[:] = [60] * 8  # 480 bits at N=8192: far below 128-bit security


def _seven_features(offer):
    """A consistent, fingerprinted model for 7 input features, sent to a seller holding 10."""
    offer.model.CopyFrom(encode_model(MLP([7, 16, 2])))
    offer.projection.layers[0].in_features = 7


def _by_reference(offer):
    offer.model.ClearField("weights")  # a model this seller was never sent


#: (how a real buyer's Offer is damaged, what the seller raises, what a gRPC client must see, the
#: seller's resource budget)
REFUSALS = {
    "damaged ciphertext": (_damaged_query, CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    "weights unlike their fingerprint": (_unknown_weights, FingerprintMismatchError,
                                         grpc.StatusCode.FAILED_PRECONDITION),
    "insecure CKKS parameters": (_weak_keys, InsecureParametersError, grpc.StatusCode.FAILED_PRECONDITION),
    "records that do not fit the model": (_seven_features, DataError, grpc.StatusCode.INVALID_ARGUMENT),
    "a model the seller does not hold": (_by_reference, ModelNotHeldError, grpc.StatusCode.FAILED_PRECONDITION),
    "an honest offer above the seller's budget": (lambda offer: None, ResourceLimitError,
                                                  grpc.StatusCode.RESOURCE_EXHAUSTED, {"offer_work_s": 1e-6}),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_kind_of_refusal_reaches_a_grpc_client_as_its_status(make_buyer, case):
    """A real Offer damaged one way: the seller raises one TipError kind, and a client calling the
    real service sees that kind's status code with the seller's own message, and no traceback."""
    damage, kind, code, *budget = REFUSALS[case]
    offer = pb.Offer.FromString(make_buyer().offer(max_samples=10))
    damage(offer)
    blob = offer.SerializeToString()
    policy = SellerPolicy(exact_per_sample=True, budget=SellerBudgetConfig(**(budget[0] if budget else {})))
    with pytest.raises(TipError) as raised:
        Seller("s", make_data(4, 1), policy=policy).respond(blob)
    assert type(raised.value) is kind, raised.value
    running = start_server(Seller("s", make_data(4, 1), policy=policy), insecure=True)
    try:
        with grpc.insecure_channel(running.address) as channel, pytest.raises(grpc.RpcError) as refused:
            rpc.SellerStub(channel).Value(pb.ValueRequest(offer=offer), timeout=60)
    finally:
        running.stop(0)
    assert refused.value.code() == code
    assert refused.value.details() == str(raised.value)[:4000]


def test_down_and_hung_sellers_are_reported_and_the_others_are_valued(make_buyer, pki):
    running, client_tls = _serve(Seller("up", make_data(6, 4), policy=SellerPolicy(exact_per_sample=True)), pki, "tls")
    dead = f"127.0.0.1:{free_port()}"
    hung = socket.create_server(("127.0.0.1", 0))  # the kernel accepts connections; nobody ever answers
    hung_address = f"127.0.0.1:{hung.getsockname()[1]}"
    endpoints = [
        SellerEndpoint("up", running.address),
        SellerEndpoint("down", dead),
        SellerEndpoint("hung", hung_address),
    ]
    try:
        buyer = make_buyer()
        calls, answered = [], []
        replies, failures = value_sellers(
            endpoints,
            buyer.offer(max_samples=10),
            tls=client_tls,
            timeout_s=2,
            retries=2,
            backoff_s=0.05,
            before_call=lambda e: calls.append(e.name),
            on_answer=lambda name: answered.append((name, threading.current_thread() is threading.main_thread())),
        )
    finally:
        running.stop(0)
        hung.close()
    assert sorted(calls) == ["down", "hung", "up"]
    # every call that ended is counted once, answered or failed, in the caller's thread (progress counting)
    assert sorted(answered) == [("down", True), ("hung", True), ("up", True)]
    assert list(replies) == ["up"] and list(failures) == ["down", "hung"]
    assert failures["down"].startswith(f"{dead} after 3 attempts: UNAVAILABLE")
    assert failures["hung"].startswith(f"{hung_address}: DEADLINE_EXCEEDED")  # not retried: one deadline, no more
    valuation = buyer.settle(list(replies.values()), expected=["up", "down", "hung"])
    assert [v.seller_id for v in valuation.sellers] == ["up"] and valuation.missing == ["down", "hung"]


def test_offers_above_grpcs_4_mib_default_pass(make_buyer, pki):
    torch.manual_seed(1)
    big = MLP([10, 1200, 1024, 2]).eval()  # ~5 MB of float32 weights travel in every Offer
    buyer = make_buyer(over=big)
    data = make_data(5, 9)
    offer = buyer.offer(max_samples=10)
    assert len(offer) > 4 * MiB
    running, client_tls = _serve(Seller("s", data, policy=SellerPolicy(exact_per_sample=True)), pki, "tls")
    small, _ = _serve(
        Seller("s", data, policy=SellerPolicy(exact_per_sample=True)), pki, "tls", max_message_bytes=4 * MiB
    )
    try:
        replies, failures = value_sellers([SellerEndpoint("s", running.address)], offer, tls=client_tls, timeout_s=60)
        _, refused = value_sellers([SellerEndpoint("s", small.address)], offer, tls=client_tls, timeout_s=60)
    finally:
        running.stop(0)
        small.stop(0)
    assert failures == {}
    assert refused["s"].startswith(f"{small.address}: RESOURCE_EXHAUSTED")
    v = buyer.settle(list(replies.values()), expected=["s"]).sellers[0]
    plain = plaintext_scores(buyer, big, data)
    assert abs(v.total - plain.sum()) <= 1e-5 * np.abs(plain).sum()


def test_a_taken_port_is_refused_not_shared(pki):
    first = start_server(Seller("a", make_data(3, 1), policy=SellerPolicy(exact_per_sample=True)), insecure=True)
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            start_server(
                Seller("b", make_data(3, 2), policy=SellerPolicy(exact_per_sample=True)), insecure=True, port=first.port
            )
    finally:
        first.stop(0)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "a seller service needs TLS"),
        (["--tls-cert", "x.crt"], "--tls-cert and --tls-key go together"),
        (["--insecure", "--tls-client-ca", "ca.crt"], "--tls-client-ca needs --tls-cert"),
        (
            ["--tls-cert", "missing.crt", "--tls-key", "missing.key", "--tls-client-ca", "ca.crt"],
            "cannot read --tls-key file missing.key",
        ),
        (["--tls-cert", "s.crt", "--tls-key", "s.key"], "requires client certificates by default (mutual TLS)"),
        (["--tls-cert", "s.crt", "--tls-key", "s.key"], "'tip-fed tls init"),
        (["--insecure", "--server-tls-only"], "--server-tls-only needs --tls-cert"),
        (["--insecure", "--max-queries-per-session", "0"], "--max-queries-per-session must be >= 1"),
    ],
)
def test_seller_serve_user_errors_are_one_line(tmp_path, capsys, args, message):
    from tip_fed.protocol.data import save_dataset

    data = save_dataset(make_data(3, 1), tmp_path / "s1.safetensors")
    assert message in seller_serve_error(capsys, "--data", str(data), *args)


def test_tls_init_reuses_its_ca_and_keeps_keys_private(tmp_path, capsys):
    from tip_fed.cli import main

    assert main(["tls", "init", str(tmp_path), "--host", "10.0.0.5", "--host", "seller-a.example"]) == 0
    ca = (tmp_path / "ca.crt").read_bytes()
    assert main(["tls", "init", str(tmp_path), "--server-name", "seller-b"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca and (tmp_path / "seller-b.crt").is_file()
    assert "created CA" in capsys.readouterr().out.split("server certificate")[0]
    for key in ("ca.key", "seller.key", "seller-b.key", "buyer.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600
