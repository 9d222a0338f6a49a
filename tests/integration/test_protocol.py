"""Buyer and sellers in one process, exchanging real protobuf bytes and real CKKS ciphertexts.

Every decrypted number is checked against a plaintext computation done here from both parties'
data; every refusal is checked for its specific TipError.
"""

import numpy as np
import pytest

from tip_fed.config import CryptoConfig, PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.errors import (
    BudgetExceededError,
    FingerprintMismatchError,
    InsecureParametersError,
    ProtocolError,
    SessionError,
    VersionMismatchError,
)
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.testing import buyer_session, secret_key_bytes
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import TASK, make_data, plaintext_scores


def _buyer(model, disclosure="per-sample", **kw):
    settings = BuyerSettings(
        projection=ProjectionConfig(rank=4),
        preconditioner=PreconditionerConfig(kind=kw.pop("kind", "kfac")),
        protocol=ProtocolConfig(disclosure=disclosure, query_budget=kw.pop("budget", 1)),
        **kw,
    )
    return Buyer(model, TASK, objective=make_data(40, 2, shift=0.5), train=make_data(120, 3), settings=settings)


@pytest.fixture(scope="module")
def sellers(seller_data):
    return seller_data


@pytest.mark.parametrize("kind", ["identity", "kfac"])
def test_per_sample_and_totals_match_plaintext(model, sellers, kind):
    buyer = _buyer(model, kind=kind)
    offer = buyer.offer(max_samples=100)
    replies = [
        Seller(sid, d, seed=1, policy=SellerPolicy(exact_per_sample=True)).respond(offer) for sid, d in sellers.items()
    ]
    valuation = buyer.settle(replies, expected=[*list(sellers), "ghost"])
    assert valuation.missing == ["ghost"] and valuation.rejected == {}
    for v in valuation.sellers:
        plain = plaintext_scores(buyer, model, sellers[v.seller_id])
        tol = 1e-6 * buyer.query_norm * buyer.grad_norm_bound  # CKKS + sanitising noise: 1e-6 of the score bound
        assert v.n_samples == len(plain)
        assert np.max(np.abs(v.per_sample - plain)) <= tol
        assert abs(v.total - plain.sum()) <= len(plain) * tol
        assert abs(v.total - v.per_sample.sum()) <= len(plain) * tol


def test_aggregate_disclosure_reveals_one_number(model, sellers):
    buyer = _buyer(model, disclosure="aggregate")
    offer = buyer.offer(max_samples=100)
    reply = Seller("s1", sellers["s1"], policy=SellerPolicy(exact_per_sample=True)).respond(offer)
    assert pb.Reply.FromString(reply).n_rows == 1
    v = buyer.settle([reply]).sellers[0]
    plain = plaintext_scores(buyer, model, sellers["s1"])
    assert v.per_sample is None
    assert abs(v.total - plain.sum()) <= len(plain) * 1e-6 * buyer.query_norm * buyer.grad_norm_bound


def test_secret_key_never_leaves_the_buyer(model, sellers):
    buyer = _buyer(model)
    offer = buyer.offer(max_samples=100)
    session = buyer_session(buyer)
    secret = secret_key_bytes(session.keys)
    reply = Seller("s0", sellers["s0"], policy=SellerPolicy(exact_per_sample=True)).respond(offer)
    assert len(secret) > 1000
    for outgoing in (offer, reply):
        assert secret not in outgoing
        assert secret[100:164] not in outgoing  # not even a 64-byte window of it


def test_settle_destroys_the_key_and_refuses_a_second_settlement(model, sellers):
    buyer = _buyer(model)
    offer = buyer.offer(max_samples=100)
    reply = Seller("s0", sellers["s0"], policy=SellerPolicy(exact_per_sample=True)).respond(offer)
    buyer.settle([reply])
    assert buyer_session(buyer).keys.destroyed
    with pytest.raises(SessionError, match="already settled"):
        buyer.settle([reply])


