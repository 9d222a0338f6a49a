"""gRPC seller identity comes from the authenticated peer, not from what the reply says.

Real grpcio servers on 127.0.0.1 wrap real protocol Sellers; each honest seller's certificate
names its seller id. The attacker is a seller of the same market (it holds a certificate from
the same CA, for its own id) or a stranger with a CA-signed certificate for no seller at all: it
answers at an endpoint the buyer dials as ``digits-4``, or answers as ``digits-4`` where the buyer
dialed another seller. Every such answer is refused and never counted; the honest sellers of the
same round are valued.
"""

import pytest
import torch

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.models import MLP
from tip_fed.errors import SellerIdentityError, TipError
from tip_fed.grpc import ClientTLS, SellerEndpoint, ServerTLS, start_server, value_sellers, wait_until_healthy
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.tls import create_ca, issue_cert, seller_name
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import TASK, make_data

EXACT = SellerPolicy(exact_per_sample=True)  # the buyer below asks for per-sample scores without noise



def _buyer():
    torch.manual_seed(0)
    settings = BuyerSettings(projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="identity"),
                             protocol=ProtocolConfig(disclosure="aggregate"))
    return Buyer(MLP([10, 8, 2]).eval(), TASK, objective=make_data(20, 2, 0.5), train=make_data(40, 3),
                 settings=settings)


@pytest.fixture(scope="module")
def pki(pki):
    """The shared CA and client certificate, and server certificates naming (or not) a seller."""
    ca, d = pki["ca"], pki["dir"]
    return {
        **pki,
        "digits-1": issue_cert(ca, d, "seller-1", seller_id="digits-1"),
        "digits-4": issue_cert(ca, d, "seller-4", seller_id="digits-4"),
        "anonymous": issue_cert(ca, d, "anonymous"),  # valid for 127.0.0.1, names no seller
    }


def _server(seller, cert):
    return start_server(
        seller, tls=ServerTLS(cert.cert, cert.key), server_tls_only=True
    )  # identity of the seller is what is tested


def _tls(pki, bind=True):
    return ClientTLS(pki["ca"].cert, pki["client"].cert, pki["client"].key, bind_seller_id=bind)


def _value(endpoints, offer, tls):
    """``offer`` sent to every endpoint once over ``tls`` (30 s each, no retry): (replies, failures) by seller id."""
    return value_sellers(endpoints, offer, tls=tls, timeout_s=30, retries=0)


def test_a_seller_answering_for_another_sellers_id_is_refused(pki):
    # Prepare: honest digits-1; the rogue holds digits-1's certificate (a market member's own key)
    # but its service answers as digits-4; the genuine digits-4 also runs
    honest = _server(Seller("digits-1", make_data(8, 5), policy=EXACT), pki["digits-1"])
    rogue = _server(Seller("digits-4", make_data(8, 6, 1.0), policy=EXACT), pki["digits-1"])
    genuine = _server(Seller("digits-4", make_data(8, 7), policy=EXACT), pki["digits-4"])
    tls = _tls(pki)
    try:
        buyer = _buyer()
        offer = buyer.offer(max_samples=20)
        # Execute: the buyer's list says digits-1 at the honest address, digits-4 at the rogue's
        # (the rogue's own certificate is for digits-1, so it cannot pass the handshake as digits-4)
        replies, failures = _value(
            [SellerEndpoint("digits-1", honest.address), SellerEndpoint("digits-4", rogue.address)], offer, tls)
        # the rogue dialed as digits-1 (its certificate's id): handshake passes, its reply claims digits-4
        offer2 = buyer.offer(max_samples=20)
        replies2, failures2 = _value(
            [SellerEndpoint("digits-1", rogue.address), SellerEndpoint("digits-4", genuine.address)], offer2, tls)
        with pytest.raises(SellerIdentityError, match="answered as 'digits-4'"):
            wait_until_healthy(SellerEndpoint("digits-1", rogue.address), tls=tls, timeout_s=10)
    finally:
        for s in (honest, rogue, genuine):
            s.stop(0)
    # Assert: the handshake refused the rogue at digits-4's endpoint; digits-1 was valued
    assert list(replies) == ["digits-1"] and list(failures) == ["digits-4"]
    assert "UNAVAILABLE" in failures["digits-4"]
    first = pb.Offer.FromString(offer).session_id
    valuation = buyer.settle(list(replies.values()), session_id=first, expected=["digits-1", "digits-4"])
    assert [v.seller_id for v in valuation.sellers] == ["digits-1"] and valuation.missing == ["digits-4"]
    # a reply claiming another id is refused, not counted; the genuine digits-4 is valued
    assert list(replies2) == ["digits-4"] and list(failures2) == ["digits-1"]
    assert "answered as 'digits-4'" in failures2["digits-1"]
    second = pb.Offer.FromString(offer2).session_id
    valuation2 = buyer.settle(list(replies2.values()), session_id=second, expected=["digits-1", "digits-4"])
    assert [v.seller_id for v in valuation2.sellers] == ["digits-4"] and valuation2.rejected == {}


