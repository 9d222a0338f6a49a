"""Every Offer is costed before anything is allocated; a hostile one cannot stall, bloat or starve a seller.

The hostile Offers (tests/security/hostile.py) are the ones that passed validation and still hurt a
long-lived ``tip-fed seller serve``. Each must be refused with a TipError naming the limit, from
the costing step, with the seller's peak RSS unchanged (measured in a fresh process). An honest
buyer talking to a real grpcio server on 127.0.0.1 must be answered while they arrive.
"""

import threading

import numpy as np
import pytest
import torch

from tip_fed.config import (
    PreconditionerConfig,
    ProjectionConfig,
    ProtocolConfig,
    SellerBudgetConfig,
)
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.models import MLP
from tip_fed.core.projection import LayerProjection, ProjectionSpec
from tip_fed.core.projection_matrix import (
    MATRIX_CACHE_BYTES,
    _byte_bounded_cache,
    _matrix,
)
from tip_fed.core.tasks import get_task
from tip_fed.crypto import keys
from tip_fed.errors import (
    BudgetExceededError,
    ConfigError,
    DataError,
    FingerprintMismatchError,
    ModelError,
    ProtocolError,
)
from tip_fed.grpc import (
    ClientTLS,
    SellerEndpoint,
    ServerTLS,
    start_server,
    value_sellers,
)
from tip_fed.grpc.server import MiB, seller_message_limit
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.ledger import LedgerPolicy
from tip_fed.protocol.offer import decode_offer
from tip_fed.protocol.resources import (
    InFlight,
    PeerSlots,
    ResourceLimitError,
    max_offer_bytes,
)
from tip_fed.protocol.sessions import AnsweredSessions
from tip_fed.tls import create_ca, issue_cert
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from . import hostile
from .conftest import make_data

N_ROWS = 60
LIMITS = {
    "rank_f": (ResourceLimitError, "projection_memory_mb", "seller-budget.projection-memory-mb"),
    "many_layers": (ResourceLimitError, "max_layers", "seller-budget.max-layers"),
    "huge_dim": (ResourceLimitError, "offer_memory_mb", "seller-budget.offer-memory-mb"),
    "uint8_weights": (ModelError, None, "float weights only"),
    "big_context": (ResourceLimitError, "he_key_memory_mb", "seller-budget.he-key-memory-mb"),
}

# these tests are about resources, not privacy: exact answers are not capped here
UNCAPPED = LedgerPolicy(max_exact=None, total_max_exact=None)


@pytest.fixture(scope="module")
def data():
    return make_data(N_ROWS, 5)


def _hostile_offers(buyer):
    honest = buyer.offer(max_samples=100)
    return {name: build(honest, N_ROWS + 1) for name, build in hostile.BUILDERS.items()}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_hostile_offer_is_refused_by_the_costing_step_with_its_limit(make_buyer, data, name):
    offer = _hostile_offers(make_buyer())[name]
    seller = Seller("s", data, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED))
    kind, limit, text = LIMITS[name]
    # the costing step alone refuses it ...
    with pytest.raises(kind, match=text) as costed:
        seller.cost(decode_offer(offer, seller.policy.budget))
    # ... and respond() refuses it with the same error, before anything else runs
    with pytest.raises(kind, match=text) as answered:
        seller.respond(offer)
    assert str(answered.value) == str(costed.value)
    assert getattr(answered.value, "limit", None) == limit
    if limit:
        assert "tip-fed seller serve --" in str(answered.value)  # says how to raise it


