"""Post-purchase audit against malicious sellers (DESIGN §1.4: score inflation, data swapping).

Each cheating seller is a subclass of the real Seller overriding only the step it cheats in.
"""

import json
import stat

import numpy as np
import pytest
import torch

from tip_fed.cli import main
from tip_fed.core.influence import clip_rows
from tip_fed.errors import DataError
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.audit import Delivery, SessionRecord, audit
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.testing import buyer_session, secret_key_bytes

from ..conftest import make_data

# these sellers release exact per-sample scores (the audit without noise); noisy audits below
EXACT = SellerPolicy(exact_per_sample=True)


class ScalingSeller(Seller):
    """Scales its gradients by 3 *before* clipping (so it still respects the public bound) and
    commits to the scaled ones: its reply is internally consistent, only the data betray it."""

    def projected_gradients(self, model, spec, task):
        return 3.0 * super().projected_gradients(model, spec, task)


class InflatingSeller(Seller):
    """Commits to its honest gradients but scores gradients scaled by 3 (clipped to the bound)."""

    def encrypted_scores(self, offer, context, rows, release):
        scaled, _ = clip_rows(torch.from_numpy(3.0 * rows), 1.0)  # rows are in units of the bound
        return super().encrypted_scores(offer, context, scaled.numpy(), release)


class SwappingSeller(Seller):
    """Scores its real records, then delivers other (honestly committed-looking) ones."""

    def __init__(self, *args, decoy, **kwargs):
        super().__init__(*args, **kwargs)
        self._decoy = Seller(self.seller_id, decoy)

    def deliver(self, session_id):
        real = super().deliver(session_id)
        return Delivery(data=dict(self._decoy._data), gradients=real.gradients, salt_seed=real.salt_seed)


def _session(make_buyer, sellers, disclosure="per-sample"):
    buyer = make_buyer(disclosure=disclosure)
    offer = buyer.offer(max_samples=200)
    valuation = buyer.settle([s.respond(offer) for s in sellers])
    assert valuation.rejected == {}
    return buyer, valuation, {s.seller_id: s.deliver(valuation.session_id) for s in sellers}


@pytest.mark.parametrize("disclosure", ["per-sample", "aggregate"])
def test_honest_sellers_pass_the_audit(make_buyer, seller_data, disclosure):
    sellers = [Seller(sid, d, policy=EXACT) for sid, d in seller_data.items()]
    buyer, valuation, deliveries = _session(make_buyer, sellers, disclosure)
    report = audit(buyer.record(valuation), deliveries)
    assert report.passed, report.to_markdown()
    for s in report.sellers:
        assert s.commitment_ok and s.flagged_samples == [] and s.max_gradient_deviation < 1e-6


@pytest.mark.parametrize("disclosure", ["per-sample", "aggregate"])
def test_seller_scaling_its_gradients_by_3_is_caught(make_buyer, seller_data, disclosure):
    honest, cheat = Seller("s0", seller_data["s0"], policy=EXACT), ScalingSeller("s1", seller_data["s1"], policy=EXACT)
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
    cheat = InflatingSeller("s2", seller_data["s2"], policy=EXACT)
    buyer, valuation, deliveries = _session(make_buyer, [cheat])
    result = audit(buyer.record(valuation), deliveries).sellers[0]
    assert result.commitment_ok and result.max_gradient_deviation < 1e-6
    assert result.verdict == "score-mismatch"
    assert result.flagged_samples and result.max_score_deviation > 100 * result.score_tolerance


def test_seller_swapping_data_after_scoring_is_caught(make_buyer, seller_data):
    decoy = make_data(33, 999, shift=2.0)
    cheat = SwappingSeller("s1", seller_data["s1"], decoy=decoy, policy=EXACT)
    buyer, valuation, deliveries = _session(make_buyer, [cheat])
    result = audit(buyer.record(valuation), deliveries).sellers[0]
    assert result.verdict == "commitment-mismatch" and not result.commitment_ok
    assert "changed after scoring" in " ".join(result.reasons)
    # swapping a single record is enough
    one = {k: v.clone() for k, v in seller_data["s1"].items()}
    one["x"][7] += 0.5
    single = audit(buyer.record(valuation), {"s1": Delivery(data=one, gradients=deliveries["s1"].gradients,
                                                                  salt_seed=deliveries["s1"].salt_seed)})
    assert not single.sellers[0].commitment_ok and 7 in single.sellers[0].flagged_samples


