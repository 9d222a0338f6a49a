"""A seller's query budget is spent only on an Offer it answers, per (session, peer): a rival's
forged or failing Offer spends nothing of the real buyer's; answered sessions, in-flight memory and
per-peer slots are bounded."""

import threading

import pytest
import torch

from tip_fed.config import SellerBudgetConfig
from tip_fed.errors import BudgetExceededError, ConfigError, DataError, FingerprintMismatchError, ProtocolError
from tip_fed.grpc.server import MiB
from tip_fed.protocol.resources import InFlight, PeerSlots, ResourceLimitError
from tip_fed.protocol.sessions import AnsweredSessions
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from . import hostile


def test_a_rivals_session_id_cannot_spend_the_real_buyers_budget(make_buyer, records):
    alice, mallory = make_buyer(), make_buyer()
    seller = hostile.target(records)
    offer = alice.offer(max_samples=100)
    session = alice.session_id
    fake = hostile.fake_offer(session)
    assert len(fake) == 86
    with pytest.raises(ProtocolError, match="no model weights"):
        seller.respond(fake, peer="mallory")
    # a complete, valid Offer of mallory's own, under alice's session id, spends mallory's budget only
    forged = pb.Offer.FromString(mallory.offer(max_samples=100))
    forged.session_id = session
    seller.respond(forged.SerializeToString(), peer="mallory")
    reply = seller.respond(offer, peer="alice")
    assert alice.settle([reply]).sellers[0].seller_id == "s"
    for peer, blob in (("alice", offer), ("mallory", forged.SerializeToString())):
        with pytest.raises(BudgetExceededError, match="already answered 1 query"):
            seller.respond(blob, peer=peer)


def test_budget_is_spent_only_after_the_whole_offer_validates(make_buyer, records):
    buyer = make_buyer()
    offer = buyer.offer(max_samples=100)
    late = pb.Offer.FromString(offer)  # fails at the model, after the context was loaded
    late.model.fingerprint = "0" * 64
    seller = hostile.target(records)
    for _ in range(3):
        with pytest.raises(FingerprintMismatchError):
            seller.respond(late.SerializeToString())
    assert buyer.settle([seller.respond(offer)]).sellers[0].n_samples == hostile.N_ROWS


def test_a_failed_scoring_gives_the_query_back(make_buyer):
    """Records that do not fit the model fail after the spend; nothing was answered, so nothing is spent."""
    misfit = {"x": torch.randn(4, 7), "y": torch.zeros(4, dtype=torch.long)}
    seller = hostile.target(misfit)
    offer = make_buyer().offer(max_samples=100)
    for _ in range(2):
        with pytest.raises(DataError, match="do not fit the model"):
            seller.respond(offer)
    assert len(seller._sessions) == 0


def test_answered_sessions_are_bounded_and_never_forgotten_early():
    now = [0.0]
    table = AnsweredSessions(capacity=2, window_s=100.0, clock=lambda: now[0])
    table.spend("a", 1, "s")
    table.spend("b", 1, "s")
    with pytest.raises(ResourceLimitError, match=r"seller-budget\.kept-sessions") as full:
        table.spend("c", 1, "s")
    assert full.value.limit == "kept_sessions"
    with pytest.raises(BudgetExceededError):  # an answered session stays answered inside the window
        table.spend("a", 1, "s")
    now[0] = 100.5  # the window passed: "a" and "b" expire, oldest first
    table.spend("c", 1, "s")
    assert set(table.counts) == {"c"} and len(table) == 1


def test_answered_sessions_keep_a_callers_dict_in_place():
    counts = {"old": 1}
    table = AnsweredSessions(counts, capacity=4)
    table.spend("new", 2, "s")
    table.spend("new", 2, "s")
    assert counts == {"old": 1, "new": 2}
    table.refund("new")
    assert counts == {"old": 1, "new": 1}


def test_in_flight_refuses_memory_and_bounds_sessions():
    flight = InFlight(SellerBudgetConfig(offer_memory_mb=10, in_flight_memory_mb=10, max_sessions=2))
    with flight.reserve(6 * MiB):
        with pytest.raises(ResourceLimitError, match="in-flight-memory-mb"), flight.reserve(5 * MiB):
            pass
        entered = threading.Event()

        def third():
            with flight.reserve(0):
                entered.set()

        with flight.reserve(4 * MiB):
            waiter = threading.Thread(target=third)
            waiter.start()
            # two sessions hold the slots: the third waits (it is not admitted while they run)
            assert not entered.wait(0.5) and flight.sessions == 2
        waiter.join(60)
        assert entered.is_set()
    assert (flight.sessions, flight.bytes) == (0, 0)


def test_peer_slots_are_per_peer_and_given_back():
    slots = PeerSlots(SellerBudgetConfig(max_offers_per_peer=2))
    slots.admit("mallory")
    slots.admit("mallory")
    with pytest.raises(ResourceLimitError, match=r"seller-budget\.max-offers-per-peer") as full:
        slots.admit("mallory")
    assert full.value.limit == "max_offers_per_peer"
    slots.admit("alice")  # another buyer is not affected
    slots.release("mallory")
    slots.admit("mallory")
    for peer in ("mallory", "mallory", "alice"):
        slots.release(peer)
    assert slots.held == {}
    with pytest.raises(ConfigError, match="max-offers-per-peer"):
        SellerBudgetConfig(max_offers_per_peer=0)
