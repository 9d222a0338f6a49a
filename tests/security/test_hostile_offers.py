"""Hostile offers found by (or written after) fuzzing: each is a clean TipError on the seller."""

import json

import pytest

from tip_fed.core.models import MLP
from tip_fed.errors import DataError, ModelError, ProtocolError
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.model import encode_model, fingerprint
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from . import hostile


def _offer_with_model(offer_bytes, payload):
    offer = pb.Offer.FromString(offer_bytes)
    offer.model.CopyFrom(payload)
    return offer.SerializeToString()


def test_model_config_bomb_is_refused_before_allocation(make_buyer, seller_data, tmp_path):
    """A 10-billion-parameter config with the fingerprint recomputed (anyone can): refused on the
    meta device, so a fresh seller process's peak RSS does not grow, instead of allocating 40 GB."""
    buyer = make_buyer()
    offer = pb.Offer.FromString(buyer.offer(max_samples=100))
    m = offer.model
    m.config_json = json.dumps({"sizes": [10, 100_000, 100_000, 2]})
    m.fingerprint = fingerprint(m.architecture, m.config_json, m.weights)
    with pytest.raises(ModelError, match="refused before building it"):
        Seller("s0", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True)).respond(offer.SerializeToString())
    data = save_dataset(seller_data["s0"], tmp_path / "s0.safetensors")
    out = hostile.run_in_child(tmp_path, data, buyer.offer(max_samples=100), {"bomb": offer.SerializeToString()})
    assert out["bomb"]["error"] == "ModelError" and out["bomb"]["rss_growth_mb"] < 48, out


@pytest.mark.parametrize("config", ['{"sizes": [1, "a"]}', '{"sizes": 5}', '{"sizes": [2, null]}'])
def test_malformed_model_configs_are_model_errors(make_buyer, seller_data, config):
    buyer = make_buyer()
    offer = pb.Offer.FromString(buyer.offer(max_samples=100))
    m = offer.model
    m.config_json = config
    m.fingerprint = fingerprint(m.architecture, m.config_json, m.weights)
    with pytest.raises(ModelError):
        Seller("s0", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True)).respond(offer.SerializeToString())


def test_model_that_does_not_fit_the_sellers_records_is_a_data_error(make_buyer, seller_data):
    """A consistent, fingerprinted model for 7 input features sent to a seller holding 10."""
    buyer = make_buyer()
    offer = pb.Offer.FromString(_offer_with_model(buyer.offer(max_samples=100), encode_model(MLP([7, 16, 2]))))
    offer.projection.layers[0].in_features = 7  # spec consistent with the model, not with the data
    offer = offer.SerializeToString()
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(max_queries_per_session=5, exact_per_sample=True))
    with pytest.raises(DataError, match="do not fit the model"):
        seller.respond(offer)


def test_model_config_with_a_huge_module_count_is_refused_before_building(make_buyer, seller_data):
    """sizes = [1] * 40,001 is a 120 KB config asking for 40,000 modules (any count, at 3 bytes a
    layer): refused when the Offer is decoded, before any skeleton is built."""
    offer = pb.Offer.FromString(make_buyer().offer(max_samples=100))
    m = offer.model
    m.config_json = json.dumps({"sizes": [1] * 40_001})
    m.fingerprint = fingerprint(m.architecture, m.config_json, m.weights)
    with pytest.raises(ProtocolError, match="model config is 120014 characters, above the 65536"):
        Seller("s0", seller_data["s0"]).respond(offer.SerializeToString())