def test_delivering_fewer_records_is_caught(make_buyer, seller_data):
    buyer, valuation, deliveries = _session(make_buyer, [Seller("s1", seller_data["s1"], policy=EXACT)])
    short = Delivery(data={k: v[:-1] for k, v in deliveries["s1"].data.items()})
    result = audit(buyer.record(valuation), {"s1": short}).sellers[0]
    assert not result.passed and not result.n_samples_ok


def test_audit_of_unknown_seller_is_a_data_error(make_buyer, seller_data):
    buyer, valuation, deliveries = _session(make_buyer, [Seller("s0", seller_data["s0"], policy=EXACT)])
    with pytest.raises(DataError, match="not valued"):
        audit(buyer.record(valuation), {"nobody": deliveries["s0"]})


def test_tip_fed_audit_cli_writes_reports_and_flags(make_buyer, seller_data, tmp_path, capsys):
    sellers = [Seller("s0", seller_data["s0"], policy=EXACT), ScalingSeller("s1", seller_data["s1"], policy=EXACT)]
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
    secret = secret_key_bytes(buyer_session(buyer).keys)
    valuation = buyer.settle([Seller("s0", seller_data["s0"], policy=EXACT).respond(offer)])
    text = json.dumps(buyer.record(valuation).to_dict())
    import base64

    assert base64.b64encode(secret[:48]).decode() not in text and secret[:48].hex() not in text
    assert torch.is_tensor(buyer.query)


# ---- noise committed to by seed, forgery and padding (threat model S2, S9, S10) ------------------
class ForgingSeller(Seller):
    """Answers honestly with DP noise, then replaces its encrypted total by an encryption of a value
    of its choice (it holds the public key), and claims a tiny epsilon so the declared noise is huge."""

    def __init__(self, *args, forged_slot_value, **kwargs):
        super().__init__(*args, **kwargs)
        self.forged = forged_slot_value

    def respond(self, offer_bytes, *, peer=None):
        import tenseal.sealapi as sa

        from tip_fed.crypto.codec import seal_to_bytes
        from tip_fed.crypto.keys import load_public_context
        from tip_fed.protocol.disclosure import NoisePolicy
        from tip_fed.protocol.offer import decode_offer
        from tip_fed.wire.tip.v1 import valuation_pb2 as pb

        reply = pb.Reply.FromString(super().respond(offer_bytes, peer=peer, authenticated=True))
        offer = decode_offer(offer_bytes)
        plan = offer.plan
        ctx = load_public_context(offer.public_context, plan)
        h = ctx.handles
        r = plan.block_rows(1)[0]
        values = np.zeros(plan.slots)
        values[plan.output_slots(r, 1)] = self.forged
        pt, ct = sa.Plaintext(), sa.Ciphertext()
        scale = h.output_scale(masked=plan.diagonals(r) < plan.chunk_dim)
        h.encoder.encode(values.tolist(), h.first_parms_id, scale, pt)
        ctx.encryptor.encrypt(pt, ct)
        h.evaluator.mod_switch_to_inplace(ct, h.last_parms_id)
        del reply.scores[:]
        reply.scores.append(seal_to_bytes(ct, "forged"))
        reply.dp_epsilon, reply.dp_delta = 0.1, 1e-6  # "my noise is enormous, tolerate anything"
        reply.noise_std = NoisePolicy(0.1, 1e-6).gradient_std
        return reply.SerializeToString()




@pytest.mark.parametrize("disclosure,eps", [("aggregate", 1.0), ("per-sample", 4.0)])
def test_noisy_sellers_are_audited_exactly_through_their_revealed_seed(
    make_buyer, seller_data, disclosure, eps, tmp_path
):
    sellers = [Seller(sid, d, policy=SellerPolicy(noise=NoisePolicy(eps))) for sid, d in seller_data.items()]
    buyer, valuation, deliveries = _session(make_buyer, sellers, disclosure)
    record = buyer.record(valuation)
    report = audit(record, deliveries)
    assert report.passed, report.to_markdown()
    for s in report.sellers:
        v = valuation.by_id()[s.seller_id]
        # no allowance for the noise: the tolerance is far below one noise std
        assert s.score_tolerance < 1e-3 * v.noise["std"] and s.max_score_deviation <= s.score_tolerance
    # the seed travels in the delivery file
    d = deliveries["s1"]
    loaded = Delivery.load(d.save(tmp_path / "s1.safetensors"))
    assert loaded.noise_seed == d.noise_seed and len(d.noise_seed) == 32
    assert loaded.salt_seed == d.salt_seed and len(d.salt_seed) == 32
    assert audit(record, {"s1": loaded}).passed
    # without the seed, or with another seed, the noise cannot be checked: flagged
    for seed in (None, bytes(32)):
        bad = audit(
            record, {"s1": Delivery(data=d.data, gradients=d.gradients, noise_seed=seed, salt_seed=d.salt_seed)}
        ).sellers[0]
        assert bad.verdict == "noise-mismatch", bad.reasons


