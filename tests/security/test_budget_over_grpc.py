"""Resource budgets of a real grpcio seller server on 127.0.0.1: an honest buyer is answered while
hostile or flooding Offers arrive, big messages need a client certificate, and the budget is keyed
by the client certificate (or, without one, spent only after validation)."""

import threading

import numpy as np
import pytest

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig, SellerBudgetConfig
from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.grpc import ClientTLS, SellerEndpoint, ServerTLS, start_server, value_sellers
from tip_fed.grpc.server import MiB
from tip_fed.protocol import Buyer, BuyerSettings
from tip_fed.tls import issue_cert
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import make_data, plaintext_scores
from . import hostile


@pytest.fixture(scope="module")
def pki(pki):
    """The shared CA and server certificate, and two buyers' client certificates."""
    return {**pki, **{who: issue_cert(pki["ca"], pki["dir"], who, client=True) for who in ("alice", "mallory")}}


def _client(pki, who):
    return ClientTLS(pki["ca"].cert, pki[who].cert, pki[who].key) if who else ClientTLS(pki["ca"].cert)


def _assert_answered_exactly(alice, replies, failures, model, records):
    """Alice was answered, and her total equals the plaintext projected-gradient reference."""
    assert failures == {}, failures
    valuation = alice.settle(list(replies.values()), expected=["s"])
    plain = plaintext_scores(alice, model, records)
    assert abs(valuation.sellers[0].total - plain.sum()) <= 1e-5 * np.abs(plain).sum()


def test_honest_buyer_is_answered_while_hostile_offers_arrive(make_buyer, model, records, pki):
    seller = hostile.target(records)
    running = start_server(seller, tls=ServerTLS(pki["server"].cert, pki["server"].key, pki["ca"].cert))
    endpoint = [SellerEndpoint("s", running.address)]
    alice = make_buyer()
    attacks = hostile.hostile_offers(make_buyer())
    offer = alice.offer(max_samples=100)
    attacks["fake"] = hostile.fake_offer(alice.session_id)
    refusals: list[str] = []
    start = threading.Barrier(len(attacks) + 1)

    def attack(blob):
        start.wait()
        for _ in range(3):
            _, failures = value_sellers(endpoint, blob, tls=_client(pki, "mallory"), timeout_s=120, retries=0)
            refusals.append(failures["s"])

    threads = [threading.Thread(target=attack, args=(blob,)) for blob in attacks.values()]
    try:
        for t in threads:
            t.start()
        start.wait()
        replies, failures = value_sellers(endpoint, offer, tls=_client(pki, "alice"), timeout_s=120, retries=0)
        for t in threads:
            t.join(300)
    finally:
        running.stop(0)
    _assert_answered_exactly(alice, replies, failures, model, records)
    assert len(refusals) == 3 * len(attacks)
    # each call is refused by the costing step (naming its limit), earlier because mallory already has an
    # Offer in (max-offers-per-peer), or as invalid (the fake Offer)
    for text in refusals:
        assert ("RESOURCE_EXHAUSTED" in text and "seller-budget." in text) or "INVALID_ARGUMENT" in text, text


def _mallory_offers(n):
    """Valid Offers a wide model makes (each its own session): the budget accepts every one."""
    settings = BuyerSettings(
        projection=ProjectionConfig(rank=4),
        preconditioner=PreconditionerConfig(kind="identity"),
        protocol=ProtocolConfig(disclosure="aggregate"),
    )
    wide = Buyer(
        MLP([10, 20_000, 2]).eval(),
        get_task("classification"),
        objective=make_data(40, 2, shift=0.5),
        train=make_data(120, 3),
        settings=settings,
    )
    return [wide.offer(max_samples=100) for _ in range(n)]


def test_one_buyers_flood_of_valid_offers_is_capped_and_others_are_answered(make_buyer, model, records, pki):
    """Mallory (a valid certificate) floods with valid, costly Offers from many callers; alice's
    honest Offer is answered, mallory has one Offer in at a time, every extra one is refused
    with RESOURCE_EXHAUSTED naming seller-budget.max-offers-per-peer, and none waits in a queue.

    Mallory's first admitted Offer is parked before scoring until alice's answer is in, so the
    flood overlaps it whatever the machine's speed (outcomes, not times, are asserted)."""
    seller = hostile.target(records)
    assert seller.policy.budget.max_offers_per_peer == 1  # the default
    answer = seller.respond
    parked, release = threading.Event(), threading.Event()

    def respond(offer: bytes, *, peer: str | None = None, authenticated: bool = False) -> bytes:
        if "mallory" in (peer or "") and not parked.is_set():
            parked.set()
            assert release.wait(300)
        return answer(offer, peer=peer, authenticated=authenticated)

    seller.respond = respond
    running = start_server(seller, tls=ServerTLS(pki["server"].cert, pki["server"].key, pki["ca"].cert))
    endpoint = [SellerEndpoint("s", running.address)]
    flood = _mallory_offers(8)
    outcomes: list[str] = []

    def attack(blob):
        replies, failures = value_sellers(endpoint, blob, tls=_client(pki, "mallory"), timeout_s=300, retries=0)
        outcomes.append("answered" if replies else failures["s"])

    alice = make_buyer()
    threads = [threading.Thread(target=attack, args=(flood[0],))]
    try:
        threads[0].start()
        assert parked.wait(120)  # mallory's first Offer holds her one slot
        threads += [threading.Thread(target=attack, args=(blob,)) for blob in flood[1:]]
        for t in threads[1:]:
            t.start()
        for t in threads[1:]:
            t.join(300)
        replies, failures = value_sellers(
            endpoint, alice.offer(max_samples=100), tls=_client(pki, "alice"), timeout_s=300, retries=0
        )
        release.set()
        threads[0].join(300)
        # the slot is free again once mallory's Offer is answered: her next one is admitted
        again, late = value_sellers(endpoint, flood[1], tls=_client(pki, "mallory"), timeout_s=300, retries=0)
    finally:
        release.set()
        running.stop(0)
    _assert_answered_exactly(alice, replies, failures, model, records)
    assert len(outcomes) == len(flood) and outcomes.count("answered") == 1, outcomes
    refused = [o for o in outcomes if o != "answered"]
    assert len(refused) == len(flood) - 1
    for text in refused:
        assert "RESOURCE_EXHAUSTED" in text and "seller-budget.max-offers-per-peer" in text, text
        assert "--max-offers-per-peer" in text
    assert late == {} and len(again) == 1, late


