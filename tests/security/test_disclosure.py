"""Disclosure controls against a curious or malicious buyer (DESIGN §1.4).

Aggregate-only by default, per-session query budget, seller-side Gaussian noise in gradient space
with a stated (epsilon, delta) that nothing the buyer declares can change, per-sample scores only
with noise, rounded releases, and result slots that carry nothing but the requested scores.
"""

import math

import numpy as np
import pytest
from scipy import stats

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.crypto.packing import encrypt_query
from tip_fed.crypto.params import DEFAULT_FILL_BOUND
from tip_fed.errors import BudgetExceededError, ConfigError, ProtocolError, TipError
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.buyer import QUERY_NORM
from tip_fed.protocol.disclosure import NoisePolicy, _delta_of, gaussian_sigma, round_release
from tip_fed.protocol.ledger import LedgerPolicy
from tip_fed.testing import buyer_session
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import TASK, make_data, plaintext_scores, seller_serve_error


class ProbingBuyer(Buyer):
    """Replaces its query with a basis vector e_k and re-sends it inside the same session, hoping to
    read one gradient coordinate per query (overrides only the query it encrypts)."""

    def probe(self, offer_bytes, k):
        session = buyer_session(self)
        e = np.zeros(self.spec.dim)
        e[k] = QUERY_NORM
        msg = pb.Offer.FromString(offer_bytes)
        del msg.query[:]
        msg.query.extend(encrypt_query(session.keys, session.plan, e))
        return msg.SerializeToString()


def test_by_default_a_seller_releases_one_aggregate_score_once(model, seller_data):
    """Neither side opting in: the reply carries one encrypted total (no per-sample rows) and the same
    session cannot be queried again."""
    buyer = Buyer(model, TASK, objective=make_data(40, 2), settings=BuyerSettings(
        projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="identity")))
    offer = buyer.offer(max_samples=100)
    seller = Seller("s1", seller_data["s1"])
    reply = seller.respond(offer)
    assert pb.Reply.FromString(reply).n_rows == 1
    with pytest.raises(BudgetExceededError, match="budget"):
        seller.respond(offer)
    (v,) = buyer.settle([reply]).sellers
    assert v.per_sample is None
    assert v.total == pytest.approx(plaintext_scores(buyer, model, seller_data["s1"]).sum(),
                                    abs=1e-6 * buyer.query_norm * buyer.grad_norm_bound * v.n_samples)


def test_basis_vector_probe_is_refused_once_the_budget_is_spent(model, seller_data):
    buyer = ProbingBuyer(model, TASK, objective=make_data(40, 2), settings=BuyerSettings(
        projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="identity"),
        protocol=ProtocolConfig(disclosure="per-sample", query_budget=50)))
    offer = buyer.offer(max_samples=100)
    # exact per-sample scores are opt-in for the seller (this test is about the budget, not the noise)
    seller = Seller("s1", seller_data["s1"], policy=SellerPolicy(exact_per_sample=True))  # one query per session
    first = seller.respond(buyer.probe(offer, 0))
    for k in (1, 2):
        with pytest.raises(BudgetExceededError, match="budget"):
            seller.respond(buyer.probe(offer, k))
    # the one probe that was answered reveals one (clipped) gradient coordinate per record:
    # why per-sample disclosure is opt-in and noise exists
    v = buyer.settle([first]).sellers[0]
    g = clip_rows(projected_grads(model, buyer.spec, TASK, seller_data["s1"]).double(), buyer.grad_norm_bound)[0]
    coord = (
        g[:, 0].numpy() * QUERY_NORM / buyer.grad_norm_bound * (buyer.query_norm * buyer.grad_norm_bound / QUERY_NORM)
    )
    # to the release precision: CKKS error and sanitising noise stay below 1e-6 of the score bound
    assert np.allclose(v.per_sample, coord, atol=1e-6 * buyer.query_norm * buyer.grad_norm_bound)
    # a seller honouring a buyer-declared budget of 3 still never goes beyond it
    loose = Seller(
        "s0",
        seller_data["s0"],
        policy=SellerPolicy(max_queries_per_session=100, exact_per_sample=True, lifetime=LedgerPolicy(max_exact=None)),
    )
    offer3 = buyer.offer(max_samples=100)
    buyer_budget3 = pb.Offer.FromString(offer3)
    buyer_budget3.query_budget = 3
    offer3 = buyer_budget3.SerializeToString()
    for k in range(3):
        loose.respond(buyer.probe(offer3, k))
    with pytest.raises(BudgetExceededError):
        loose.respond(buyer.probe(offer3, 3))


