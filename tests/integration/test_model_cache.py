"""Offers by model reference: a seller's model cache, over a real gRPC service on 127.0.0.1 and in process.

A repeat session ships no weights and still values exactly as a full Offer does; a seller lacking
the model says so before spending anything; a reference never overrides what a fingerprint was
computed over; unverified weights and tampered cache files never reach a model; the cache stays
inside its byte bound.
"""

import json
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.models import MLP
from tip_fed.errors import FingerprintMismatchError, ModelError, ModelNotHeldError, ProtocolError
from tip_fed.grpc import SellerEndpoint, start_server, value_sellers
from tip_fed.grpc.client import OfferSent
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.ledger import LedgerPolicy
from tip_fed.protocol.model import encode_model, fingerprint
from tip_fed.protocol.model_cache import ModelCache, strip_weights
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import TASK, make_data, plaintext_scores

UNCAPPED = LedgerPolicy(max_exact=None, total_max_exact=None)
MiB = 1 << 20


def _buyer(model):
    settings = BuyerSettings(
        projection=ProjectionConfig(rank=4),
        preconditioner=PreconditionerConfig(kind="identity"),
        protocol=ProtocolConfig(disclosure="per-sample"),
    )
    return Buyer(model, TASK, objective=make_data(20, 2, 0.5), train=make_data(40, 3), settings=settings)


def _mlp(sizes, seed=0):
    torch.manual_seed(seed)
    return MLP(sizes).eval()


@pytest.fixture(scope="module")
def big():
    """A model whose weights (~67 MB) dwarf the rest of an Offer (public context and query, a few MB)."""
    return _mlp([10, 4096, 4096, 2])


@pytest.fixture(scope="module")
def small():
    return _mlp([10, 8, 2])


def _policy(**kw):
    return SellerPolicy(exact_per_sample=True, lifetime=UNCAPPED, **kw)


def test_a_repeat_session_ships_no_weights_and_values_the_same(big):
    # Prepare
    data = make_data(12, 7, 0.3)
    weights = len(encode_model(big).weights)
    buyer = _buyer(big)
    running = start_server(Seller("clinic", data, policy=_policy(model_cache_mb=256)), insecure=True)
    endpoint = [SellerEndpoint("clinic", running.address)]
    rounds = []
    # Execute: two sessions over the real service
    try:
        for _ in range(2):
            sent: dict[str, OfferSent] = {}
            replies, failures = value_sellers(endpoint, buyer.offer(max_samples=50), insecure=True, timeout_s=120,
                                              sent=sent)
            assert failures == {}
            rounds.append((buyer.settle(list(replies.values()), expected=["clinic"]), sent["clinic"]))
    finally:
        running.stop(0)
    reference = buyer.settle([Seller("clinic", data, policy=_policy()).respond(buyer.offer(max_samples=50))])
    # Assert
    (first, first_sent), (second, second_sent) = rounds
    assert first_sent.weights_shipped and first_sent.offer_bytes >= weights
    assert not second_sent.weights_shipped and second_sent.offer_bytes < weights / 10
    assert json.dumps(second_sent.to_dict())  # a manifest can carry it
    plain = plaintext_scores(buyer, big, data)
    expected = reference.sellers[0].per_sample
    assert np.max(np.abs(expected - plain)) <= 1e-5 * np.abs(plain).max()
    for valuation in (first, second):
        got = valuation.sellers[0].per_sample
        assert np.max(np.abs(got - expected)) <= 1e-5 * np.abs(expected).max()
        assert abs(valuation.sellers[0].total - reference.sellers[0].total) <= 1e-5 * np.abs(expected).sum()


def test_an_unknown_reference_spends_nothing_and_the_full_offer_is_answered(small):
    # Default ledger: one exact answer per buyer; query budget 1 per session.
    seller = Seller("s", make_data(6, 1), policy=SellerPolicy(exact_per_sample=True, model_cache_mb=16))
    buyer = _buyer(small)
    offer = buyer.offer(max_samples=10)
    with pytest.raises(ModelNotHeldError, match=r"^model-not-held: seller s holds no model") as info:
        seller.respond(strip_weights(offer))
    assert info.value.fingerprint == buyer.model_fingerprint
    reply = seller.respond(offer)  # same session: budget and ledger untouched by the refusal
    assert buyer.settle([reply]).sellers[0].seller_id == "s"
    assert seller.models.fingerprints() == [buyer.model_fingerprint]


