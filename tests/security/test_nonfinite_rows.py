"""A buyer-crafted model whose loss overflows only on some record values cannot turn them into a refusal.

The attack: the buyer ships a model with a trap unit that is 0 unless ``x0 > t`` and then drives the
logits to infinity, so the loss of exactly those records is NaN. A seller that refused such an Offer
told the buyer, exactly and outside any noise, whether some record has ``x0 > t`` (one bit per
Offer, a binary search on the largest ``x0`` over a few sessions), even with differential privacy on.
Now a record whose loss or gradient is not finite scores as a zero row under one fixed rule, on the
seller and in the audit, so the seller always sends its normal (noised) reply.
"""

import numpy as np
import pytest
import torch

from tip_fed.core.gradients import projected_grads
from tip_fed.core.models import MLP
from tip_fed.errors import DataError
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.audit import audit
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import TASK, make_data, plaintext_scores

T = 4.5  # the threshold the buyer probes: "does any record have x0 > T?"


@pytest.fixture(scope="module")
def trap_model():
    """Two ordinary hidden units and a trap unit: (x0 - T) * 1e20 when positive, times +-1e20 into the
    logits, which overflow float32 (loss NaN) for x0 > T + 0.04 and are untouched otherwise."""
    torch.manual_seed(5)
    m = MLP([10, 3, 2])
    with torch.no_grad():
        first, last = m[0], m[2]
        first.weight[2].zero_()
        first.weight[2, 0] = 1e20
        first.bias[2] = -T * 1e20
        last.weight[:, 2] = torch.tensor([1e20, -1e20])
    return m.eval()


@pytest.fixture(scope="module")
def neighbours():
    """Two datasets that differ in one record: only the second has a record with x0 > T."""
    base = make_data(30, 21)
    assert float(base["x"][:, 0].max()) < T
    trapped = {k: v.clone() for k, v in base.items()}
    trapped["x"][0, 0] = T + 2.0
    return base, trapped


def _trap_buyer(make_buyer, trap_model, **protocol):
    buyer = make_buyer(disclosure="aggregate", over=trap_model, **protocol)
    assert buyer.grad_norm_bound > 0  # the buyer's own data never springs the trap
    return buyer


def test_the_trap_really_makes_the_loss_non_finite(trap_model, neighbours, make_buyer):
    """Positive control: on the trapped record the loss is NaN, and the default (strict) gradient
    path refuses it; the seller's rule gives a zero row and leaves every other row unchanged."""
    base, trapped = neighbours
    buyer = _trap_buyer(make_buyer, trap_model)
    assert torch.isfinite(TASK.per_sample_loss(trap_model, base)).all()
    assert not torch.isfinite(TASK.per_sample_loss(trap_model, trapped)[0])
    with pytest.raises(DataError, match="NaN or infinite"):
        projected_grads(trap_model, buyer.spec, TASK, trapped)
    rows = projected_grads(trap_model, buyer.spec, TASK, trapped, zero_nonfinite=True)
    assert torch.all(rows[0] == 0)
    rest = projected_grads(trap_model, buyer.spec, TASK, {k: v[1:] for k, v in trapped.items()})
    assert torch.allclose(rows[1:], rest, rtol=1e-5, atol=1e-6 * float(rest.abs().max()))


def test_a_non_finite_loss_is_answered_as_a_zero_row_not_refused(trap_model, neighbours, make_buyer):
    """Exact answers, so the value can be checked: both neighbours are answered (no refusal to read),
    the trapped record adds exactly nothing to the total, and the audit recomputes the same rows."""
    base, trapped = neighbours
    buyer = _trap_buyer(make_buyer, trap_model)
    offer = buyer.offer(max_samples=100)
    sellers = {"base": Seller("base", base), "trapped": Seller("trapped", trapped)}
    replies = [s.respond(offer) for s in sellers.values()]  # used to raise DataError for "trapped"
    valuation = buyer.settle(replies)
    assert valuation.rejected == {} and [v.seller_id for v in valuation.sellers] == ["base", "trapped"]
    v = valuation.by_id()
    tol = 1e-6 * buyer.query_norm * buyer.grad_norm_bound * 30
    others = {k: t[1:] for k, t in trapped.items()}
    assert v["trapped"].total == pytest.approx(plaintext_scores(buyer, trap_model, others).sum(), abs=tol)
    assert v["base"].total == pytest.approx(plaintext_scores(buyer, trap_model, base).sum(), abs=tol)
    deliveries = {sid: s.deliver(valuation.session_id) for sid, s in sellers.items()}
    assert np.all(deliveries["trapped"].gradients[0] == 0)
    report = audit(buyer.record(valuation), deliveries)
    assert report.passed, report.to_markdown()


def test_under_dp_both_neighbours_get_the_same_form_of_noised_reply(trap_model, neighbours, make_buyer):
    """With noise on, what the buyer sees of either neighbour is a reply of identical form and
    declarations; the only difference left is the noised total, which the Gaussian mechanism covers
    (the zero row has norm 0 <= C, so the sensitivity is still 2C)."""
    base, trapped = neighbours
    buyer = _trap_buyer(make_buyer, trap_model, dp_epsilon=1.0)
    offer = buyer.offer(max_samples=100)
    policy = SellerPolicy(noise=NoisePolicy(1.0))
    replies = [Seller(sid, data, policy=policy).respond(offer) for sid, data in (("base", base), ("trapped", trapped))]
    msgs = [pb.Reply.FromString(r) for r in replies]
    fields = [{f.name for f, _ in m.ListFields()} for m in msgs]
    assert fields[0] == fields[1]
    for name in ("n_samples", "n_rows", "clipped", "dp_epsilon", "dp_delta", "noise_std"):
        assert getattr(msgs[0], name) == getattr(msgs[1], name), name
    assert [len(m.scores) for m in msgs] == [len(m.scores) for m in msgs[::-1]]
    valuation = buyer.settle(replies)
    assert valuation.rejected == {} and len(valuation.sellers) == 2
    assert all(s.noise is not None and s.noise["epsilon"] == 1.0 for s in valuation.sellers)


def test_non_finite_weights_are_refused_before_any_record_is_read():
    """A model whose weights are not finite makes every loss non-finite whatever the records: that
    is refused when the model is decoded, before the ledger is charged, with a clear reason."""
    from tip_fed.errors import ModelError
    from tip_fed.protocol.model import decode_model, encode_model

    broken = MLP([10, 3, 2])
    with torch.no_grad():
        broken[0].weight[0, 0] = float("inf")
    with pytest.raises(ModelError, match="NaN or infinite"):
        decode_model(encode_model(broken))


def test_a_label_outside_the_models_classes_is_a_zero_row_not_a_refusal(model, make_buyer):
    """The same bit through another value-dependent failure: a 2-class model and a record labelled 2
    ("does any record have label 2?") used to be a refusal for the whole dataset."""
    data = make_data(20, 31)
    data["y"][3] = 2
    buyer = make_buyer(disclosure="aggregate")
    offer = buyer.offer(max_samples=100)
    seller = Seller("labelled", data)
    valuation = buyer.settle([seller.respond(offer)])  # used to raise DataError (target out of bounds)
    assert valuation.rejected == {}
    others = {k: torch.cat([t[:3], t[4:]]) for k, t in data.items()}
    tol = 1e-6 * buyer.query_norm * buyer.grad_norm_bound * 20
    assert valuation.sellers[0].total == pytest.approx(plaintext_scores(buyer, model, others).sum(), abs=tol)
    assert np.all(seller.deliver(valuation.session_id).gradients[3] == 0)
