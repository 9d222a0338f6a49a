"""Post-purchase audit against malicious sellers (DESIGN §1.4: score inflation, data swapping).

Each cheating seller is a subclass of the real Seller overriding only the step it cheats in.
"""

import json
import stat

import pytest
import torch

from tip_fed.cli import main
from tip_fed.core.influence import clip_rows
from tip_fed.errors import DataError
from tip_fed.protocol import Seller
from tip_fed.protocol.audit import Delivery, SessionRecord, audit

from .conftest import make_data


class ScalingSeller(Seller):
    """Scales its gradients by 3 *before* clipping (so it still respects the public bound) and
    commits to the scaled ones: its reply is internally consistent, only the data betray it."""

    def projected_gradients(self, model, spec, task):
        return 3.0 * super().projected_gradients(model, spec, task)


class InflatingSeller(Seller):
    """Commits to its honest gradients but scores gradients scaled by 3 (clipped to the bound)."""

    def scoring_rows(self, committed, bound):
        scaled, _ = clip_rows(torch.from_numpy(3.0 * committed), bound)
        return scaled.numpy()


class SwappingSeller(Seller):
    """Scores its real records, then delivers other (honestly committed-looking) ones."""

    def __init__(self, *args, decoy, **kwargs):
        super().__init__(*args, **kwargs)
        self._decoy = Seller(self.seller_id, decoy)

    def deliver(self, session_id):
        real = super().deliver(session_id)
        return Delivery(data=dict(self._decoy._data), gradients=real.gradients)


def _session(make_buyer, sellers, disclosure="per-sample"):
    buyer = make_buyer(disclosure=disclosure)
    offer = buyer.offer(max_samples=100)
    valuation = buyer.settle([s.respond(offer) for s in sellers])
    assert valuation.rejected == {}
    return buyer, valuation, {s.seller_id: s.deliver(valuation.session_id) for s in sellers}


@pytest.mark.parametrize("disclosure", ["per-sample", "aggregate"])
def test_honest_sellers_pass_the_audit(make_buyer, seller_data, disclosure):
    sellers = [Seller(sid, d) for sid, d in seller_data.items()]
    buyer, valuation, deliveries = _session(make_buyer, sellers, disclosure)
    report = audit(buyer.record(valuation), deliveries)
    assert report.passed, report.to_markdown()
    for s in report.sellers:
        assert s.commitment_ok and s.flagged_samples == [] and s.max_gradient_deviation < 1e-6


@pytest.mark.parametrize("disclosure", ["per-sample", "aggregate"])
def test_seller_scaling_its_gradients_by_3_is_caught(make_buyer, seller_data, disclosure):
    honest, cheat = Seller("s0", seller_data["s0"]), ScalingSeller("s1", seller_data["s1"])
    buyer, valuation, deliveries = _session(make_buyer, [honest, cheat], disclosure)
    report = audit(buyer.record(valuation), deliveries).by_id()
    assert report["s0"].passed
    assert report["s1"].verdict == "gradient-mismatch"  # commitment matches: it committed to the scaled ones
    assert report["s1"].commitment_ok
    assert len(report["s1"].flagged_samples) == seller_data["s1"]["x"].shape[0]
    # delivered without its gradients, the same seller fails on the commitment instead
    bare = audit(buyer.record(valuation), {"s1": Delivery(data=deliveries["s1"].data)}).by_id()["s1"]
    assert bare.verdict == "commitment-mismatch" and not bare.commitment_ok
    assert bare.max_score_deviation > 100 * bare.score_tolerance


def test_seller_scoring_other_gradients_than_it_committed_is_caught(make_buyer, seller_data):
    cheat = InflatingSeller("s2", seller_data["s2"])
    buyer, valuation, deliveries = _session(make_buyer, [cheat])
    result = audit(buyer.record(valuation), deliveries).sellers[0]
    assert result.commitment_ok and result.max_gradient_deviation < 1e-6
    assert result.verdict == "score-mismatch"
    assert result.flagged_samples and result.max_score_deviation > 100 * result.score_tolerance


def test_seller_swapping_data_after_scoring_is_caught(make_buyer, seller_data):
    decoy = make_data(33, 999, shift=2.0)
    cheat = SwappingSeller("s1", seller_data["s1"], decoy=decoy)
    buyer, valuation, deliveries = _session(make_buyer, [cheat])
    result = audit(buyer.record(valuation), deliveries).sellers[0]
    assert result.verdict == "commitment-mismatch" and not result.commitment_ok
    assert "changed after scoring" in " ".join(result.reasons)
    # swapping a single record is enough
    one = {k: v.clone() for k, v in seller_data["s1"].items()}
    one["x"][7] += 0.5
    single = audit(buyer.record(valuation), {"s1": Delivery(data=one, gradients=deliveries["s1"].gradients)})
    assert not single.sellers[0].commitment_ok and 7 in single.sellers[0].flagged_samples


def test_delivering_fewer_records_is_caught(make_buyer, seller_data):
    buyer, valuation, deliveries = _session(make_buyer, [Seller("s1", seller_data["s1"])])
    short = Delivery(data={k: v[:-1] for k, v in deliveries["s1"].data.items()})
    result = audit(buyer.record(valuation), {"s1": short}).sellers[0]
    assert not result.passed and not result.n_samples_ok


def test_audit_of_unknown_seller_is_a_data_error(make_buyer, seller_data):
    buyer, valuation, deliveries = _session(make_buyer, [Seller("s0", seller_data["s0"])])
    with pytest.raises(DataError, match="not valued"):
        audit(buyer.record(valuation), {"nobody": deliveries["s0"]})


def test_tip_fed_audit_cli_writes_reports_and_flags(make_buyer, seller_data, tmp_path, capsys):
    sellers = [Seller("s0", seller_data["s0"]), ScalingSeller("s1", seller_data["s1"])]
    buyer, valuation, deliveries = _session(make_buyer, sellers)
    record_path = buyer.record(valuation).save(tmp_path / "session.json")
    assert stat.S_IMODE(record_path.stat().st_mode) == 0o600  # holds the private query and model
    args = ["audit", str(record_path), "--out", str(tmp_path / "audit")]
    for sid, d in deliveries.items():
        args += ["--delivery", f"{sid}={d.save(tmp_path / f'{sid}.safetensors')}"]
    assert main(args) == 1  # flagged
    data = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert not data["passed"]
    assert {s["seller_id"]: s["verdict"] for s in data["sellers"]} == {"s0": "ok", "s1": "gradient-mismatch"}
    assert "gradient-mismatch" in (tmp_path / "audit" / "audit.md").read_text()
    assert SessionRecord.load(record_path).session_id == valuation.session_id
    assert main(["audit", str(record_path), "--delivery", "s0=" + str(tmp_path / "s0.safetensors"),
                 "--out", str(tmp_path / "ok")]) == 0
    assert main(["audit", str(tmp_path / "missing.json"), "--delivery", "s0=x"]) == 2
    assert main(["audit", str(record_path), "--delivery", "no-equals-sign"]) == 2
    assert "error" in capsys.readouterr().err


def test_session_record_holds_no_key_material(make_buyer, seller_data):
    buyer = make_buyer()
    offer = buyer.offer(max_samples=100)
    secret = buyer._sessions[buyer.session_id].keys.secret_key_bytes_for_test()
    valuation = buyer.settle([Seller("s0", seller_data["s0"]).respond(offer)])
    text = json.dumps(buyer.record(valuation).to_dict())
    import base64

    assert base64.b64encode(secret[:48]).decode() not in text and secret[:48].hex() not in text
    assert torch.is_tensor(buyer.query)
