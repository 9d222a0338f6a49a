"""Plaintext Reply fields beside the noisy scores must not tell neighbouring datasets apart.

The adversary is the DP one: it knows every record but one, picks the model, the projection and the
gradient-norm bound C, and compares what the Reply says with what each candidate dataset would give.
"""

import hashlib

import numpy as np
import torch

from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.protocol import Seller, SellerPolicy, commitment
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import TASK, make_data


def _worlds(model, spec):
    """Replace-one neighbours: 33 shared records plus the smallest- or largest-gradient candidate."""
    base, pool = make_data(33, 11, shift=0.3), make_data(200, 99)
    norms = projected_grads(model, spec, TASK, pool).double().norm(dim=1).numpy()
    i0, i1 = int(norms.argmin()), int(norms.argmax())
    worlds = [{k: torch.cat([base[k], pool[k][j:j + 1]]) for k in base} for j in (i0, i1)]
    return worlds, float((norms[i0] + norms[i1]) / 2)


def _unsalted_root(batch, gradients):
    """The root as an unsalted commitment would give it: what a buyer can recompute per candidate."""
    leaves = []
    for i in range(gradients.shape[0]):
        sample = commitment.sample_bytes(batch, i)
        leaves.append(hashlib.sha256(commitment.LEAF + len(sample).to_bytes(8, "big") + sample
                                     + np.ascontiguousarray(gradients[i], dtype=np.float64).tobytes()).digest())
    return commitment.bound_root(len(leaves), commitment.merkle_root(leaves))


def _attack(model, make_buyer, trials=12):
    """Per world-guess hits of the commitment test and the clipped-count test over ``trials`` replies."""
    probe = make_buyer(disclosure="aggregate")
    worlds, bound = _worlds(model, probe.spec)
    buyer_kw = {"disclosure": "aggregate", "dp_epsilon": 1.0, "dp_delta": 1e-6, "grad_norm_bound": bound}
    expected = []
    for d in worlds:
        g, f = clip_rows(projected_grads(model, probe.spec, TASK, d).double(), bound)
        # the buyer's best guesses at the root: unsalted, or salted with a seed it picks
        guesses = {_unsalted_root(d, g.numpy()), commitment.commit(d, g.numpy(), bytes(32))}
        expected.append((guesses, int((f < 1).sum())))
    assert expected[0][1] != expected[1][1] and expected[0][0] != expected[1][0]  # the tests could tell
    rng = np.random.default_rng(3)
    hits = {"commitment": 0, "clipped": 0, "world-1": 0}
    for _ in range(trials):
        b = int(rng.integers(2))
        buyer = make_buyer(**buyer_kw)
        seller = Seller("s", worlds[b], policy=SellerPolicy(noise=NoisePolicy(1.0, 1e-6)))
        reply = pb.Reply.FromString(seller.respond(buyer.offer(max_samples=100), peer="x509:CN=b", authenticated=True))
        hits["commitment"] += int((reply.commitment in expected[1][0]) == bool(b))
        assert reply.commitment not in expected[0][0] | expected[1][0]
        hits["clipped"] += int((reply.clipped == expected[1][1]) == bool(b))
        hits["world-1"] += b
        assert reply.clipped == 0 or reply.clipped in (expected[0][1], expected[1][1])
    return hits, trials


def test_commitment_root_is_hiding(model, make_buyer):
    hits, trials = _attack(model, make_buyer)
    # an unsalted root matched its world every time; the salted one matches no candidate
    assert hits["commitment"] == trials - hits["world-1"]


def test_the_audit_and_spot_check_open_the_salted_root(seller_data, make_buyer):
    from tip_fed.protocol.audit import Delivery, audit
    from tip_fed.protocol.spotcheck import open_records, spot_check

    buyer = make_buyer(disclosure="aggregate", dp_epsilon=1.0, dp_delta=1e-6)
    seller = Seller("s1", seller_data["s1"])
    offer = buyer.offer(max_samples=100)
    valuation = buyer.settle([seller.respond(offer)])
    record, delivery = buyer.record(valuation), seller.deliver(valuation.session_id)
    assert audit(record, {"s1": delivery}).sellers[0].verdict == "ok"
    valued = valuation.sellers[0].to_dict()
    opening = open_records(delivery, [0, 5])
    assert spot_check(record, valued, opening).passed
    assert len(opening.salts) == 2 and not hasattr(opening, "salt_seed")  # unopened leaves stay hidden
    opening.salts[1] = bytes(32)
    assert spot_check(record, valued, opening).bad_proofs == [5]
    for seed in (None, bytes(32)):  # no salt seed, or a wrong one: the records no longer open the root
        bad = audit(record, {"s1": Delivery(data=delivery.data, gradients=delivery.gradients,
                                            noise_seed=delivery.noise_seed, salt_seed=seed)}).sellers[0]
        assert bad.verdict == "commitment-mismatch" and not bad.commitment_ok


def test_clipped_count_is_withheld_under_dp(model, make_buyer):
    hits, trials = _attack(model, make_buyer)
    # withheld (0 in both worlds): the count test guesses "world 0" every time, right exactly when it is
    assert 0 < hits["world-1"] < trials
    assert hits["clipped"] == trials - hits["world-1"]


def test_clipped_count_is_exact_without_dp(model, seller_data, make_buyer):
    buyer = make_buyer(disclosure="aggregate", grad_norm_bound=0.05)
    reply = pb.Reply.FromString(Seller("s1", seller_data["s1"]).respond(buyer.offer(max_samples=100)))
    g = projected_grads(model, buyer.spec, TASK, seller_data["s1"]).double()
    assert reply.clipped == int((g.norm(dim=1) > 0.05).sum()) > 0