def test_by_reference_off_always_ships_weights(small):
    running = start_server(Seller("s", make_data(6, 1), policy=_policy(model_cache_mb=16)), insecure=True)
    endpoint = [SellerEndpoint("s", running.address)]
    buyer = _buyer(small)
    try:
        sent: dict[str, OfferSent] = {}
        for _ in range(2):
            offer = buyer.offer(max_samples=10)
            _, failures = value_sellers(endpoint, offer, insecure=True, timeout_s=60, by_reference=False,
                                              sent=sent)
            assert failures == {} and sent["s"] == OfferSent(len(pb.ValueRequest(offer=pb.Offer.FromString(offer))
                                                                 .SerializeToString()), True)
    finally:
        running.stop(0)


def _held_seller(model, **kw):
    seller = Seller("s", make_data(6, 1), policy=_policy(model_cache_mb=16, **kw))
    buyer = _buyer(model)
    seller.respond(buyer.offer(max_samples=10))
    return seller, buyer


@pytest.mark.parametrize("field, value", [
    ("config_json", json.dumps({"sizes": [10, 8, 3]}, sort_keys=True)),
    ("architecture", "GPT2LMHeadModel"),
])
def test_a_reference_with_another_config_or_architecture_is_refused(small, field, value):
    seller, buyer = _held_seller(small)
    offer = pb.Offer.FromString(strip_weights(buyer.offer(max_samples=10)))
    setattr(offer.model, field, value)  # claims the cached fingerprint for another model
    with pytest.raises(ModelNotHeldError):  # the same answer as for a model never seen: no oracle
        seller.respond(offer.SerializeToString())


def _refusal(seller, offer, peer):
    with pytest.raises(ModelNotHeldError) as info:
        seller.respond(offer, peer=peer)
    return str(info.value).replace(pb.Offer.FromString(offer).model.fingerprint[:16], "<fp>")


def test_a_reference_never_reveals_or_lends_another_buyers_model(small):
    # Prepare: alice uploads her model; mallory knows its fingerprint, architecture and config, not its weights
    seller = Seller("s", make_data(6, 1), policy=_policy(model_cache_mb=16))
    alice = _buyer(small)
    seller.respond(alice.offer(max_samples=10), peer="alice")
    mallory = _buyer(_mlp([10, 8, 2], seed=7))
    mine = pb.Offer.FromString(mallory.offer(max_samples=10))
    riding = pb.Offer()
    riding.CopyFrom(mine)
    riding.model.CopyFrom(pb.Offer.FromString(alice.offer(max_samples=10)).model)
    riding.model.ClearField("weights")
    probes = {}
    for name, fp, config in [("alice's, right config", alice.model_fingerprint, riding.model.config_json),
                             ("alice's, wrong config", alice.model_fingerprint, '{"x": 1}'),
                             ("random", "ab" * 32, riding.model.config_json)]:
        probe = pb.Offer()
        probe.CopyFrom(riding)
        probe.model.fingerprint, probe.model.config_json = fp, config
        probes[name] = _refusal(seller, probe.SerializeToString(), "mallory")
    # Assert: one identical refusal for every probe, nothing charged, and the anonymous identity is another peer
    assert len(set(probes.values())) == 1, probes
    assert seller._ledger._state["buyers"].get("mallory") is None
    _refusal(seller, riding.SerializeToString(), None)
    # alice herself still answers by reference; mallory who uploads the same weights may then reference them too
    assert alice.settle([seller.respond(strip_weights(alice.offer(max_samples=10)), peer="alice")]).sellers
    seller.respond(mine.SerializeToString(), peer="mallory")
    assert mallory.settle([seller.respond(strip_weights(mallory.offer(max_samples=10)), peer="mallory")]).sellers