def test_bad_replies_are_rejected_with_reasons_and_the_rest_still_valued(model, sellers):
    buyer = _buyer(model)
    other = _buyer(model)
    offer = buyer.offer(max_samples=100)
    good = Seller("s1", sellers["s1"], policy=SellerPolicy(exact_per_sample=True)).respond(offer)
    foreign = Seller("s2", sellers["s2"], policy=SellerPolicy(exact_per_sample=True)).respond(
        other.offer(max_samples=100)
    )
    wrong_rows = pb.Reply.FromString(good)
    wrong_rows.seller_id, wrong_rows.n_rows = "liar", 3
    valuation = buyer.settle([good, b"\x00garbage", foreign, good, wrong_rows.SerializeToString()])
    assert [v.seller_id for v in valuation.sellers] == ["s1"]
    reasons = valuation.rejected
    assert "not a valid tip.v1 protobuf" in reasons["reply[1]"]
    assert "belongs to session" in reasons["s2"]
    assert "second reply" in reasons["s1"]
    assert "needs" in reasons["liar"]


def test_seller_enforces_query_budget(model, sellers):
    buyer = _buyer(model, budget=1)
    offer = buyer.offer(max_samples=100)
    seller = Seller("s0", sellers["s0"], policy=SellerPolicy(exact_per_sample=True))
    seller.respond(offer)
    with pytest.raises(BudgetExceededError, match="budget"):
        seller.respond(offer)
    # a seller may be stricter than the buyer asks, never looser
    buyer2 = _buyer(model, budget=5)
    offer2 = buyer2.offer(max_samples=100)
    strict = Seller("s0", sellers["s0"], policy=SellerPolicy(max_queries_per_session=1, exact_per_sample=True))
    strict.respond(offer2)
    with pytest.raises(BudgetExceededError):
        strict.respond(offer2)


def _mutate(offer_bytes, fn):
    offer = pb.Offer.FromString(offer_bytes)
    fn(offer)
    return offer.SerializeToString()


def test_seller_refuses_wrong_version_and_tampered_model(model, sellers):
    buyer = _buyer(model)
    offer = buyer.offer(max_samples=100)
    seller = Seller("s0", sellers["s0"], policy=SellerPolicy(max_queries_per_session=10, exact_per_sample=True))
    with pytest.raises(VersionMismatchError, match="protocol version 2"):
        seller.respond(_mutate(offer, lambda o: setattr(o, "protocol_version", 2)))

    def tamper(o):
        w = bytearray(o.model.weights)
        w[-5] ^= 0xFF
        o.model.weights = bytes(w)

    with pytest.raises(FingerprintMismatchError):
        seller.respond(_mutate(offer, tamper))
    pinned = Seller("s0", sellers["s0"], policy=SellerPolicy(expected_fingerprint="f" * 64, exact_per_sample=True))
    with pytest.raises(FingerprintMismatchError, match="expect"):
        pinned.respond(offer)


def test_seller_refuses_insecure_parameters_and_oversized_data(model, sellers):
    buyer = _buyer(model)
    offer = buyer.offer(max_samples=10)
    small = Seller("s0", sellers["s0"], policy=SellerPolicy(max_queries_per_session=10, exact_per_sample=True))
    with pytest.raises(InsecureParametersError, match="128"):
        small.respond(_mutate(offer, lambda o: o.he.coeff_mod_bit_sizes.extend([60, 60])))
    seller = Seller("s2", sellers["s2"], policy=SellerPolicy(max_queries_per_session=10, exact_per_sample=True))
    with pytest.raises(ProtocolError, match="at most 10"):
        seller.respond(offer)
    with pytest.raises(ProtocolError, match="empty"):
        seller.respond(b"")


def test_buyer_refuses_insecure_configuration(model):
    with pytest.raises(InsecureParametersError, match="128"):
        _buyer(
            model,
            crypto=CryptoConfig(poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 30, 30, 40), global_scale_bits=30),
        )