def test_forged_total_with_a_fake_noise_claim_is_caught(make_buyer, seller_data):
    """A seller encrypting a total of its choice and claiming noise it never added (which used to
    widen the audit tolerance to most of the score range) is flagged: the revealed seed pins the noise."""
    from tip_fed.protocol.buyer import QUERY_NORM

    honest = Seller("s0", seller_data["s0"], policy=SellerPolicy(noise=NoisePolicy(1.0)))
    forger = ForgingSeller(
        "s1", seller_data["s1"], policy=SellerPolicy(noise=NoisePolicy(1.0)), forged_slot_value=0.9 * QUERY_NORM
    )
    buyer, valuation, deliveries = _session(make_buyer, [honest, forger], "aggregate")
    v = valuation.by_id()
    n = seller_data["s1"]["x"].shape[0]  # the forgery went through settlement: 0.9 of the largest possible total
    assert v["s1"].total == pytest.approx(0.9 * buyer.query_norm * buyer.grad_norm_bound * n, rel=1e-4)
    report = audit(buyer.record(valuation), deliveries).by_id()
    assert report["s0"].passed
    assert report["s1"].verdict == "score-mismatch", report["s1"].reasons
    # the deviation is the forged total minus the honest total plus the seller's (random) noise draw,
    # so its size varies from run to run; it stays orders of magnitude above the tolerance
    assert report["s1"].total_deviation > 100 * report["s1"].score_tolerance
    print(
        f"\nforged total {v['s1'].total:.4g} vs honest recomputation; deviation {report['s1'].total_deviation:.4g},"
        f" tolerance {report['s1'].score_tolerance:.3g}"
    )


def test_a_dataset_duplicated_5_times_is_flagged(make_buyer, seller_data):
    base = seller_data["s1"]
    padded = {k: v.repeat(5, *([1] * (v.ndim - 1))) for k, v in base.items()}
    jitter = {k: v.clone() for k, v in base.items()}
    jitter["x"] = torch.cat([jitter["x"], jitter["x"][:10] + 1e-5])  # near-duplicates of 10 records
    jitter["y"] = torch.cat([jitter["y"], jitter["y"][:10]])
    sellers = [
        Seller("honest", base, policy=EXACT),
        Seller("padded", padded, policy=EXACT),
        Seller("jitter", jitter, policy=EXACT),
    ]
    buyer, valuation, deliveries = _session(make_buyer, sellers, "aggregate")
    v = valuation.by_id()
    assert v["padded"].total == pytest.approx(5 * v["honest"].total, rel=1e-4)  # padding inflates 5x
    report = audit(buyer.record(valuation), deliveries).by_id()
    assert report["honest"].passed
    n = base["x"].shape[0]
    assert report["padded"].verdict == "duplicate-records"
    assert report["padded"].flagged_samples == list(range(n, 5 * n))
    assert report["jitter"].verdict == "duplicate-records"
    assert report["jitter"].flagged_samples == list(range(n, n + 10))


def test_another_buyer_replaying_the_offer_cannot_frame_an_honest_seller(make_buyer, seller_data):
    """Mallory resends Alice's exact Offer bytes to a noised seller. Mallory is answered under her
    own (session, peer) entry; what Alice audits is still what Alice was answered with."""
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(noise=NoisePolicy(1.0, 1e-6)))
    alice = make_buyer(disclosure="aggregate")
    offer = alice.offer(max_samples=200)
    reply = seller.respond(offer, peer="CN=alice", authenticated=True)
    seller.respond(offer, peer="CN=mallory", authenticated=True)  # answered: her own budget, a fresh noise seed
    valuation = alice.settle([reply])
    delivered = seller.deliver(valuation.session_id, peer="CN=alice")
    report = audit(alice.record(valuation), {"s0": delivered})
    assert report.passed, report.to_markdown()
    mallorys = seller.deliver(valuation.session_id, peer="CN=mallory")
    assert mallorys.noise_seed != delivered.noise_seed  # two answers, two commitments, neither replaced
    assert not audit(alice.record(valuation), {"s0": mallorys}).passed  # the seeds are what the audit checks