def test_uploaders_are_persisted_with_the_cache_and_bounded(small, tmp_path):
    from tip_fed.protocol.model_cache import MAX_UPLOADERS, uploader_id

    payload = encode_model(small)
    cache = ModelCache(16 * MiB, tmp_path)
    for i in range(MAX_UPLOADERS + 3):
        assert cache.admit(payload, f"peer-{i}")
    cache.admit(payload, None)
    reference = pb.ModelPayload()
    reference.CopyFrom(payload)
    reference.ClearField("weights")
    restarted = ModelCache(16 * MiB, tmp_path)  # a fresh process over the same directory
    assert restarted.resolve(reference, "s", None) is not None
    assert restarted.resolve(reference, "s", f"peer-{MAX_UPLOADERS + 2}") is not None
    for peer in ("peer-0", "peer-3", "stranger"):  # the oldest uploaders are forgotten; strangers never known
        with pytest.raises(ModelNotHeldError):
            restarted.resolve(reference, "s", peer)
    assert len(restarted.uploaders(payload.fingerprint)) == MAX_UPLOADERS
    assert "peer-5" not in (tmp_path / f"{payload.fingerprint}.peers").read_text()  # only digests are stored
    assert uploader_id("peer-5") in restarted.uploaders(payload.fingerprint)


def test_weights_that_do_not_match_their_fingerprint_never_enter_the_cache(small):
    seller = Seller("s", make_data(6, 1), policy=_policy(model_cache_mb=16))
    buyer = _buyer(small)
    offer = pb.Offer.FromString(buyer.offer(max_samples=10))
    w = bytearray(offer.model.weights)
    w[-1] ^= 0x01
    offer.model.weights = bytes(w)
    with pytest.raises(FingerprintMismatchError):
        seller.respond(offer.SerializeToString())
    # an attacker who recomputes the fingerprint over weights that do not fit the model
    offer.model.weights = encode_model(_mlp([10, 9, 2])).weights
    offer.model.fingerprint = fingerprint(offer.model.architecture, offer.model.config_json, offer.model.weights)
    with pytest.raises(ModelError):
        seller.respond(offer.SerializeToString())
    assert seller.models.fingerprints() == []
    with pytest.raises(ModelNotHeldError):
        seller.respond(strip_weights(offer.SerializeToString()))


def test_a_tampered_cache_file_is_refused_and_the_weights_requested_again(small, tmp_path):
    # Prepare: a seller that persisted the model, then a restart over a tampered file
    cache_dir = tmp_path / "models"
    _held_seller(small, model_cache_dir=str(cache_dir))
    (path,) = cache_dir.glob("*.model")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    restarted = Seller("s", make_data(6, 1), policy=_policy(model_cache_mb=16, model_cache_dir=str(cache_dir)))
    assert restarted.models.get(path.stem) is not None  # an intact file is loaded and re-verified
    blob = bytearray(path.read_bytes())
    blob[-40] ^= 0x01
    path.write_bytes(bytes(blob))
    tampered = Seller("s", make_data(6, 1), policy=_policy(model_cache_mb=16, model_cache_dir=str(cache_dir)))
    running = start_server(tampered, insecure=True)
    buyer = _buyer(small)
    sent: dict[str, OfferSent] = {}
    # Execute
    try:
        replies, failures = value_sellers([SellerEndpoint("s", running.address)], buyer.offer(max_samples=10),
                                          insecure=True, timeout_s=60, sent=sent)
    finally:
        running.stop(0)
    # Assert: refused, re-requested with weights, answered, and the file rewritten from verified bytes
    assert failures == {} and sent["s"].weights_shipped
    assert buyer.settle(list(replies.values())).sellers[0].seller_id == "s"
    assert ModelCache(16 * MiB, cache_dir).get(buyer.model_fingerprint) is not None


