"""Replays and identity confusion: a reply only counts in the session it was computed for."""

import pytest

from tip_fed.errors import BudgetExceededError
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.wire.tip.v1 import valuation_pb2 as pb


def test_reply_replayed_into_a_later_session_is_rejected_even_with_its_session_id_rewritten(make_buyer, seller_data):
    buyer = make_buyer()
    old = Seller("s1", seller_data["s1"], policy=SellerPolicy(exact_per_sample=True)).respond(
        buyer.offer(max_samples=100)
    )
    buyer.settle([old])
    offer = buyer.offer(max_samples=100)
    forged = pb.Reply.FromString(old)
    forged.session_id = pb.Offer.FromString(offer).session_id
    fresh = Seller("s0", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True)).respond(offer)
    valuation = buyer.settle([old, forged.SerializeToString(), fresh], expected=["s0", "s1"])
    assert [v.seller_id for v in valuation.sellers] == ["s0"]
    assert "belongs to session" in valuation.rejected["s1"] or "outside the possible range" in valuation.rejected["s1"]
    assert valuation.missing == ["s1"]


def test_forged_reply_under_the_right_session_id_decrypts_out_of_range(make_buyer, seller_data):
    other = make_buyer()
    buyer = make_buyer()
    stolen = Seller("s1", seller_data["s1"], policy=SellerPolicy(exact_per_sample=True)).respond(
        other.offer(max_samples=100)
    )
    offer = buyer.offer(max_samples=100)
    forged = pb.Reply.FromString(stolen)
    forged.session_id = pb.Offer.FromString(offer).session_id
    valuation = buyer.settle([forged.SerializeToString()])
    assert valuation.sellers == [] and "outside the possible range" in valuation.rejected["s1"]


def test_duplicate_seller_id_counts_once(make_buyer, seller_data):
    buyer = make_buyer()
    offer = buyer.offer(max_samples=100)
    first = Seller("dup", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True)).respond(offer)
    impostor = Seller("dup", seller_data["s2"], policy=SellerPolicy(exact_per_sample=True)).respond(offer)
    valuation = buyer.settle([first, impostor])
    assert len(valuation.sellers) == 1 and valuation.sellers[0].n_samples == 5
    assert "second reply" in valuation.rejected["dup"]


def test_offer_replayed_to_a_seller_is_refused(make_buyer, seller_data):
    buyer = make_buyer()
    offer = buyer.offer(max_samples=100)
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True))
    seller.respond(offer)
    with pytest.raises(BudgetExceededError):
        seller.respond(offer)


def test_one_offer_sent_concurrently_is_answered_once(make_buyer, seller_data):
    """A service answers on many threads: the budget check-and-spend is atomic."""
    from concurrent.futures import ThreadPoolExecutor

    from tip_fed.errors import TipError

    buyer = make_buyer()
    offer = buyer.offer(max_samples=100)
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True))

    def attempt(_):
        try:
            return seller.respond(offer)
        except BudgetExceededError:
            return None
        except TipError as exc:  # pragma: no cover - reported as a failure below
            return exc

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(attempt, range(6)))
    assert sum(isinstance(r, bytes) for r in results) == 1
    assert sum(r is None for r in results) == 5