def test_analytic_gaussian_sigma_meets_delta_and_beats_the_classic_bound():
    for eps, delta, sens in [(0.1, 1e-6, 1.0), (0.5, 1e-5, 3.0), (1.0, 1e-6, 2.0), (4.0, 1e-9, 1.0)]:
        sigma = gaussian_sigma(eps, delta, sens)
        assert _delta_of(sigma, eps, sens) <= delta * (1 + 1e-9)
        assert _delta_of(sigma * 0.99, eps, sens) > delta  # smallest such sigma
        if eps < 1:
            assert sigma <= sens * math.sqrt(2 * math.log(1.25 / delta)) / eps
    for bad in [(0, 1e-6), (-1, 1e-6), (float("nan"), 1e-6), (1, 0), (1, 1), (float("inf"), 1e-6)]:
        with pytest.raises(ConfigError):
            gaussian_sigma(*bad, 1.0)
    # gradient-space noise: sensitivity 2C (replace one clipped row), so sigma/C depends on (eps, delta) only
    assert NoisePolicy(1.0, 1e-6).gradient_std == pytest.approx(gaussian_sigma(1.0, 1e-6, 2.0))
    assert NoisePolicy(1.0, 1e-6).noise_multiplier == pytest.approx(gaussian_sigma(1.0, 1e-6, 1.0))
    assert NoisePolicy().gradient_std == 0.0 and NoisePolicy().noise_multiplier is None
    assert NoisePolicy(2.0, 1e-5).stricter(NoisePolicy(0.5, 1e-4)) == NoisePolicy(0.5, 1e-5)
    assert NoisePolicy().stricter(NoisePolicy()) == NoisePolicy()


def test_seller_noise_is_added_inside_the_encryption_and_stated(model, seller_data, make_buyer):
    data = seller_data["s2"]
    buyer = make_buyer(disclosure="per-sample", dp_epsilon=8.0, dp_delta=1e-5)
    offer = buyer.offer(max_samples=100)
    # the seller's own policy is stricter than the buyer's request: the stricter one is applied
    seller = Seller("s2", data, policy=SellerPolicy(noise=NoisePolicy(4.0, 1e-6)))
    reply = pb.Reply.FromString(seller.respond(offer))
    assert (reply.dp_epsilon, reply.dp_delta) == (4.0, 1e-6)
    n = data["x"].shape[0]
    assert reply.noise_std == pytest.approx(gaussian_sigma(4.0, 1e-6, 2.0))  # units of C, no n, no query norm
    assert len(reply.noise_commitment) == 32
    v = buyer.settle([reply.SerializeToString()]).sellers[0]
    assert v.noise["epsilon"] == 4.0 and v.noise["delta"] == 1e-6
    resid = v.per_sample - plaintext_scores(buyer, model, data)
    # 70 residuals: their spread is the declared std (chi-square bounds, p ~ 1e-6 each side)
    assert 0.55 * v.noise["std"] < resid.std() < 1.5 * v.noise["std"]
    assert abs(resid.mean()) < 6 * v.noise["std"] / math.sqrt(n)
    controls = buyer._controls()
    assert controls["dp_requested"] == {"epsilon": 8.0, "delta": 1e-5}
    assert 8.0 <= controls["dp_session_composed"]["epsilon"] < 10.0  # one query: the accountant's bound on eps


def test_aggregate_noise_and_manifest_state_epsilon_delta(model, seller_data, make_buyer):
    buyer = make_buyer(disclosure="aggregate", budget=2, dp_epsilon=1.0, dp_delta=1e-6)
    offer = buyer.offer(max_samples=100)
    valuation = buyer.settle([Seller(s, d).respond(offer) for s, d in seller_data.items()])
    controls = valuation.manifest["disclosure_controls"]
    composed = controls["dp_session_composed"]
    # two queries composed by the RDP accountant at delta 2e-6: tighter than basic composition (2.0)
    assert composed["delta"] == 2e-6 and 1.0 < composed["epsilon"] < 2.0
    for v in valuation.sellers:
        assert v.noise["epsilon"] == 1.0 and v.noise["std"] > 0 and v.noise["total_std"] == v.noise["std"]
        plain = plaintext_scores(buyer, model, seller_data[v.seller_id]).sum()
        assert abs(v.total - plain) < 8 * v.noise["total_std"]


