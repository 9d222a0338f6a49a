"""A lying seller declaring huge privacy noise to pass a forged total (threat model S9c).

The buyer's range check admits 8 standard deviations of the noise a reply declares beyond the
honest bound, so a seller that declares a tiny epsilon widens it at will: its inflated total was
accepted before any purchase (the audit catches it only after paying). The buyer now rejects
replies declaring more noise than its ``protocol.max-noise-std``, and payouts shrink a noisy score
toward 0 by its signal-to-noise, so a total that is mostly declared noise earns little.
"""

import os

import numpy as np

from tip_fed.market.payouts import PayoutInputs, ProportionalPositive, prior_variance
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.buyer import QUERY_NORM
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import plaintext_scores
from .test_audit import ForgingSeller

DELTA = 1e-6


def _declaring(reply: bytes, epsilon: float) -> bytes:
    """The Reply with a claim of (epsilon, DELTA) noise it never added, edited on the public wire format:
    the matching std and a commitment to a seed nobody holds (only the audit would open it)."""
    msg = pb.Reply.FromString(reply)
    msg.dp_epsilon, msg.dp_delta = epsilon, DELTA
    msg.noise_std = NoisePolicy(epsilon, DELTA).gradient_std
    msg.noise_commitment = os.urandom(32)
    return msg.SerializeToString()


def _admitted(epsilon: float, n: int) -> float:
    """The largest mean score (query units) a liar can make the buyer accept for a declared epsilon:
    90 % of what the range check admits (QUERY_NORM x (1 + 8 std / n)), and of what the last CKKS
    level holds (2^18 here: beyond it the value wraps around the modulus)."""
    std = NoisePolicy(epsilon, DELTA).gradient_std
    return 0.9 * min(QUERY_NORM * (1 + 8 * std / n), 2.0**18)


def _forge(make_buyer, model, data, epsilon, **protocol):
    """A buyer, its Offer, the forged reply (a total of the liar's choice, encrypted under the session's
    public key, declaring (epsilon, DELTA) noise), the honest bound on the seller's total (n x score
    bound) and its honest total."""
    buyer = make_buyer(disclosure="aggregate", **protocol)
    n = data["x"].shape[0]
    honest = plaintext_scores(buyer, model, data).sum()
    seller = ForgingSeller("liar", data, forged_slot_value=_admitted(epsilon, n))
    offer = buyer.offer(max_samples=100)
    bound = n * buyer.query_norm * buyer.grad_norm_bound
    return buyer, offer, _declaring(seller.respond(offer), epsilon), bound, honest


def test_a_tiny_declared_epsilon_no_longer_admits_a_huge_forged_total(make_buyer, model, seller_data):
    data = seller_data["s1"]
    # before: a buyer without a ceiling (the old behaviour) accepts the forgery before any audit
    buyer, _, forged, bound, honest = _forge(make_buyer, model, data, 1e-7, max_noise_std=1e12)
    valuation = buyer.settle([forged])
    assert valuation.rejected == {}, valuation.rejected
    before = valuation.sellers[0].total
    assert before / bound > 100  # hundreds of times the largest honest total
    # after: the default ceiling rejects the reply, naming the setting
    buyer, _, forged, bound, honest = _forge(make_buyer, model, data, 1e-7)
    valuation = buyer.settle([forged])
    assert valuation.sellers == []
    reason = valuation.rejected["liar"]
    assert "protocol.max-noise-std" in reason and "declares gradient noise" in reason
    print(f"\nforged total accepted without a ceiling: {before:.4g} = {before / bound:.0f} x the honest bound "
          f"{bound:.4g}, {before / abs(honest):.0f} x the honest total {honest:.4g}; with the default ceiling: "
          "rejected")


