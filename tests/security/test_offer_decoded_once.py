"""The Offer is decoded and validated once, at the wire boundary; nothing after it checks again.

So every check that used to be repeated further down (CKKS parameters, the plan's consistency with
them and with the projection, the public context's size, parameters and key) must hold at that one
place. Each attack below sends the real Seller an Offer that only a re-check deeper inside used to
catch, and shows it is refused before anything is spent: the honest Offer of the same session is
answered afterwards (its query budget is 1). The counts of ``check_params`` are measured with a
spy around the real function during a real session (real TenSEAL keys, real scoring).
"""

import sys

import pytest

from tip_fed.crypto import HEParams, SessionKeys, plan_packing
from tip_fed.crypto import params as crypto_params
from tip_fed.errors import CodecError, CryptoError, InsecureParametersError, ProtocolError
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.ledger import KeyReuseError, LedgerPolicy
from tip_fed.protocol.offer import decode_offer, encode_offer
from tip_fed.protocol.resources import ResourceLimitError
from tip_fed.testing import secret_key_bytes
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

EXACT = SellerPolicy(exact_per_sample=True)


def _mutate(offer_bytes, edit):
    msg = pb.Offer.FromString(offer_bytes)
    edit(msg)
    return msg.SerializeToString()


def _refused_then_honest(seller, hostile, honest, kind, match):
    """The hostile Offer is refused with ``kind``; the honest one of the same session still gets its answer."""
    with pytest.raises(kind, match=match):
        seller.respond(hostile)
    assert pb.Reply.FromString(seller.respond(honest)).n_samples == seller.n_samples


@pytest.fixture
def count_check_params(monkeypatch):
    """Replace the real check_params, wherever tip_fed holds a reference to it, by a counting wrapper."""
    real = crypto_params.check_params
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("tip_fed") and getattr(module, "check_params", None) is real:
            monkeypatch.setattr(module, "check_params", spy)
    return calls


def test_check_params_runs_once_on_the_buyers_side_and_once_on_the_sellers(count_check_params, make_buyer,
                                                                           seller_data):
    buyer = make_buyer()  # the buyer's CKKS settings are checked here, when it is made
    offer = buyer.offer(max_samples=100)
    buyer_side = len(count_check_params)
    reply = Seller("s0", seller_data["s0"], policy=EXACT).respond(offer)
    seller_side = len(count_check_params) - buyer_side
    valuation = buyer.settle([reply])
    assert valuation.rejected == {} and valuation.sellers[0].n_samples == len(seller_data["s0"]["y"])
    assert (buyer_side, seller_side, len(count_check_params)) == (1, 1, 2)


def test_insecure_parameters_are_refused_at_decoding(make_buyer, seller_data):
    offer = make_buyer().offer(max_samples=100)
    hostile = _mutate(offer, lambda o: o.he.coeff_mod_bit_sizes.extend([60, 60]))  # 340 bits at N = 8192
    _refused_then_honest(Seller("s0", seller_data["s0"], policy=EXACT), hostile, offer, InsecureParametersError,
                         "128-bit")


def test_parameters_that_do_not_match_the_packing_are_refused(make_buyer, seller_data):
    """Secure parameters, but the plan was laid out for other ones: the re-derived plan disagrees."""
    offer = make_buyer().offer(max_samples=100)
    hostile = _mutate(offer, lambda o: setattr(o.he, "poly_modulus_degree", 16384))
    _refused_then_honest(Seller("s0", seller_data["s0"], policy=EXACT), hostile, offer, ProtocolError,
                         "packing layout are invalid")


def test_a_packing_for_another_dimension_is_refused(make_buyer, seller_data):
    offer = make_buyer().offer(max_samples=100)

    def other_dim(o):
        o.projection.layers[0].rank_in += 1  # a consistent spec of another dimension than the plan's

    _refused_then_honest(Seller("s0", seller_data["s0"], policy=EXACT), _mutate(offer, other_dim), offer,
                         ProtocolError, "dimension")