def test_the_byte_bound_evicts_the_least_recently_used_model(tmp_path):
    payloads = [encode_model(_mlp([10, 64, 2], seed=i)) for i in range(3)]
    size = len(payloads[0].weights)
    cache = ModelCache(2 * size + size // 2, tmp_path)
    assert cache.admit(payloads[0]) and cache.admit(payloads[1])
    assert cache.get(payloads[0].fingerprint) is not None  # 0 is now more recent than 1
    assert cache.admit(payloads[2])
    fps = [p.fingerprint for p in payloads]
    assert cache.fingerprints() == [fps[0], fps[2]] and cache.nbytes <= cache.max_bytes
    assert sorted(p.stem for p in tmp_path.glob("*.model")) == sorted([fps[0], fps[2]])
    assert ModelCache(cache.max_bytes, tmp_path).get(fps[1]) is None


def test_a_model_above_the_bound_is_answered_but_not_held():
    model = _mlp([10, 512, 512, 2])  # ~1.1 MB of weights, above a 1 MiB cache
    assert len(encode_model(model).weights) > MiB
    seller = Seller("s", make_data(6, 1), policy=_policy(model_cache_mb=1))
    buyer = _buyer(model)
    assert buyer.settle([seller.respond(buyer.offer(max_samples=10))]).sellers[0].seller_id == "s"
    assert seller.models.fingerprints() == []
    with pytest.raises(ModelNotHeldError):
        seller.respond(strip_weights(buyer.offer(max_samples=10)))


def test_a_seller_without_a_cache_asks_for_the_weights_every_time(small):
    seller = Seller("s", make_data(6, 1), policy=_policy(model_cache_mb=0))
    buyer = _buyer(small)
    seller.respond(buyer.offer(max_samples=10))
    with pytest.raises(ModelNotHeldError):
        seller.respond(strip_weights(buyer.offer(max_samples=10)))


def test_a_held_model_still_meets_the_expected_fingerprint(small):
    seller, buyer = _held_seller(small)
    seller.policy.expected_fingerprint = "f" * 64
    with pytest.raises(FingerprintMismatchError, match="not the one this seller was told to expect"):
        seller.respond(strip_weights(buyer.offer(max_samples=10)))


def test_seller_serve_keeps_verified_models_in_its_cache_dir_across_restarts(small, tmp_path):
    """The real ``tip-fed seller serve`` process: --model-cache-dir survives a restart, files are 0600."""
    data = save_dataset(make_data(6, 1), tmp_path / "s.safetensors")
    cache_dir = tmp_path / "models"
    buyer = _buyer(small)
    shipped = []
    for _ in range(2):  # the second process starts with only what the first left on disk
        proc = subprocess.Popen(
            [sys.executable, "-m", "tip_fed.cli", "seller", "serve", "--data", str(data), "--port", "0", "--insecure",
             "--exact-per-sample", "--max-exact", "-1", "--total-max-exact", "-1", "--model-cache-mb", "16",
             "--model-cache-dir", str(cache_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            match = re.search(r"ready on (127\.0\.0\.1:\d+) ", proc.stdout.readline())
            assert match, "the seller did not start"
            sent: dict[str, OfferSent] = {}
            replies, failures = value_sellers([SellerEndpoint("s", match.group(1))], buyer.offer(max_samples=10),
                                              insecure=True, timeout_s=60, sent=sent)
            assert failures == {} and buyer.settle(list(replies.values())).sellers[0].seller_id == "s"
            shipped.append(sent["s"].weights_shipped)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert shipped == [True, False]
    (path,) = cache_dir.glob("*.model")
    assert path.stem == buyer.model_fingerprint and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_reference_must_name_a_sha256_fingerprint_and_an_architecture(small):
    seller, buyer = _held_seller(small)
    offer = pb.Offer.FromString(strip_weights(buyer.offer(max_samples=10)))
    offer.model.fingerprint = "../../etc/passwd"
    with pytest.raises(ProtocolError, match="expected 64 hex characters"):
        seller.respond(offer.SerializeToString())
    offer.model.fingerprint, offer.model.architecture = buyer.model_fingerprint, ""
    with pytest.raises(ProtocolError, match="without naming its architecture"):
        seller.respond(offer.SerializeToString())


def test_strip_weights_keeps_everything_but_the_weights(small):
    offer = _buyer(small).offer(max_samples=10)
    stripped = pb.Offer.FromString(strip_weights(offer))
    original = pb.Offer.FromString(offer)
    assert original.model.weights and not stripped.model.weights
    assert stripped.model.fingerprint == original.model.fingerprint != ""
    original.model.ClearField("weights")
    assert stripped == original
    with pytest.raises(ProtocolError, match=r"not a valid tip\.v1 Offer"):
        strip_weights(b"\xff\xfe garbage")