def test_refusals_happen_before_the_allocation_in_a_real_process(make_buyer, data, tmp_path):
    """Peak RSS of a fresh seller process stays flat under every hostile Offer; a positive
    control (the rank-F Offer with the projection limit raised) shows the probe sees allocations."""
    buyer = make_buyer()
    offers = _hostile_offers(buyer)
    path = save_dataset(data, tmp_path / "s.safetensors")
    results = hostile.run_in_child(tmp_path, path, buyer.offer(max_samples=100), offers)
    for name, out in results.items():
        kind, limit, _ = LIMITS[name]
        assert out["error"] == kind.__name__ and out["limit"] == limit, (name, out)
        assert out["rss_growth_mb"] < 48, (name, out)
    control = hostile.rank_f(buyer.offer(max_samples=100), N_ROWS + 1, f=4096)
    out = hostile.run_in_child(tmp_path, path, buyer.offer(max_samples=100), {"control": control},
                               budget={"projection_memory_mb": 4096})["control"]
    # 2 x 4096^2 float64 matrices (256 MiB) were built before the records failed to fit Linear(1, F)
    assert out["error"] == "DataError" and out["rss_growth_mb"] > 200, out


def test_a_rivals_session_id_cannot_spend_the_real_buyers_budget(make_buyer, data):
    alice, mallory = make_buyer(), make_buyer()
    seller = Seller("s", data, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED))
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


def test_budget_is_spent_only_after_the_whole_offer_validates(make_buyer, data):
    buyer = make_buyer()
    offer = buyer.offer(max_samples=100)
    late = pb.Offer.FromString(offer)  # fails at the model, after the context was loaded
    late.model.fingerprint = "0" * 64
    seller = Seller("s", data, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED))
    for _ in range(3):
        with pytest.raises(FingerprintMismatchError):
            seller.respond(late.SerializeToString())
    assert buyer.settle([seller.respond(offer)]).sellers[0].n_samples == N_ROWS


def test_a_failed_scoring_gives_the_query_back(make_buyer):
    """Records that do not fit the model fail after the spend; nothing was answered, so nothing is spent."""
    misfit = {"x": torch.randn(4, 7), "y": torch.zeros(4, dtype=torch.long)}
    seller = Seller("s", misfit, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED))
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


def test_duplicate_layer_check_is_set_based_and_exact():
    layers = [LayerProjection(f"l{i}", 1, 1, 1, 1) for i in range(40_000)]
    ProjectionSpec(tuple(layers), seed=0)
    with pytest.raises(ConfigError, match=r"more than once: \['l17', 'l39999'\]"):
        ProjectionSpec(tuple([*layers, layers[17], layers[-1], layers[17]]), seed=0)


def test_caches_are_bounded_by_bytes_not_entries(make_buyer, data):
    calls = []

    @_byte_bounded_cache(1000)
    def make(key, size):
        calls.append(key)
        return np.zeros(size, dtype=np.uint8)

    make("a", 600)
    make("b", 300)
    make("a", 600)  # hit
    make("c", 400)  # 1300 bytes: the least recently used ("b") goes, "a" + "c" = 1000 stay
    make("big", 5000)  # larger than the cache: returned, never kept
    assert make.cache_bytes() <= 1000 and calls == ["a", "b", "c", "big"]
    make("b", 300)
    assert calls[-1] == "b"

    Seller("s", data, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED)).respond(
        make_buyer().offer(max_samples=100)
    )
    assert 0 < _matrix.cache_bytes() <= MATRIX_CACHE_BYTES
    assert 0 < keys.context_cache_bytes() <= keys.SEAL_CONTEXT_CACHE_BYTES


def test_a_context_above_the_cache_bound_is_not_kept(make_buyer, data, monkeypatch):
    keys.clear_context_cache()
    monkeypatch.setattr(keys, "SEAL_CONTEXT_CACHE_BYTES", 1024)
    Seller("s", data, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED)).respond(
        make_buyer().offer(max_samples=100)
    )
    assert keys.context_cache_bytes() == 0


def test_message_limit_follows_the_budget():
    default = SellerBudgetConfig()
    assert max_offer_bytes(default) == default.offer_memory_mb * MiB // 6
    assert seller_message_limit(SellerBudgetConfig(offer_memory_mb=1, in_flight_memory_mb=1)) == 4 * MiB