def test_noise_too_large_for_the_parameters_is_refused_cleanly(seller_data, make_buyer):
    buyer = make_buyer(disclosure="per-sample", dp_epsilon=0.01)
    with pytest.raises(TipError, match="larger epsilon or aggregate"):
        Seller("s1", seller_data["s1"]).respond(buyer.offer(max_samples=100))


def test_released_scores_are_rounded(model, seller_data, make_buyer):
    buyer = make_buyer(disclosure="per-sample", release_digits=4)
    offer = buyer.offer(max_samples=100)
    v = buyer.settle(
        [Seller("s1", seller_data["s1"], policy=SellerPolicy(exact_per_sample=True)).respond(offer)]
    ).sellers[0]
    q = buyer.release_quantum
    assert q == pytest.approx(buyer.query_norm * buyer.grad_norm_bound * 1e-4)
    for x in [*v.per_sample, v.total]:
        assert abs(x / q - round(x / q)) < 1e-6
    assert np.max(np.abs(v.per_sample - plaintext_scores(buyer, model, seller_data["s1"]))) <= q
    assert round_release(1.26, 0.5) == 1.5 and round_release(1.26, 0.0) == 1.26


def test_every_non_score_slot_is_indistinguishable_from_noise(seller_data, make_buyer):
    """Decrypt every slot of every returned ciphertext with the buyer's key: the slots that are not
    requested scores are uniform on [-B, B], independent of the seller's data and fresh per reply."""
    buyer = make_buyer(disclosure="per-sample")
    offer = buyer.offer(max_samples=100)
    keys, plan = buyer_session(buyer).keys, buyer_session(buyer).plan
    others = {}
    for i, (sid, data) in enumerate(seller_data.items()):
        for attempt in range(2):
            # seeded fill so the statistical checks below are reproducible, distinct per reply
            seller = Seller(
                sid, data, policy=SellerPolicy(max_queries_per_session=2, exact_per_sample=True), seed=100 * i + attempt
            )
            reply = pb.Reply.FromString(seller.respond(offer))
            assert len(reply.scores) == plan.blocks(reply.n_rows)
            rest = []
            start = 0
            for ct, r in zip(reply.scores, plan.block_rows(reply.n_rows), strict=True):
                slots = keys.decrypt_slots(ct, "reply")
                n_in = min(r, reply.n_rows - start)
                start += r
                mask = np.ones(plan.slots, bool)
                mask[plan.output_slots(r, n_in)] = False
                rest.append(slots[mask])
                assert np.all(np.abs(slots[~mask]) <= QUERY_NORM * 1.001)
            rest = np.concatenate(rest)
            assert np.abs(rest).max() <= DEFAULT_FILL_BOUND * 1.0001
            assert stats.kstest(rest, "uniform", args=(-DEFAULT_FILL_BOUND, 2 * DEFAULT_FILL_BOUND)).pvalue > 1e-4
            others[(sid, attempt)] = rest
    # independent of the data and fresh per reply: no correlation between any two replies' fill
    keys_ = list(others)
    for i, a in enumerate(keys_):
        for b in keys_[i + 1 :]:
            m = min(len(others[a]), len(others[b]))
            assert abs(np.corrcoef(others[a][:m], others[b][:m])[0, 1]) < 0.1