def test_a_certificate_that_names_no_seller_is_refused_when_ids_are_bound(pki):
    # Prepare: a stranger with a CA-signed certificate for the address only, answering as digits-4
    stranger = _server(Seller("digits-4", make_data(8, 6), policy=EXACT), pki["anonymous"])
    endpoint = SellerEndpoint("digits-4", stranger.address)
    try:
        offer = _buyer().offer(max_samples=20)
        # Execute: bound (the runtime's default) and unbound (address-only TLS)
        bound = _value([endpoint], offer, _tls(pki))
        unbound = _value([endpoint], offer, _tls(pki, bind=False))
        with pytest.raises(TipError, match="UNAVAILABLE"):
            wait_until_healthy(endpoint, tls=_tls(pki), timeout_s=1)
    finally:
        stranger.stop(0)
    # Assert: bound, no reply; unbound TLS checks only the address, which the stranger's certificate covers
    assert bound[0] == {} and "UNAVAILABLE" in bound[1]["digits-4"]
    assert list(unbound[0]) == ["digits-4"]


def test_seller_names_are_dns_names_and_never_collide():
    assert seller_name("digits-4") == "digits-4" and seller_name("hospital-07") == "hospital-07"
    odd = [seller_name(s) for s in ("Digits-4", "digits_4", "digits 4", "é")]
    assert len(set(odd)) == 4 and all(n.startswith("id-") and len(n) <= 63 for n in odd)
    assert "digits-4" not in odd


def test_with_one_ca_per_seller_each_endpoint_trusts_only_its_sellers_ca(tmp_path):
    # Prepare: each seller runs its own CA (the README's remote setup); the rogue's CA mints a
    # certificate for digits-4, the genuine digits-4's CA its own
    rogue_ca, genuine_ca = create_ca(tmp_path / "rogue"), create_ca(tmp_path / "genuine")
    buyer_ca = create_ca(tmp_path / "buyer")
    client = issue_cert(buyer_ca, tmp_path / "buyer", "buyer", client=True)
    forged = issue_cert(rogue_ca, tmp_path / "rogue", "forged", seller_id="digits-4")
    bundle = tmp_path / "sellers-ca.crt"
    bundle.write_bytes(rogue_ca.cert.read_bytes() + genuine_ca.cert.read_bytes())
    rogue = _server(Seller("digits-4", make_data(8, 6, 1.0), policy=EXACT), forged)
    try:
        tls = ClientTLS(bundle, client.cert, client.key, bind_seller_id=True)
        offer = _buyer().offer(max_samples=20)
        # Execute: the same rogue address, trusted through the bundle, then through digits-4's own CA
        bundled = _value([SellerEndpoint("digits-4", rogue.address)], offer, tls)
        pinned = _value([SellerEndpoint("digits-4", rogue.address, root_ca=genuine_ca.cert)], offer, tls)
    finally:
        rogue.stop(0)
    # Assert: a bundle of seller CAs lets any of them vouch for any id; a pinned CA does not
    assert list(bundled[0]) == ["digits-4"]
    assert pinned[0] == {} and "UNAVAILABLE" in pinned[1]["digits-4"]