# ---- a real grpcio server on 127.0.0.1 -------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = create_ca(d)
    return {
        "ca": ca,
        "server": issue_cert(ca, d, "seller"),
        "alice": issue_cert(ca, d, "alice", client=True),
        "mallory": issue_cert(ca, d, "mallory", client=True),
    }


def _client(pki, who):
    return ClientTLS(pki["ca"].cert, pki[who].cert, pki[who].key) if who else ClientTLS(pki["ca"].cert)


def _assert_answered_exactly(alice, replies, failures, model, data):
    """Alice was answered, and her total equals the plaintext projected-gradient reference."""
    assert failures == {}, failures
    valuation = alice.settle(list(replies.values()), expected=["s"])
    g = projected_grads(model, alice.spec, get_task("classification"), data)
    plain = (clip_rows(g.double(), alice.grad_norm_bound)[0] @ alice.query).numpy()
    assert abs(valuation.sellers[0].total - plain.sum()) <= 1e-5 * np.abs(plain).sum()


def test_honest_buyer_is_answered_while_hostile_offers_arrive(make_buyer, model, data, pki):
    seller = Seller("s", data, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED))
    running = start_server(seller, tls=ServerTLS(pki["server"].cert, pki["server"].key, pki["ca"].cert))
    endpoint = [SellerEndpoint("s", running.address)]
    alice = make_buyer()
    attacks = _hostile_offers(make_buyer())
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
    _assert_answered_exactly(alice, replies, failures, model, data)
    assert len(refusals) == 3 * len(attacks)
    for text in refusals:
        assert "RESOURCE_EXHAUSTED" in text or "INVALID_ARGUMENT" in text, text
    # each call is refused by the costing step, or earlier because mallory already has an Offer in
    crowded = sum("seller-budget.max-offers-per-peer" in text for text in refusals)
    assert (
        sum("seller-budget." in text for text in refusals)
        - crowded
        + sum("INVALID_ARGUMENT" in text for text in refusals)
        == 3 * len(attacks) - crowded
    )


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


def test_one_buyers_flood_of_valid_offers_is_capped_and_others_are_answered(make_buyer, model, data, pki):
    """Mallory (a valid certificate) floods with valid, costly Offers from many callers; alice's
    honest Offer is answered, mallory has one Offer in at a time, every extra one is refused
    with RESOURCE_EXHAUSTED naming seller-budget.max-offers-per-peer, and none waits in a queue.

    Mallory's first admitted Offer is parked before scoring until alice's answer is in, so the
    flood overlaps it whatever the machine's speed (outcomes, not times, are asserted)."""
    seller = Seller("s", data, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED))
    assert seller.policy.budget.max_offers_per_peer == 1  # the default
    answer = seller.respond
    parked, release = threading.Event(), threading.Event()

    def respond(offer: bytes, *, peer: str | None = None) -> bytes:
        if "mallory" in (peer or "") and not parked.is_set():
            parked.set()
            assert release.wait(300)
        return answer(offer, peer=peer)

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
    _assert_answered_exactly(alice, replies, failures, model, data)
    assert len(outcomes) == len(flood) and outcomes.count("answered") == 1, outcomes
    refused = [o for o in outcomes if o != "answered"]
    assert len(refused) == len(flood) - 1
    for text in refused:
        assert "RESOURCE_EXHAUSTED" in text and "seller-budget.max-offers-per-peer" in text, text
        assert "--max-offers-per-peer" in text
    assert late == {} and len(again) == 1, late


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


def test_big_messages_need_a_client_certificate_and_fit_the_budget(make_buyer, data, pki):
    budget = SellerBudgetConfig(offer_memory_mb=24, in_flight_memory_mb=64)
    seller = Seller("s", data, policy=SellerPolicy(budget=budget, exact_per_sample=True, lifetime=UNCAPPED))
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


