"""The native gRPC seller service and buyer client, in one process over real sockets on 127.0.0.1.

A real grpcio server wraps a real protocol Seller; the buyer's client reaches it insecurely, over
TLS and over mutual TLS. Decrypted scores are checked against plaintext, every refusal against
its gRPC status code and message, and failures must come back as reasons, never as exceptions.
"""

import socket

import grpc
import numpy as np
import pytest
import torch

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.errors import (
    BudgetExceededError,
    CodecError,
    ConfigError,
    DataError,
    FingerprintMismatchError,
    InsecureParametersError,
    ProtocolError,
    SessionError,
    VersionMismatchError,
)
from tip_fed.grpc import ClientTLS, SellerEndpoint, ServerTLS, start_server, value_sellers, wait_until_healthy
from tip_fed.grpc.server import SERVICE_NAME, MiB, status_for
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.tls import create_ca, issue_cert
from tip_fed.wire.tip.v1 import valuation_pb2 as pb
from tip_fed.wire.tip.v1 import valuation_pb2_grpc as rpc

TASK = get_task("classification")


def _data(n, seed, shift=0.0, features=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g) + shift
    return {"x": x, "y": (x[:, 0] > shift).long()}


def _buyer(model, features=10):
    settings = BuyerSettings(
        projection=ProjectionConfig(rank=4),
        preconditioner=PreconditionerConfig(kind="identity"),
        protocol=ProtocolConfig(disclosure="per-sample"),
    )
    return Buyer(
        model, TASK, objective=_data(20, 2, 0.5, features), train=_data(40, 3, 0.0, features), settings=settings
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLP([10, 8, 2]).eval()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = create_ca(d)
    return {"ca": ca, "server": issue_cert(ca, d, "seller"), "client": issue_cert(ca, d, "buyer", client=True)}


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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(buyer, model, data):
    g = projected_grads(model, buyer.spec, TASK, data).double()
    return (clip_rows(g, buyer.grad_norm_bound)[0] @ buyer.query).numpy()


@pytest.mark.parametrize("mode", ["insecure", "tls", "mtls"])
def test_buyer_values_a_seller_service(model, pki, mode):
    data = _data(12, 7, 0.3)
    running, client_tls = _serve(Seller("clinic-a", data, policy=SellerPolicy(exact_per_sample=True)), pki, mode)
    try:
        endpoint = SellerEndpoint("clinic-a", running.address)
        health = wait_until_healthy(endpoint, tls=client_tls, insecure=client_tls is None, timeout_s=10)
        assert (health.seller_id, health.n_samples, running.security) == ("clinic-a", 12, mode)
        buyer = _buyer(model)
        replies, failures = value_sellers(
            [endpoint], buyer.offer(max_samples=50), tls=client_tls, insecure=client_tls is None, timeout_s=30
        )
    finally:
        running.stop(0)
    assert failures == {} and list(replies) == ["clinic-a"]
    valuation = buyer.settle(list(replies.values()), expected=["clinic-a"])
    assert valuation.missing == [] and valuation.rejected == {}
    plain = _plain(buyer, model, data)
    v = valuation.sellers[0]
    assert np.max(np.abs(v.per_sample - plain)) <= 1e-5 * np.abs(plain).max()
    assert abs(v.total - plain.sum()) <= 1e-5 * np.abs(plain).sum()


def test_tls_is_required_unless_insecure_is_explicit(model):
    with pytest.raises(ConfigError, match="needs TLS"):
        start_server(Seller("s", _data(3, 1), policy=SellerPolicy(exact_per_sample=True)))
    with pytest.raises(ConfigError, match="needs TLS"):
        value_sellers([SellerEndpoint("s", "127.0.0.1:1")], b"")


def test_wrong_credentials_are_reported_not_raised(model, pki):
    running, _ = _serve(Seller("s", _data(4, 1), policy=SellerPolicy(exact_per_sample=True)), pki, "mtls")
    try:
        offer = _buyer(model).offer(max_samples=10)
        endpoint = [SellerEndpoint("s", running.address)]
        no_client_cert = value_sellers(endpoint, offer, tls=ClientTLS(pki["ca"].cert), timeout_s=5, retries=0)
        plaintext = value_sellers(endpoint, offer, insecure=True, timeout_s=5, retries=0)
    finally:
        running.stop(0)
    for replies, failures in (no_client_cert, plaintext):
        assert replies == {} and failures["s"].startswith(f"{running.address}: UNAVAILABLE")


def test_refusals_map_to_status_codes_with_the_sellers_message(model, pki):
    running, _ = _serve(Seller("s", _data(4, 1), policy=SellerPolicy(exact_per_sample=True)), pki, "insecure")
    endpoint = [SellerEndpoint("s", running.address)]
    try:
        buyer = _buyer(model)
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


def test_a_panic_inside_the_seller_is_logged_and_answered_internal(model, monkeypatch, caplog):
    """A BaseException that is no Exception (a Rust panic) must end the call with INTERNAL and a log
    line, not leave it open until the buyer's deadline; the service keeps answering afterwards."""
    panic = _rust_panic()
    assert not isinstance(panic, Exception)
    seller = Seller("s", _data(4, 1), policy=SellerPolicy(exact_per_sample=True))

    def respond(*_args, **_kwargs):
        raise panic

    monkeypatch.setattr(seller, "respond", respond)
    running, _ = _serve(seller, None, "insecure")
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = rpc.SellerStub(channel)
            with pytest.raises(grpc.RpcError) as failed:
                stub.Value(pb.ValueRequest(offer=pb.Offer.FromString(_buyer(model).offer(max_samples=10))), timeout=60)
            assert stub.Health(pb.HealthRequest(), timeout=10).seller_id == "s"
    finally:
        running.stop(0)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "seller s failed internally; see its log"
    assert "internal error while answering an offer" in caplog.text and "retry-limit" in caplog.text


@pytest.mark.parametrize(
    "error, code",
    [
        (ProtocolError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (CodecError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (DataError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (BudgetExceededError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (FingerprintMismatchError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (VersionMismatchError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (InsecureParametersError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (SessionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_every_error_kind_has_a_status_code(error, code):
    assert status_for(error) == code


def test_down_and_hung_sellers_are_reported_and_the_others_are_valued(model, pki):
    running, client_tls = _serve(Seller("up", _data(6, 4), policy=SellerPolicy(exact_per_sample=True)), pki, "tls")
    dead = f"127.0.0.1:{_free_port()}"
    hung = socket.create_server(("127.0.0.1", 0))  # the kernel accepts connections; nobody ever answers
    hung_address = f"127.0.0.1:{hung.getsockname()[1]}"
    endpoints = [
        SellerEndpoint("up", running.address),
        SellerEndpoint("down", dead),
        SellerEndpoint("hung", hung_address),
    ]
    try:
        buyer = _buyer(model)
        calls = []
        replies, failures = value_sellers(
            endpoints,
            buyer.offer(max_samples=10),
            tls=client_tls,
            timeout_s=2,
            retries=2,
            backoff_s=0.05,
            before_call=lambda e: calls.append(e.name),
        )
    finally:
        running.stop(0)
        hung.close()
    assert sorted(calls) == ["down", "hung", "up"]
    assert list(replies) == ["up"] and list(failures) == ["down", "hung"]
    assert failures["down"].startswith(f"{dead} after 3 attempts: UNAVAILABLE")
    assert failures["hung"].startswith(f"{hung_address}: DEADLINE_EXCEEDED")  # not retried: one deadline, no more
    valuation = buyer.settle(list(replies.values()), expected=["up", "down", "hung"])
    assert [v.seller_id for v in valuation.sellers] == ["up"] and valuation.missing == ["down", "hung"]


def test_offers_above_grpcs_4_mib_default_pass(pki):
    torch.manual_seed(1)
    big = MLP([10, 1200, 1024, 2]).eval()  # ~5 MB of float32 weights travel in every Offer
    buyer = _buyer(big)
    data = _data(5, 9)
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
    plain = _plain(buyer, big, data)
    assert abs(v.total - plain.sum()) <= 1e-5 * np.abs(plain).sum()


def test_a_taken_port_is_refused_not_shared(pki):
    first = start_server(Seller("a", _data(3, 1), policy=SellerPolicy(exact_per_sample=True)), insecure=True)
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            start_server(
                Seller("b", _data(3, 2), policy=SellerPolicy(exact_per_sample=True)), insecure=True, port=first.port
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
    from tip_fed.cli import main
    from tip_fed.protocol.data import save_dataset

    data = save_dataset(_data(3, 1), tmp_path / "s1.safetensors")
    assert main(["seller", "serve", "--data", str(data), "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tip-fed: error: ") and message in err and err.count("\n") == 1


def test_tls_init_reuses_its_ca_and_keeps_keys_private(tmp_path, capsys):
    from tip_fed.cli import main

    assert main(["tls", "init", str(tmp_path), "--host", "10.0.0.5", "--host", "seller-a.example"]) == 0
    ca = (tmp_path / "ca.crt").read_bytes()
    assert main(["tls", "init", str(tmp_path), "--server-name", "seller-b"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca and (tmp_path / "seller-b.crt").is_file()
    assert "created CA" in capsys.readouterr().out.split("server certificate")[0]
    for key in ("ca.key", "seller.key", "seller-b.key", "buyer.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600
