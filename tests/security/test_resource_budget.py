"""Every Offer is costed before anything is allocated: a hostile one is refused by the costing step,
naming the limit, with the seller's peak RSS unchanged (measured in a fresh process); caches are
bounded by bytes.

The hostile Offers (tests/security/hostile.py) are the ones that pass validation and still would
hurt a long-lived ``tip-fed seller serve``.
"""

import numpy as np
import pytest
import torch

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig, SellerBudgetConfig
from tip_fed.core.models import MLP
from tip_fed.core.projection import LayerProjection, ProjectionSpec
from tip_fed.core.projection_matrix import MATRIX_CACHE_BYTES, _byte_bounded_cache, _matrix
from tip_fed.core.tasks import get_task
from tip_fed.crypto import HEParams, SessionKeys, encrypt_query, keys, plan_packing
from tip_fed.errors import ConfigError, ModelError
from tip_fed.grpc.server import MiB, seller_message_limit
from tip_fed.protocol import Buyer, BuyerSettings, Seller
from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.offer import decode_offer
from tip_fed.protocol.resources import ResourceLimitError
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import make_data
from . import hostile

LIMITS = {
    "rank_f": (ResourceLimitError, "projection_memory_mb", "seller-budget.projection-memory-mb"),
    "many_layers": (ResourceLimitError, "max_layers", "seller-budget.max-layers"),
    "huge_dim": (ResourceLimitError, "offer_memory_mb", "seller-budget.offer-memory-mb"),
    "uint8_weights": (ModelError, None, "float weights only"),
    "big_context": (ResourceLimitError, "he_key_memory_mb", "seller-budget.he-key-memory-mb"),
}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_hostile_offer_is_refused_by_the_costing_step_with_its_limit(make_buyer, records, name):
    offer = hostile.hostile_offers(make_buyer())[name]
    seller = hostile.target(records)
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


def test_refusals_happen_before_the_allocation_in_a_real_process(make_buyer, records, tmp_path):
    """Peak RSS of a fresh seller process stays flat under every hostile Offer; a positive
    control (the rank-F Offer with the projection limit raised) shows the probe sees allocations."""
    buyer = make_buyer()
    offers = hostile.hostile_offers(buyer)
    path = save_dataset(records, tmp_path / "s.safetensors")
    results = hostile.run_in_child(tmp_path, path, buyer.offer(max_samples=100), offers)
    for name, out in results.items():
        kind, limit, _ = LIMITS[name]
        assert out["error"] == kind.__name__ and out["limit"] == limit, (name, out)
        assert out["rss_growth_mb"] < 48, (name, out)
    control = _real_query(hostile.rank_f(buyer.offer(max_samples=100), hostile.N_ROWS + 1, f=4096),
                          2 * 4096, hostile.N_ROWS + 1)
    out = hostile.run_in_child(tmp_path, path, buyer.offer(max_samples=100), {"control": control},
                               budget={"projection_memory_mb": 4096})["control"]
    # 2 x 4096^2 float64 matrices (256 MiB) were built before the records failed to fit Linear(1, F)
    assert out["error"] == "DataError" and out["rss_growth_mb"] > 200, out


def _real_query(offer_bytes, dim, rows):
    """The Offer with session keys and an encrypted query for the plan hostile.rank_f gave it: a seller
    parses the query before it builds anything, so the control must carry a real one to get that far."""
    msg = pb.Offer.FromString(offer_bytes)
    plan = plan_packing(dim, rows, HEParams(), query_copies=1)
    session_keys = SessionKeys.generate(plan)
    msg.public_context = session_keys.public_context_bytes()
    del msg.query[:]
    msg.query.extend(encrypt_query(session_keys, plan, np.ones(dim)))
    return msg.SerializeToString()


@pytest.mark.parametrize(
    "budget, limit",
    [
        ({"offer_work_s": 1e-6}, "offer_work_s"),
        ({"offer_memory_mb": 1, "in_flight_memory_mb": 1}, "offer_memory_mb"),
        ({"he_key_memory_mb": 1}, "he_key_memory_mb"),
    ],
)
def test_every_per_offer_limit_is_enforced_on_an_honest_offer_when_set_low(make_buyer, records, budget, limit):
    seller = hostile.target(records, budget=SellerBudgetConfig(**budget))
    with pytest.raises(ResourceLimitError) as refused:
        seller.respond(make_buyer().offer(max_samples=100))
    assert refused.value.limit == limit and f"seller-budget.{limit.replace('_', '-')}" in str(refused.value)


def test_the_default_work_limit_refuses_an_offer_far_above_an_honest_one():
    """A valid 2.4M-parameter MLP Offer costs a 60-record seller a few estimated seconds, but a
    50,000-record seller about 6 minutes: refused by a default seller (offer-work-s) before any work;
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
    assert small.cost(decode_offer(offers[200_000])).work_s < 30
    assert large.cost(decode_offer(offers[16])).work_s < 30
    with pytest.raises(ResourceLimitError, match=r"seller-budget\.offer-work-s") as refused:
        large.cost(decode_offer(offers[200_000]))
    assert refused.value.limit == "offer_work_s"


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


def test_message_limit_follows_the_budget_but_never_drops_below_grpcs_default():
    """A larger budget lets larger Offers in; a tiny one still receives gRPC's default 4 MiB, so a buyer
    is told why it was refused (the limit at work over a real server: test_budget_over_grpc.py)."""
    limits = [seller_message_limit(SellerBudgetConfig(offer_memory_mb=mb, in_flight_memory_mb=max(mb, 64)))
              for mb in (1, 24, 256, 4096)]
    assert limits[0] == limits[1] == 4 * MiB < limits[2] < limits[3]


def test_duplicate_layer_check_is_set_based_and_exact():
    layers = [LayerProjection(f"l{i}", 1, 1, 1, 1) for i in range(40_000)]
    ProjectionSpec(tuple(layers), seed=0)
    with pytest.raises(ConfigError, match=r"more than once: \['l17', 'l39999'\]"):
        ProjectionSpec(tuple([*layers, layers[17], layers[-1], layers[17]]), seed=0)


def test_caches_are_bounded_by_bytes_not_entries(make_buyer, records):
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

    hostile.target(records).respond(
        make_buyer().offer(max_samples=100)
    )
    assert 0 < _matrix.cache_bytes() <= MATRIX_CACHE_BYTES
    assert 0 < keys.context_cache_bytes() <= keys.SEAL_CONTEXT_CACHE_BYTES


def test_a_context_above_the_cache_bound_is_not_kept(make_buyer, records, monkeypatch):
    keys.clear_context_cache()
    monkeypatch.setattr(keys, "SEAL_CONTEXT_CACHE_BYTES", 1024)
    hostile.target(records).respond(
        make_buyer().offer(max_samples=100)
    )
    assert keys.context_cache_bytes() == 0