def test_over_mtls_the_budget_is_keyed_by_the_client_certificate(make_buyer, data, pki, caplog):
    """Mallory's complete Offer under alice's session id is answered for mallory; alice is still
    answered once, and each is refused a second time: the peer is the certificate subject."""
    running = start_server(
        Seller("s", data, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED)),
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


def test_without_client_certificates_a_fake_offer_from_the_same_address_spends_nothing(make_buyer, data):
    """Plaintext on one host: every caller has the same peer (the address), so only spending after
    validation protects the real buyer; a reconnect from another port is still the same peer."""
    running = start_server(
        Seller("s", data, policy=SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED)), insecure=True
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
    assert alice.settle(list(replies.values())).sellers[0].n_samples == N_ROWS
    assert "RESOURCE_EXHAUSTED: seller s already answered 1 query" in again["s"]


@pytest.mark.parametrize(
    "budget, limit",
    [
        ({"offer_work_s": 1e-6}, "offer_work_s"),
        ({"offer_memory_mb": 1, "in_flight_memory_mb": 1}, "offer_memory_mb"),
        ({"he_key_memory_mb": 1}, "he_key_memory_mb"),
    ],
)
def test_every_per_offer_limit_is_enforced_on_an_honest_offer_when_set_low(make_buyer, data, budget, limit):
    seller = Seller(
        "s", data, policy=SellerPolicy(budget=SellerBudgetConfig(**budget), exact_per_sample=True, lifetime=UNCAPPED)
    )
    with pytest.raises(ResourceLimitError) as refused:
        seller.respond(make_buyer().offer(max_samples=100))
    assert refused.value.limit == limit and f"seller-budget.{limit.replace('_', '-')}" in str(refused.value)


def test_weights_header_is_checked_before_it_is_parsed():
    from safetensors.torch import save as st_save

    from tip_fed.protocol.resources import read_weights_header

    blob = st_save({"w": torch.zeros(3, 2), "b": torch.zeros(3, dtype=torch.float64)})
    header = read_weights_header(blob)
    assert (header.n_elements, header.stored_bytes, header.n_tensors) == (9, 6 * 4 + 3 * 8, 2)
    with pytest.raises(ResourceLimitError, match="weights header is"):
        read_weights_header(blob, max_header_bytes=8)
    lying = bytearray(blob)
    lying[8 : 8 + int.from_bytes(blob[:8], "little")] = lying[8 : 8 + int.from_bytes(blob[:8], "little")].replace(
        b"[3,2]", b"[9,9]"
    )
    with pytest.raises(ModelError, match="does not fit"):
        read_weights_header(bytes(lying))
    with pytest.raises(ModelError, match="header of"):
        read_weights_header((1 << 40).to_bytes(8, "little") + b"{}")


def test_the_default_work_limit_refuses_an_offer_far_above_an_honest_one():
    """A valid 2.4M-parameter MLP Offer costs a 60-record seller a few estimated seconds, but a
    50,000-record seller about 6 minutes: refused by the default offer-work-s before any work;
    the honest small-model Offer to the same large seller passes."""
    settings = BuyerSettings(
        projection=ProjectionConfig(rank=4),
        preconditioner=PreconditionerConfig(kind="identity"),
        protocol=ProtocolConfig(disclosure="aggregate"),
    )
    offers = {
        h: Buyer(
            MLP([10, h, 2]).eval(),
            get_task("classification"),
            objective=make_data(40, 2),
            train=make_data(120, 3),
            settings=settings,
        ).offer(max_samples=50_000)
        for h in (16, 200_000)
    }
    small, large = Seller("s", make_data(60, 5)), Seller("s", make_data(50_000, 5))
    assert SellerBudgetConfig().offer_work_s == 300
    assert small.cost(decode_offer(offers[200_000])).work_s < 30
    assert large.cost(decode_offer(offers[16])).work_s < 30
    with pytest.raises(ResourceLimitError, match=r"seller-budget\.offer-work-s") as refused:
        large.cost(decode_offer(offers[200_000]))
    assert refused.value.limit == "offer_work_s"