def test_too_many_layers_are_refused_before_the_spec_is_built(make_buyer, seller_data):
    offer = make_buyer().offer(max_samples=100)
    seller = Seller("s0", seller_data["s0"], policy=EXACT)
    limit = seller.policy.budget.max_layers

    def many(o):
        first = o.projection.layers[0]
        o.projection.layers.extend(
            pb.LayerProjection(name=f"l{i}", in_features=first.in_features, out_features=first.out_features,
                               rank_in=1, rank_out=1) for i in range(limit + 1)
        )

    _refused_then_honest(seller, _mutate(offer, many), offer, ResourceLimitError, "max-layers")


def test_an_oversized_public_context_is_refused(make_buyer, seller_data):
    """Room for keys the plan never uses is refused by the costing, from the decoded plan alone."""
    offer = make_buyer().offer(max_samples=100)
    hostile = _mutate(offer, lambda o: setattr(o, "public_context", o.public_context + bytes(32 << 20)))
    _refused_then_honest(Seller("s0", seller_data["s0"], policy=EXACT), hostile, offer, ProtocolError,
                         "Galois key")


def test_a_public_context_for_other_parameters_is_refused(make_buyer, seller_data):
    """The Offer's parameters are secure and consistent; its context was made for other primes."""
    offer = make_buyer().offer(max_samples=100)
    dim = pb.Offer.FromString(offer).packing.dim
    other = SessionKeys.generate(plan_packing(dim, 1, HEParams(8192, (50, 30, 30, 50), 30)))
    hostile = _mutate(offer, lambda o: setattr(o, "public_context", other.public_context_bytes()))
    _refused_then_honest(Seller("s0", seller_data["s0"], policy=EXACT), hostile, offer, CodecError,
                         "another session or plan")


def test_a_context_holding_a_secret_key_is_refused(make_buyer, seller_data):
    offer = make_buyer().offer(max_samples=100)
    dim = pb.Offer.FromString(offer).packing.dim
    keys = SessionKeys.generate(plan_packing(dim, 1, HEParams()))
    private = keys._tenseal_context().serialize(save_secret_key=True, save_galois_keys=False,
                                                save_relin_keys=False)
    assert secret_key_bytes(keys)[:64] in private  # it does carry the key
    hostile = _mutate(offer, lambda o: setattr(o, "public_context", private))
    _refused_then_honest(Seller("s0", seller_data["s0"], policy=EXACT), hostile, offer, CryptoError,
                         "secret key")


def test_a_public_key_answered_before_is_refused_in_a_new_session(make_buyer, seller_data):
    """The ledger remembers the key digest of the context loaded for scoring, not a second parse."""
    buyer = make_buyer()
    first = buyer.offer(max_samples=100)
    uncapped = LedgerPolicy(max_exact=None, total_max_exact=None)  # the key, not the lifetime cap, refuses
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True, lifetime=uncapped))
    seller.respond(first)
    second = buyer.offer(max_samples=100)
    reused = _mutate(second, lambda o: setattr(o, "public_context", pb.Offer.FromString(first).public_context))
    _refused_then_honest(seller, reused, second, KeyReuseError, "fresh key pair")


def test_the_typed_offer_keeps_every_field_the_buyer_sent(make_buyer):
    """Decoding to the typed Offer and encoding it again gives the buyer's bytes back: the seller
    works on exactly what was sent, nothing dropped or defaulted on the way."""
    for buyer in (make_buyer(), make_buyer(disclosure="aggregate", dp_epsilon=2.0, dp_delta=1e-6)):
        offer = buyer.offer(max_samples=100)
        typed = decode_offer(offer)
        assert encode_offer(typed) == offer
        assert typed.message_bytes == len(offer) and typed.plan.dim == typed.spec.dim == buyer.spec.dim