def test_at_the_ceiling_a_forged_total_passes_the_range_check_but_is_not_paid_for_its_noise(
    make_buyer, model, seller_data
):
    """The most a liar can declare under the default ceiling (epsilon 0.1: std 72.6 < 80) still widens
    the range; the payout then shrinks that noisy total toward 0, so it no longer takes the budget
    from the exact sellers."""
    buyer, offer, forged, bound, honest = _forge(make_buyer, model, seller_data["s1"], 0.1)
    exact = [Seller(sid, seller_data[sid]).respond(offer) for sid in ("s0", "s2")]
    valuation = buyer.settle([forged, *exact])
    assert valuation.rejected == {}
    forged_total = valuation.by_id()["liar"].total
    assert forged_total / bound > 10
    inputs = PayoutInputs.from_valuation(valuation)
    raw = PayoutInputs(inputs.seller_ids, inputs.scores, inputs.n_records)  # the old, noise-blind inputs
    budget = 1000.0
    before = ProportionalPositive().pay(raw, budget)["liar"] / budget
    after = ProportionalPositive().pay(inputs, budget)["liar"] / budget
    payable = inputs.payable()
    n = inputs.n_records["liar"]
    assert payable["s0"] == inputs.scores["s0"] and payable["s2"] == inputs.scores["s2"]  # exact: unchanged
    assert abs(payable["liar"]) < 0.05 * abs(forged_total)
    assert inputs.scores["s0"] > 0 and inputs.scores["s2"] > 0
    assert before > 0.9 and after < before / 4  # the liar took the budget; now most goes to the exact sellers
    # the bound the shrinkage guarantees: n (score bound + 4 tau) whatever noise is declared
    per_record = np.asarray([inputs.scores[s] / inputs.n_records[s] for s in inputs.seller_ids]) ** 2
    noise = np.asarray([inputs.noise_std.get(s, 0.0) / inputs.n_records[s] for s in inputs.seller_ids]) ** 2
    tau = float(np.sqrt(prior_variance(per_record, noise)))
    assert payable["liar"] <= n * (bound / n + 4 * tau)
    print(f"\nforged total {forged_total:.4g} ({forged_total / bound:.1f} x the honest bound, honest total "
          f"{honest:.4g}, n {n}); paid as {payable['liar']:.4g}; proportional share {before:.3f} -> {after:.3f}")


class TotalForgingSeller(Seller):
    """Answers a per-sample Offer with its declared DP noise, but encrypts (it holds the public key)
    per-sample scores of 0 and a total row of its choice."""

    total_slot_value = 0.0

    def respond(self, offer_bytes, *, peer=None):
        import tenseal.sealapi as sa

        from tip_fed.crypto.codec import seal_to_bytes
        from tip_fed.crypto.keys import load_public_context
        from tip_fed.protocol.offer import decode_offer

        reply = pb.Reply.FromString(super().respond(offer_bytes, peer=peer))
        offer = decode_offer(offer_bytes)
        plan, rows = offer.plan, reply.n_rows
        (r,) = plan.block_rows(rows)  # one block holds every row here
        h = load_public_context(offer.public_context, plan).handles
        values = np.zeros(plan.slots)
        values[plan.output_slots(r, rows)[-1]] = self.total_slot_value
        pt, ct = sa.Plaintext(), sa.Ciphertext()
        h.encoder.encode(values.tolist(), h.first_parms_id, h.output_scale(masked=plan.diagonals(r) < plan.chunk_dim),
                         pt)
        load_public_context(offer.public_context, plan).encryptor.encrypt(pt, ct)
        h.evaluator.mod_switch_to_inplace(ct, h.last_parms_id)
        del reply.scores[:]
        reply.scores.append(seal_to_bytes(ct, "forged"))
        return reply.SerializeToString()


def test_a_per_sample_total_is_checked_against_the_noise_of_a_mean(make_buyer, seller_data):
    """Per-sample disclosure: the total row is the mean of n noisy rows, so its noise std is std / sqrt(n),
    not std. A total forged between the two bounds used to pass; it is now rejected."""
    data = seller_data["s1"]
    n = data["x"].shape[0]
    std = NoisePolicy(1.0, DELTA).gradient_std
    tight, loose = QUERY_NORM * (1 + 8 * std / np.sqrt(n)), QUERY_NORM * (1 + 8 * std)
    buyer = make_buyer(disclosure="per-sample", dp_epsilon=1.0, dp_delta=DELTA)
    liar = TotalForgingSeller("liar", data, policy=SellerPolicy(noise=NoisePolicy(1.0, DELTA)))
    liar.total_slot_value = 0.5 * (tight + loose)
    honest = Seller("s2", seller_data["s2"], policy=SellerPolicy(noise=NoisePolicy(1.0, DELTA)))
    offer = buyer.offer(max_samples=100)
    valuation = buyer.settle([liar.respond(offer), honest.respond(offer)])
    assert [v.seller_id for v in valuation.sellers] == ["s2"]  # the honest noisy reply still passes
    assert "outside the possible range" in valuation.rejected["liar"]
    assert f"{QUERY_NORM * (1 + 1e-6 + 8 * std / np.sqrt(n)) + 1e-3:.6g}" in valuation.rejected["liar"]
    # the forged total would have been this many times the honest bound (n x score bound)
    print(f"\nper-sample total forged at {liar.total_slot_value / QUERY_NORM:.1f} x the honest bound: rejected "
          f"(limit {tight / QUERY_NORM:.1f} x, was {loose / QUERY_NORM:.1f} x)")