def test_big_messages_need_a_client_certificate_and_fit_the_budget(make_buyer, records, pki):
    budget = SellerBudgetConfig(offer_memory_mb=24, in_flight_memory_mb=64)
    seller = hostile.target(records, budget=budget)
    running = start_server(seller, tls=ServerTLS(pki["server"].cert, pki["server"].key, pki["ca"].cert))
    endpoint = [SellerEndpoint("s", running.address)]
    big = pb.Offer.FromString(make_buyer().offer(max_samples=100))
    big.model.config_json = " " * (6 * MiB)  # 6 MiB > the 4 MiB this budget allows
    blob = big.SerializeToString()
    try:
        _, anonymous = value_sellers(endpoint, blob, tls=_client(pki, None), timeout_s=30, retries=0)
        _, known = value_sellers(endpoint, blob, tls=_client(pki, "alice"), timeout_s=30, retries=0)
    finally:
        running.stop(0)
    assert running.security == "mtls"
    assert anonymous["s"].startswith(f"{running.address}: UNAVAILABLE"), anonymous  # handshake refused
    assert known["s"].startswith(f"{running.address}: RESOURCE_EXHAUSTED"), known  # above the derived limit


def test_over_mtls_the_budget_is_keyed_by_the_client_certificate(make_buyer, records, pki, caplog):
    """Mallory's complete Offer under alice's session id is answered for mallory; alice is still
    answered once, and each is refused a second time: the peer is the certificate subject."""
    running = start_server(
        hostile.target(records),
        tls=ServerTLS(pki["server"].cert, pki["server"].key, pki["ca"].cert),
    )
    endpoint = [SellerEndpoint("s", running.address)]
    alice, mallory = make_buyer(), make_buyer()
    offer = alice.offer(max_samples=100)
    forged = pb.Offer.FromString(mallory.offer(max_samples=100))
    forged.session_id = alice.session_id
    forged = forged.SerializeToString()
    try:
        with caplog.at_level("INFO", logger="tip_fed.grpc.server"):
            _, fake = value_sellers(
                endpoint, hostile.fake_offer(alice.session_id), tls=_client(pki, "mallory"), timeout_s=60, retries=0
            )
            first = [
                value_sellers(endpoint, blob, tls=_client(pki, who), timeout_s=60, retries=0)
                for who, blob in (("mallory", forged), ("alice", offer))
            ]
            again = [
                value_sellers(endpoint, blob, tls=_client(pki, who), timeout_s=60, retries=0)[1]["s"]
                for who, blob in (("mallory", forged), ("alice", offer))
            ]
    finally:
        running.stop(0)
    assert "INVALID_ARGUMENT: the offer carries no model weights" in fake["s"]
    assert all(failures == {} for _, failures in first), first
    assert all("RESOURCE_EXHAUSTED: seller s already answered 1 query" in text for text in again), again
    assert any("from x509:" in r.getMessage() and "CN=alice" in r.getMessage() for r in caplog.records)


def test_without_client_certificates_a_fake_offer_from_the_same_address_spends_nothing(make_buyer, records):
    """Plaintext on one host: every caller has the same peer (the address), so only spending after
    validation protects the real buyer; a reconnect from another port is still the same peer."""
    running = start_server(
        hostile.target(records), insecure=True
    )
    endpoint = [SellerEndpoint("s", running.address)]
    alice = make_buyer()
    offer = alice.offer(max_samples=100)
    try:
        _, fake = value_sellers(endpoint, hostile.fake_offer(alice.session_id), insecure=True, timeout_s=60)
        replies, failures = value_sellers(endpoint, offer, insecure=True, timeout_s=60)
        _, again = value_sellers(endpoint, offer, insecure=True, timeout_s=60)  # a new channel, a new port
    finally:
        running.stop(0)
    assert "INVALID_ARGUMENT" in fake["s"] and failures == {}
    assert alice.settle(list(replies.values())).sellers[0].n_samples == hostile.N_ROWS
    assert "RESOURCE_EXHAUSTED: seller s already answered 1 query" in again["s"]
