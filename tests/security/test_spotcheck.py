"""Pre-purchase spot check: k committed records opened with Merkle proofs catch forgery before paying."""

import hashlib

import numpy as np
import pytest

from tip_fed.protocol import Seller, SellerPolicy, commitment
from tip_fed.protocol.spotcheck import catch_probability, choose, open_records, sampling_width, spot_check

from ..conftest import make_data


class PartlyFabricatingSeller(Seller):
    """Scales the gradients of its first ``bad`` records by 3 (before clipping) and commits to them."""

    def __init__(self, *args, bad, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad = bad

    def projected_gradients(self, model, spec, task):
        g = super().projected_gradients(model, spec, task).clone()
        g[: self.bad] *= 3.0
        return g


def test_every_merkle_path_verifies_and_a_changed_leaf_does_not():
    for n in range(1, 10):
        leaves = [hashlib.sha256(bytes([i])).digest() for i in range(n)]
        root = commitment.bound_root(n, commitment.merkle_root(leaves))
        for i in range(n):
            path = commitment.merkle_proof(leaves, i)
            assert commitment.verify_proof(root, leaves[i], path, i, n)
            assert not commitment.verify_proof(root, hashlib.sha256(b"x").digest(), path, i, n)
    with pytest.raises(IndexError):
        commitment.merkle_proof(leaves, n)


def _session(make_buyer, seller):
    buyer = make_buyer(disclosure="aggregate")
    valuation = buyer.settle([seller.respond(buyer.offer(max_samples=500))])
    assert valuation.rejected == {}
    record = buyer.record(valuation)
    return record, valuation.sellers[0].to_dict(), seller.deliver(valuation.session_id)


def test_a_forged_total_is_caught_before_purchase(make_buyer):
    data = make_data(200, 31)
    record, valued, delivery = _session(make_buyer, Seller("s", data))
    k = 40
    honest = spot_check(record, valued, open_records(delivery, choose(200, k)))
    assert honest.passed, honest.reasons
    forged = dict(valued, total=0.9 * record.score_bound * 200)  # what a seller encrypting its own total claims
    caught = spot_check(record, forged, open_records(delivery, choose(200, k)))
    assert not caught.passed and "claimed mean score" in caught.reasons[0]
    # a record swapped after committing fails its Merkle path
    opening = open_records(delivery, [3, 4])
    opening.data["x"][0] += 1.0
    swapped = spot_check(record, valued, opening)
    assert swapped.bad_proofs == [3] and not swapped.passed


def test_fabricated_records_are_caught_at_the_stated_probability(make_buyer):
    n, bad, k, trials = 60, 6, 10, 100
    seller = PartlyFabricatingSeller("s", make_data(n, 32), bad=bad, policy=SellerPolicy())
    record, valued, delivery = _session(make_buyer, seller)
    caught = 0
    for _ in range(trials):
        result = spot_check(record, valued, open_records(delivery, choose(n, k)))
        assert set(result.bad_gradients) <= set(range(bad))
        caught += bool(result.bad_gradients)
    p = catch_probability(n, bad, k)
    print(
        f"\nfabricated {bad}/{n} records, {k} opened: caught in {caught}/{trials} spot checks, "
        f"stated probability {p:.3f}; "
        f"k = 30 would give {catch_probability(n, bad, 30):.3f}"
    )
    assert abs(caught / trials - p) < 4 * np.sqrt(p * (1 - p) / trials)
    assert catch_probability(n, bad, k) >= 1 - (1 - bad / n) ** k


def test_opening_every_record_demands_the_exact_total(make_buyer):
    """Sampling without replacement: with all n records opened there is no sampling error left."""
    n = 200
    record, valued, delivery = _session(make_buyer, Seller("s", make_data(n, 31)))
    everything = open_records(delivery, list(range(n)))
    honest = spot_check(record, valued, everything)
    assert honest.passed, honest.reasons
    assert honest.total_threshold < 1e-4 * record.score_bound  # CKKS error and rounding only
    # the red team's forgery (+0.25 B per record) passed the with-replacement bound even fully opened
    for shift in (0.25, 1e-3):
        forged = dict(valued, total=valued["total"] + shift * record.score_bound * n)
        caught = spot_check(record, forged, everything)
        assert not caught.passed and "claimed mean score" in caught.reasons[-1]


def test_forged_total_catch_rate_and_false_alarms_match_the_bound(make_buyer):
    n, k, alpha, trials = 200, 40, 0.05, 60
    record, valued, delivery = _session(make_buyer, Seller("s", make_data(n, 33)))
    width = sampling_width(record.score_bound, k, n, alpha)
    assert width < sampling_width(record.score_bound, k, 10**9, alpha)  # the finite population helps
    # a forgery two widths off is caught unless the sample itself strays a width (prob <= alpha)
    forged = dict(valued, total=valued["total"] + 2.01 * width * n)
    caught = sum(
        not spot_check(record, forged, open_records(delivery, choose(n, k)), alpha=alpha).passed for _ in range(trials)
    )
    false_alarms = sum(
        not spot_check(record, valued, open_records(delivery, choose(n, k)), alpha=alpha).passed for _ in range(trials)
    )
    print(
        f"\nk={k} of n={n}, alpha={alpha}: forgery +2 widths caught {caught}/{trials}, "
        f"honest flagged {false_alarms}/{trials}"
    )
    bound = alpha * trials + 3 * np.sqrt(alpha * (1 - alpha) * trials)
    assert trials - caught <= bound and false_alarms <= bound
