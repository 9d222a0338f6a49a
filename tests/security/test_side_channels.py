"""Plaintext Reply fields beside the noisy scores must not tell neighbouring datasets apart.

The adversary is the DP one: it knows every record but one, picks the model, the projection and the
gradient-norm bound C, and compares what the Reply says with what each candidate dataset would give.
"""

import numpy as np
import torch

from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.protocol import Seller, SellerPolicy, commitment
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from .conftest import TASK, make_data


def _worlds(model, spec):
    """Replace-one neighbours: 33 shared records plus the smallest- or largest-gradient candidate."""
    base, pool = make_data(33, 11, shift=0.3), make_data(200, 99)
    norms = projected_grads(model, spec, TASK, pool).double().norm(dim=1).numpy()
    i0, i1 = int(norms.argmin()), int(norms.argmax())
    worlds = [{k: torch.cat([base[k], pool[k][j:j + 1]]) for k in base} for j in (i0, i1)]
    return worlds, float((norms[i0] + norms[i1]) / 2)


def _attack(model, make_buyer, trials=12):
    """Per world-guess hits of the commitment test and the clipped-count test over ``trials`` replies."""
    probe = make_buyer(disclosure="aggregate")
    worlds, bound = _worlds(model, probe.spec)
    buyer_kw = dict(disclosure="aggregate", dp_epsilon=1.0, dp_delta=1e-6, grad_norm_bound=bound)
    expected = []
    for d in worlds:
        g, f = clip_rows(projected_grads(model, probe.spec, TASK, d).double(), bound)
        expected.append((commitment.commit(d, g.numpy()), int((f < 1).sum())))
    assert expected[0][1] != expected[1][1] and expected[0][0] != expected[1][0]  # the tests could tell
    rng = np.random.default_rng(3)
    hits = {"commitment": 0, "clipped": 0, "world-1": 0}
    for _ in range(trials):
        b = int(rng.integers(2))
        buyer = make_buyer(**buyer_kw)
        seller = Seller("s", worlds[b], policy=SellerPolicy(noise=NoisePolicy(1.0, 1e-6)))
        reply = pb.Reply.FromString(seller.respond(buyer.offer(max_samples=100), peer="x509:CN=b"))
        hits["commitment"] += int((reply.commitment == expected[1][0]) == bool(b))
        hits["clipped"] += int((reply.clipped == expected[1][1]) == bool(b))
        hits["world-1"] += b
        assert reply.clipped == 0 or reply.clipped in (expected[0][1], expected[1][1])
    return hits, trials


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
