"""Fit once, value many times: a PreparedQuery saved, loaded and used for real CKKS sessions.

A buyer made from a loaded query must value sellers exactly as the buyer that fitted it (same
spec seed, same query, same Offer terms), and both must match a plaintext reference. The saved
directory is the buyer's private objective: owner-only, and any edit to any file is refused.
"""

import json
import stat

import numpy as np
import pytest
import torch

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.tasks import get_task
from tip_fed.errors import ConfigError, DataError, VersionMismatchError
from tip_fed.protocol import Buyer, BuyerSettings, PreparedQuery, Seller, SellerPolicy
from tip_fed.protocol.prepared import FILES, MANIFEST
from tip_fed.wire.tip.v1 import valuation_pb2 as pb
from tip_fed.workflow import value

from ..conftest import TASK, make_data, plaintext_scores

SETTINGS = BuyerSettings(projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="kfac"),
                         protocol=ProtocolConfig(disclosure="per-sample"), seed=11)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    prepared = Buyer.prepare(model, TASK, make_data(40, 2, shift=0.5), make_data(120, 3), SETTINGS)
    return prepared, prepared.save(tmp_path_factory.mktemp("prep") / "query")


def _session(buyer, sellers):
    offer = buyer.offer(max_samples=100)
    policy = SellerPolicy(exact_per_sample=True)
    return offer, buyer.settle([Seller(s, d, seed=1, policy=policy).respond(offer) for s, d in sellers.items()],
                               expected=list(sellers))


def test_loaded_query_values_sellers_like_the_fitted_buyer(model, seller_data, saved):
    # Prepare
    direct = Buyer(model, TASK, make_data(40, 2, shift=0.5), make_data(120, 3), SETTINGS)
    loaded = Buyer.from_prepared(PreparedQuery.load(saved[1]))

    # Execute
    offers, valuations = zip(*(_session(b, seller_data) for b in (direct, loaded)), strict=True)

    # Assert: the same Offer terms (keys and ciphertexts are fresh per session) ...
    a, b = (pb.Offer.FromString(o) for o in offers)
    for msg in (a, b):
        msg.ClearField("session_id"), msg.ClearField("public_context"), msg.ClearField("query")
    assert a == b
    assert torch.equal(direct.query, loaded.query) and direct.spec == loaded.spec
    # ... and the same valuations, each matching the plaintext reference within CKKS noise
    tol = 1e-6 * direct.query_norm * direct.grad_norm_bound
    for vd, vl in zip(*(v.sellers for v in valuations), strict=True):
        plain = plaintext_scores(direct, model, seller_data[vd.seller_id])
        assert vd.seller_id == vl.seller_id and vd.n_samples == vl.n_samples == len(plain)
        for v in (vd, vl):
            assert np.max(np.abs(v.per_sample - plain)) <= tol
            assert abs(v.total - plain.sum()) <= len(plain) * tol
    # the loaded buyer rebuilds the model from the saved payload for anything that needs it
    x = seller_data["s1"]["x"]
    assert torch.equal(loaded.model(x), model(x))


def test_value_api_with_a_saved_directory_and_with_a_prepared_query(model, seller_data, saved):
    # a saved per-sample query: sellers on their default policy refuse exact per-sample scores, and each
    # refusal is a missing seller with its reason, not a crash
    refused = value(saved[1], seller_data)
    assert refused.sellers == [] and refused.missing == list(seller_data)
    assert all("per-sample" in reason for reason in refused.manifest["seller_failures"].values())

    # an aggregate query prepared through the front door: every seller valued, totals as in plaintext
    import tip_fed

    prepared = tip_fed.prepare(model, "classification", make_data(40, 2, shift=0.5),
                               settings=BuyerSettings(projection=ProjectionConfig(rank=4)))
    valuation = tip_fed.value(prepared, seller_data)
    assert [v.seller_id for v in valuation.sellers] == list(seller_data) and valuation.missing == []
    buyer = Buyer.from_prepared(prepared)
    for v in valuation.sellers:
        plain = plaintext_scores(buyer, model, seller_data[v.seller_id])
        assert v.per_sample is None
        assert abs(v.total - plain.sum()) <= len(plain) * 1e-6 * buyer.query_norm * buyer.grad_norm_bound


def test_files_are_owner_only(saved):
    directory = saved[1]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == sorted([*FILES, MANIFEST])
    assert {stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()} == {0o600}


def test_an_existing_open_directory_is_closed_to_others(saved, tmp_path):
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    (d / "prepared.json").write_text("{}")
    (d / "prepared.json").chmod(0o644)
    saved[0].save(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {0o600}
    assert torch.equal(PreparedQuery.load(d).query, saved[0].query)


def _copy(saved, tmp_path):
    out = tmp_path / "copy"
    saved[0].save(out)
    return out


@pytest.mark.parametrize("name", FILES)
def test_any_tampered_file_is_refused(saved, tmp_path, name):
    d = _copy(saved, tmp_path)
    raw = bytearray((d / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (d / name).write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{name} does not match its sha256"):
        PreparedQuery.load(d)


def test_a_tampered_query_with_a_rewritten_manifest_is_still_refused(saved, tmp_path):
    """Doubling the query and fixing the manifest's hash: the stated query norm no longer matches."""
    d = _copy(saved, tmp_path)
    from safetensors.torch import save as st_save

    data = st_save({"query": saved[0].query * 2})
    (d / "query.safetensors").write_bytes(data)
    manifest = json.loads((d / MANIFEST).read_text())
    import hashlib

    manifest["sha256"]["query.safetensors"] = hashlib.sha256(data).hexdigest()
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="query norm does not match"):
        PreparedQuery.load(d)


def test_missing_file_and_version_mismatch(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"model\.safetensors is missing"):
        PreparedQuery.load(d)
    d = _copy(saved, tmp_path / "v")
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["format_version"] = 99
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VersionMismatchError, match="format version 99"):
        PreparedQuery.load(d)
    with pytest.raises(DataError, match="not a prepared query"):
        PreparedQuery.load(tmp_path / "nowhere")


def test_task_must_match(saved):
    with pytest.raises(ConfigError, match="not the prepared query's task"):
        Buyer.from_prepared(saved[0], task=get_task("causal-lm"))


def test_a_new_objective_reuses_the_saved_preconditioner(model, saved):
    """Fit the curvature once, query many times: re-querying a loaded query for another objective gives
    what a full fit for that objective gives (same P, query and bound), computing only its gradients."""
    other = make_data(25, 9, shift=-0.4)
    fresh = Buyer.prepare(model, TASK, other, make_data(120, 3), SETTINGS)
    requeried = PreparedQuery.load(saved[1]).with_objective(other)
    assert torch.allclose(requeried.query, fresh.query, rtol=1e-12, atol=0)
    assert requeried.grad_norm_bound == pytest.approx(fresh.grad_norm_bound, rel=1e-12)
    assert not torch.allclose(requeried.query, saved[0].query)  # the objective changed the query
    with pytest.raises(ConfigError, match="fingerprints differ"):
        saved[0].with_objective(other, model=type(model)([10, 16, 2]))