def test_a_seller_cannot_claim_noise_it_did_not_add(seller_data, make_buyer):
    """Declared noise widens the audit tolerance, so the declared std must match (epsilon, delta)."""
    buyer = make_buyer(disclosure="aggregate")
    offer = buyer.offer(max_samples=100)
    reply = pb.Reply.FromString(Seller("s1", seller_data["s1"]).respond(offer))
    claims = []
    for eps, std in [(0.0, 50.0), (1.0, 0.0), (1.0, 1e6)]:
        fake = pb.Reply()
        fake.CopyFrom(reply)
        fake.seller_id, fake.dp_epsilon, fake.dp_delta, fake.noise_std = f"liar-{len(claims)}", eps, 1e-6, std
        claims.append(fake.SerializeToString())
    # the right std for a claimed epsilon, but no commitment to a seed: the audit could not check it
    fake = pb.Reply()
    fake.CopyFrom(reply)
    fake.seller_id, fake.dp_epsilon, fake.dp_delta = "liar-nocommit", 0.01, 1e-6
    fake.noise_std = NoisePolicy(0.01, 1e-6).gradient_std
    claims.append(fake.SerializeToString())
    valuation = buyer.settle(claims)
    assert valuation.sellers == [] and len(valuation.rejected) == 4
    assert all("noise std" in valuation.rejected[f"liar-{i}"] for i in range(3))
    assert "commitment" in valuation.rejected["liar-nocommit"]


class LyingBuyer(Buyer):
    """Declares a tiny query norm in its Offer but encrypts its real (normalised) query."""

    def offer(self, max_samples=10_000):
        msg = pb.Offer.FromString(super().offer(max_samples))
        msg.query_norm = 1e-9
        return msg.SerializeToString()


def test_understated_query_norm_changes_neither_the_noise_nor_the_stated_epsilon(model, seller_data):
    """The declared query norm used to set sigma (1e-9 instead of 2^10 shrank it by 1e12). Noise now
    lives in gradient space and is calibrated to the seller's clip bound only."""
    data = seller_data["s2"]
    n = data["x"].shape[0]
    resid, replies = {}, {}
    for cls in (Buyer, LyingBuyer):
        buyer = cls(
            model,
            TASK,
            objective=make_data(40, 2, shift=0.5),
            train=make_data(120, 3),
            settings=BuyerSettings(
                projection=ProjectionConfig(rank=4),
                preconditioner=PreconditionerConfig(kind="identity"),
                protocol=ProtocolConfig(disclosure="per-sample", dp_epsilon=4.0, dp_delta=1e-6),
            ),
        )
        offer = buyer.offer(max_samples=100)
        reply = pb.Reply.FromString(
            Seller("s2", data, policy=SellerPolicy(noise=NoisePolicy(4.0, 1e-6))).respond(offer)
        )
        replies[cls.__name__] = reply
        v = buyer.settle([reply.SerializeToString()]).sellers[0]
        resid[cls.__name__] = (v.per_sample - plaintext_scores(buyer, model, data)) / v.noise["std"]
    honest, liar = replies["Buyer"], replies["LyingBuyer"]
    assert (liar.dp_epsilon, liar.dp_delta, liar.noise_std) == (honest.dp_epsilon, honest.dp_delta, honest.noise_std)
    print(
        f"\nnoise std (units of C): honest buyer {honest.noise_std:.4g}, lying buyer {liar.noise_std:.4g}; "
        f"released noise / expected std: honest {resid['Buyer'].std():.3f}, lying {resid['LyingBuyer'].std():.3f}"
    )
    for r in resid.values():  # 70 standardised residuals: std 1 (chi-square bounds, p ~ 1e-6 each side)
        assert 0.55 < r.std() < 1.5 and abs(r.mean()) < 6 / math.sqrt(n)


def test_per_sample_disclosure_requires_noise(seller_data, make_buyer):
    buyer = make_buyer(disclosure="per-sample")
    with pytest.raises(ProtocolError, match="only with differential-privacy noise"):
        Seller("s1", seller_data["s1"]).respond(buyer.offer(max_samples=100))
    # the seller's own policy is enough: it adds the noise whatever the offer asks
    noisy = Seller("s1", seller_data["s1"], policy=SellerPolicy(noise=NoisePolicy(8.0)))
    assert pb.Reply.FromString(noisy.respond(buyer.offer(max_samples=100))).dp_epsilon == 8.0


@pytest.mark.parametrize("eps", ["-1", "nan", "0"])
def test_seller_serve_refuses_a_bad_privacy_setting_in_one_line(eps, tmp_path, capsys):
    err = seller_serve_error(capsys, "--data", str(tmp_path / "d.safetensors"), "--insecure", "--dp-epsilon", eps)
    assert "dp epsilon" in err
