"""A seller lying about its record count: the total is the decrypted mean times the declared n, so
declaring n = 10000 while holding 70 records multiplies the total by 143. The committed root binds n
and every opened record is proven at its requested position, so the spot check catches the lie
before the buyer pays."""

import hashlib

import numpy as np
import pytest

from tip_fed.market.payouts import BudgetBalancedReserve, FlatPerRecord, PayoutInputs, ProportionalPositive
from tip_fed.protocol import Seller, SellerPolicy, commitment
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.protocol.spotcheck import (
    Opening,
    choose,
    open_records,
    padding_catch_probability,
    payable,
    spot_check,
)

from ..conftest import make_data


def _leaves(n):
    return [hashlib.sha256(bytes([i % 256, i // 256])).digest() for i in range(n)]


def test_a_proof_holds_only_at_its_own_position_in_a_tree_of_its_own_size():
    for n in range(1, 13):
        leaves = _leaves(n)
        root = commitment.bound_root(n, commitment.merkle_root(leaves))
        for i in range(n):
            path = commitment.merkle_proof(leaves, i)
            assert commitment.verify_proof(root, leaves[i], path, i, n)
            # at another index, or against another count: refused
            assert not any(commitment.verify_proof(root, leaves[i], path, j, n) for j in range(n) if j != i)
            assert not any(commitment.verify_proof(root, leaves[i], path, i, m) for m in range(1, 40) if m != n)
            assert not commitment.verify_proof(root, leaves[i], path, n, n)  # out of range
            if path:
                flipped = [(path[0][0], not path[0][1]), *path[1:]]
                assert not commitment.verify_proof(root, leaves[i], flipped, i, n)
                assert not commitment.verify_proof(root, leaves[i], path[:-1], i, n)  # too short
                assert not commitment.verify_proof(root, leaves[i], [(path[0][0][:16], path[0][1]), *path[1:]], i, n)
            assert not commitment.verify_proof(root, leaves[i], [*path, (leaves[0], False)], i, n)  # too long


def _settle(make_buyer, sellers, max_samples=10000, **protocol):
    buyer = make_buyer(disclosure="aggregate", **protocol)
    offer = buyer.offer(max_samples=max_samples)
    valuation = buyer.settle([s.respond(offer) for s in sellers])
    assert valuation.rejected == {}
    return buyer.record(valuation), {v.seller_id: v.to_dict() for v in valuation.sellers}, valuation.session_id


@pytest.mark.parametrize("eps", [None, 1.0])
def test_the_red_teams_count_forgery_is_caught_before_purchase(make_buyer, eps):
    """The liar holds 70 records, scores them honestly and declares 10000; asked for position i it opens
    its real record i mod 70 with that record's Merkle path (what passed at k = 10, 30, 60)."""
    real, claimed = 70, 10000
    policy = SellerPolicy(noise=NoisePolicy(eps) if eps else NoisePolicy())
    liar = Seller("liar", make_data(real, 22), policy=policy)
    honest = Seller("honest", make_data(40, 20), policy=policy)
    liar.n_samples = claimed
    dp = {"dp_epsilon": eps, "max_noise_std": 80.0} if eps else {}
    record, valued, session = _settle(make_buyer, [liar, honest], **dp)
    assert (valued["liar"]["noise"] is not None) == (eps is not None)
    assert valued["liar"]["n_samples"] == claimed
    delivery = liar.deliver(session)
    tree = commitment.merkle_root(commitment.leaves(delivery.data, delivery.gradients, delivery.salt_seed))
    assert commitment.bound_root(real, tree).hex() == valued["liar"]["commitment"]  # what it committed to
    for k in (10, 30, 60):
        asked = choose(claimed, k)
        real_opening = open_records(delivery, [i % real for i in asked])
        forged = Opening(indices=asked, data=real_opening.data, gradients=real_opening.gradients,
                         paths=real_opening.paths, salts=real_opening.salts)
        result = spot_check(record, valued["liar"], forged, asked=asked)
        assert not result.passed and result.bad_proofs == asked, result.reasons
        # a liar that had bound its 70-leaf tree to the count it declares: no position opens either
        relabelled = dict(valued["liar"], commitment=commitment.bound_root(claimed, tree).hex())
        assert spot_check(record, relabelled, forged, asked=asked).bad_proofs == asked
        print(f"\neps {eps}: liar declares {claimed}, holds {real}: k = {k}, "
              f"{len(result.bad_proofs)}/{k} proofs refused")
        # nor does it pass by declaring the truth at the buyer: the root binds n = 70, its total is 143x
        if eps is None:  # (under DP the declared noise of a 70-record mean may cover the 143x)
            with_real_n = spot_check(record, dict(valued["liar"], n_samples=real),
                                     open_records(delivery, choose(real, k)))
            assert not with_real_n.passed and "claimed mean score" in with_real_n.reasons[-1]
    ok = spot_check(record, valued["honest"], open_records(honest.deliver(session), choose(40, 10)))
    assert ok.passed, ok.reasons


def test_opening_positions_other_than_asked_or_repeating_one_is_refused(make_buyer):
    seller = Seller("s", make_data(60, 23))
    record, valued, session = _settle(make_buyer, [seller], max_samples=500)
    delivery = seller.deliver(session)
    asked = choose(60, 8)
    other = [(i + 1) % 60 for i in asked]
    moved = spot_check(record, valued["s"], open_records(delivery, other), asked=asked)
    assert not moved.passed and "not the ones asked for" in moved.reasons[0]
    twice = spot_check(record, valued["s"], open_records(delivery, [asked[0]] * 3))
    assert not twice.passed and "repeats a position" in twice.reasons[0]
    # the same leaf (same record, same salt) shown at another position: refused there
    o = open_records(delivery, asked[:2])
    same = Opening(indices=asked[:2], data={k: v[[0, 0]] for k, v in o.data.items()}, gradients=o.gradients[[0, 0]],
                   paths=[o.paths[0], o.paths[0]], salts=[o.salts[0], o.salts[0]])
    assert asked[1] in spot_check(record, valued["s"], same, asked=asked[:2]).bad_proofs


@pytest.mark.parametrize(("distinct", "n", "k"), [(20, 200, 5)])
def test_a_padded_commitment_is_caught_at_the_stated_probability(make_buyer, distinct, n, k):
    """A smarter liar commits to n leaves, its r records each copied n/r times: every proof holds,
    and two opened copies give it away with probability 1 - C(r, k)(n/r)^k / C(n, k)."""
    base = make_data(distinct, 24)
    padded = {key: v.repeat(n // distinct, *([1] * (v.dim() - 1))) for key, v in base.items()}
    seller = Seller("padder", padded)
    record, valued, session = _settle(make_buyer, [seller], max_samples=500)
    delivery = seller.deliver(session)
    trials, caught = 100, 0
    for _ in range(trials):
        result = spot_check(record, valued["padder"], open_records(delivery, choose(n, k)))
        assert not result.bad_proofs and not result.bad_gradients
        caught += bool(result.repeats) and not result.passed
    p = padding_catch_probability(n, distinct, k)
    print(f"\n{distinct} records padded to {n}, k = {k}: caught {caught}/{trials}, stated {p:.3f}; "
          f"k = 10: {padding_catch_probability(n, distinct, 10):.3f}, "
          f"70 records as 10000 at k = 10 / 30: {padding_catch_probability(10000, 70, 10):.3f} / "
          f"{padding_catch_probability(10000, 70, 30):.4f}")
    assert abs(caught / trials - p) < 4 * np.sqrt(p * (1 - p) / trials)
    assert padding_catch_probability(n, distinct, distinct + 1) == 1.0
    assert padding_catch_probability(n, n, k) == pytest.approx(0.0, abs=1e-12)  # no padding, nothing to catch


def test_payouts_follow_the_spot_check_not_the_declared_count(make_buyer):
    """Paid on the declared count the liar takes nearly the whole budget; the valuation to pay on
    (:func:`payable`) rejects it with its spot check's reasons and marks the checked counts."""
    sizes = {"s0": 40, "s1": 33, "liar": 70, "s3": 50}
    # all drawn like the buyer's objective, so that every seller helps it
    sellers = {sid: Seller(sid, make_data(n, 30 + i, shift=0.5)) for i, (sid, n) in enumerate(sizes.items())}
    sellers["liar"].n_samples = 10000
    buyer = make_buyer(disclosure="aggregate")
    offer = buyer.offer(max_samples=10000)
    valuation = buyer.settle([s.respond(offer) for s in sellers.values()])
    assert valuation.rejected == {} and not any(v.spot_checked for v in valuation.sellers)  # declared only
    record = buyer.record(valuation)
    valued = {v.seller_id: v.to_dict() for v in valuation.sellers}
    checks = []
    for sid in ("s0", "s1", "liar"):  # s3 is not checked
        delivery = sellers[sid].deliver(valuation.session_id)
        asked = choose(int(valued[sid]["n_samples"]), 10)
        opening = open_records(delivery, [i % sizes[sid] for i in asked])  # the liar's forgery; honest: i
        opening.indices = asked
        checks.append(spot_check(record, valued[sid], opening, asked=asked))
    to_pay = payable(valuation, checks)
    assert "liar" in to_pay.rejected and "failed the spot check" in to_pay.rejected["liar"]
    assert {v.seller_id: v.spot_checked for v in to_pay.sellers} == {"s0": True, "s1": True, "s3": False}
    rules = (ProportionalPositive(), FlatPerRecord(), BudgetBalancedReserve())
    declared = {r.name: r.pay(PayoutInputs.from_valuation(valuation), 1.0) for r in rules}
    checked = {r.name: r.pay(PayoutInputs.from_valuation(to_pay), 1.0) for r in rules}
    print("\nliar's share on the declared count: " + ", ".join(f"{k} {v['liar']:.3f}" for k, v in declared.items())
          + "; after the spot check: rejected, shares " + str({k: {s: round(x, 3) for s, x in v.items()}
                                                              for k, v in checked.items()}))
    assert valued["liar"]["total"] > 0 and declared["proportional"]["liar"] > 0.9 and declared["flat"]["liar"] > 0.9
    assert all("liar" not in v for v in checked.values())
