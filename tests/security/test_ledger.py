"""Per-buyer privacy ledger: many sessions from one buyer compose, and the seller stops answering.

The attack: one basis-vector query per session (a fresh session and key each time, so the
per-session budget never bites) reads one coordinate of the seller's summed projected gradient
per session. Without noise, dim sessions rebuild the sum exactly; with gradient-space noise every
coordinate carries the Gaussian the stated (epsilon, delta) implies, and the ledger refuses the
buyer once the composition of its sessions would pass the lifetime budget.
"""

import json
import math
import stat
import threading

import numpy as np
import pytest

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.crypto.packing import encrypt_query
from tip_fed.errors import DataError
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.buyer import QUERY_NORM
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.protocol.ledger import (
    ANONYMOUS,
    KeyReuseError,
    LedgerPolicy,
    PrivacyBudgetExhaustedError,
    PrivacyLedger,
    composed_epsilon,
)
from tip_fed.testing import buyer_session
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import TASK, make_data, seller_serve_error


class BasisProber(Buyer):
    """Opens a new session (fresh keys) per query and encrypts e_k instead of its query."""

    def probe_offer(self, k, max_samples=100):
        msg = pb.Offer.FromString(self.offer(max_samples))
        session = buyer_session(self)
        e = np.zeros(self.spec.dim)
        e[k] = QUERY_NORM
        del msg.query[:]
        msg.query.extend(encrypt_query(session.keys, session.plan, e))
        return msg.SerializeToString()


def _prober(model, eps=None, budget=1):
    return BasisProber(model, TASK, objective=make_data(40, 2), settings=BuyerSettings(
        projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="identity"),
        protocol=ProtocolConfig(disclosure="aggregate", dp_epsilon=eps, query_budget=budget)))


def test_basis_vector_sessions_are_refused_once_the_lifetime_budget_is_spent(model, seller_data, tmp_path):
    data = seller_data["s2"]
    per_query, lifetime = NoisePolicy(1.0, 1e-6), LedgerPolicy(epsilon=4.0, delta=1e-5)
    seller = Seller("s2", data, policy=SellerPolicy(noise=per_query, ledger=str(tmp_path / "ledger.json"),
                                                    lifetime=lifetime))
    buyer = _prober(model)
    dim = buyer.spec.dim
    g = clip_rows(projected_grads(model, buyer.spec, TASK, data).double(), buyer.grad_norm_bound)[0].numpy()
    truth = g.sum(axis=0)  # what the attack wants: the summed clipped gradient
    got, k = {}, 0
    with pytest.raises(PrivacyBudgetExhaustedError, match="lifetime privacy budget"):
        while True:
            reply = seller.respond(buyer.probe_offer(k % dim), peer="CN=mallory", authenticated=True)
            v = buyer.settle([reply]).sellers[0]
            # the total is v.(sum g + C z) with v = e_k scaled: undo the buyer's scaling to read coordinate k
            got.setdefault(k % dim, []).append(v.total / buyer.query_norm)
            k += 1
    answered = k
    expected_eps = composed_epsilon({per_query.noise_multiplier: answered}, lifetime.delta)
    over = composed_epsilon({per_query.noise_multiplier: answered + 1}, lifetime.delta)
    assert expected_eps <= lifetime.epsilon < over  # refused exactly when the next answer would overspend
    assert seller._ledger.spent("CN=mallory") == (pytest.approx(expected_eps), 0)
    coords = np.array(sorted(got))
    est = np.array([np.mean(got[c]) for c in coords])
    counts = np.array([len(got[c]) for c in coords])
    err = (est - truth[coords]) * np.sqrt(counts)  # each reading has noise std C * sigma_C
    implied = buyer.grad_norm_bound * per_query.gradient_std
    rel = np.linalg.norm(est - truth[coords]) / np.linalg.norm(truth[coords])
    print(f"\n{answered} sessions answered before refusal (composed epsilon {expected_eps:.3f} <= 4 at delta 1e-5); "
          f"reconstruction error per coordinate: measured rms {np.sqrt(np.mean(err**2)):.4g}, implied by "
          f"(eps, delta) = (1, 1e-6) per session: {implied:.4g} (relative error of the sum {rel:.3g}; "
          f"without noise it is ~1e-7)")
    # the reconstruction is exactly as bad as the stated noise: chi-square bounds on len(coords) readings
    assert 0.35 * implied < np.sqrt(np.mean(err**2)) < 1.8 * implied
    assert answered >= 5
    # the refusal survives a restart: a new seller on the same ledger file refuses at once
    again = Seller("s2", data, policy=SellerPolicy(noise=per_query, ledger=str(tmp_path / "ledger.json"),
                                                   lifetime=lifetime))
    with pytest.raises(PrivacyBudgetExhaustedError):
        again.respond(buyer.probe_offer(0), peer="CN=mallory", authenticated=True)
    # another authenticated buyer has its own budget
    assert pb.Reply.FromString(again.respond(buyer.probe_offer(0), peer="CN=alice", authenticated=True)).n_samples == 70
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert set(saved["buyers"]) == {"CN=mallory", "CN=alice"}
    assert stat.S_IMODE((tmp_path / "ledger.json").stat().st_mode) == 0o600


def test_a_public_key_answered_in_one_session_is_refused_in_another(model, seller_data):
    buyer = _prober(model, eps=2.0, budget=2)
    seller = Seller("s1", seller_data["s1"], policy=SellerPolicy(max_queries_per_session=2))
    offer = buyer.offer(max_samples=100)
    seller.respond(offer)
    seller.respond(offer)  # the same session may use its budget
    replay = pb.Offer.FromString(offer)
    replay.session_id = "f" * 32  # same key pair, new session id
    with pytest.raises(KeyReuseError, match="fresh key pair"):
        seller.respond(replay.SerializeToString())


def test_exact_answers_are_counted_and_can_be_capped(model, seller_data):
    buyer = _prober(model)
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(lifetime=LedgerPolicy(max_exact=2)))
    for _ in range(2):
        seller.respond(buyer.offer(max_samples=100))
    with pytest.raises(PrivacyBudgetExhaustedError, match="exact"):
        seller.respond(buyer.offer(max_samples=100))
    assert seller._ledger.spent(None) == (0.0, 2)  # unauthenticated buyers share one identity


def test_ledger_charges_are_atomic_and_refusals_record_nothing(tmp_path):
    path = tmp_path / "l.json"
    ledger = PrivacyLedger(path, LedgerPolicy(epsilon=50.0))
    m = NoisePolicy(1.0, 1e-6).noise_multiplier

    def charge(i):
        ledger.charge(buyer="b", key=f"k{i}", session_id=f"s{i}", noise_multiplier=m)

    threads = [threading.Thread(target=charge, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reopened = PrivacyLedger(path, LedgerPolicy(epsilon=50.0))
    assert reopened.spent("b")[0] == pytest.approx(composed_epsilon({m: 16}, 1e-5))
    tight = PrivacyLedger(path, LedgerPolicy(epsilon=1e-3))
    before = path.read_bytes()
    with pytest.raises(PrivacyBudgetExhaustedError):
        tight.charge(buyer="b", key="new", session_id="new", noise_multiplier=m)
    assert path.read_bytes() == before
    assert reopened.spent(ANONYMOUS) == (0.0, 0)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        PrivacyLedger(path)


def test_composition_is_the_accountants_not_basic_composition():
    m = NoisePolicy(1.0, 1e-6).noise_multiplier
    one = composed_epsilon({m: 1}, 1e-6)
    # one analytic-Gaussian release is exactly (1, 1e-6)-DP: a valid accountant cannot report less
    assert 1.0 - 1e-9 <= one < 1.5
    hundred = composed_epsilon({m: 100}, 1e-5)
    assert 5.0 < hundred < 20.0 and math.isfinite(hundred)  # ~sqrt(k) growth, far below basic composition (100)


@pytest.mark.parametrize(
    "flag,value,names",
    [
        ("--lifetime-epsilon", "0", "lifetime epsilon"),
        ("--lifetime-epsilon", "nan", "lifetime epsilon"),
        ("--lifetime-delta", "1", "lifetime delta"),
        ("--total-epsilon", "0", "total (seller-wide) epsilon"),
        ("--total-delta", "1", "total (seller-wide) delta"),
        ("--max-exact", "-2", "--max-exact"),
        ("--total-max-exact", "-3", "--total-max-exact"),
    ],
)
def test_seller_serve_refuses_a_bad_lifetime_budget_in_one_line(flag, value, names, tmp_path, capsys):
    err = seller_serve_error(capsys, "--data", str(tmp_path / "d.safetensors"), "--insecure", "--ledger",
                             str(tmp_path / "ledger.json"), flag, value)
    assert names in err  # the one line names the setting that was wrong


def test_sybil_identities_share_the_seller_wide_budget(model, seller_data):
    """A buyer that mints a client certificate per refusal gets no more than the seller-wide budget."""
    per_query = NoisePolicy(1.0, 1e-6)
    lifetime = LedgerPolicy(epsilon=2.0, delta=1e-5, total_epsilon=3.0, total_delta=1e-5)
    seller = Seller("s1", seller_data["s1"], policy=SellerPolicy(noise=per_query, lifetime=lifetime))
    m = per_query.noise_multiplier
    per_buyer = max(q for q in range(1, 50) if composed_epsilon({m: q}, 1e-5) <= 2.0)
    overall = max(q for q in range(1, 50) if composed_epsilon({m: q}, 1e-5) <= 3.0)
    assert per_buyer < overall  # one identity alone cannot spend the seller-wide budget
    buyer, answered, identities = _prober(model), 0, 0
    while identities < 10:
        identities += 1
        peer = f"x509:CN=sybil-{identities}"
        try:
            while True:
                seller.respond(buyer.offer(max_samples=100), peer=peer, authenticated=True)
                answered += 1
        except PrivacyBudgetExhaustedError as exc:
            if "seller-wide" in str(exc):
                assert "--total-epsilon" in str(exc)
                break
            assert "--lifetime-epsilon" in str(exc)
    assert answered == overall and identities == -(-overall // per_buyer) > 1
    eps, exact = seller._ledger.spent_total()
    assert exact == 0 and eps == pytest.approx(composed_epsilon({m: overall}, 1e-5)) and eps <= 3.0


def test_exact_answers_are_capped_by_default_per_buyer_and_seller_wide(model, seller_data):
    """A seller without DP answers one exact query per buyer and a few over all buyers by default."""
    assert (LedgerPolicy().max_exact, LedgerPolicy().total_max_exact) == (1, 16)
    buyer = _prober(model)
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(lifetime=LedgerPolicy(total_max_exact=3)))
    seller.respond(buyer.probe_offer(0), peer="x509:CN=a", authenticated=True)
    with pytest.raises(PrivacyBudgetExhaustedError, match="max_exact, seller serve --max-exact"):
        seller.respond(buyer.probe_offer(1), peer="x509:CN=a", authenticated=True)
    seller.respond(buyer.probe_offer(1), peer="x509:CN=b", authenticated=True)
    seller.respond(buyer.probe_offer(2), peer="x509:CN=c", authenticated=True)
    with pytest.raises(PrivacyBudgetExhaustedError, match="total_max_exact, seller serve --total-max-exact"):
        seller.respond(buyer.probe_offer(3), peer="x509:CN=d", authenticated=True)
    assert seller._ledger.spent_total() == (0.0, 3)
    default = Seller("s0", seller_data["s0"])  # the default policy: dim basis sessions would rebuild the sum
    answered = 0
    with pytest.raises(PrivacyBudgetExhaustedError):
        for k in range(buyer.spec.dim):
            default.respond(buyer.probe_offer(k), peer=f"x509:CN=sybil-{k}", authenticated=True)
            answered += 1
    assert answered == min(16, buyer.spec.dim) < buyer.spec.dim


def test_an_address_passed_as_peer_is_no_ledger_identity_unless_the_carrier_says_so(make_buyer, seller_data):
    """A carrier that hands ``respond`` a network address as ``peer`` and does not say it authenticated
    the buyer grants no ledger identity: every address is the one anonymous buyer, whose one exact answer
    (the default policy) is spent after the first address; a certificate subject the carrier vouches for
    keeps its own."""
    seller = Seller("s0", seller_data["s0"])
    seller.respond(make_buyer(disclosure="aggregate").offer(max_samples=100), peer="ipv4:127.0.0.2")
    for k in range(3, 7):
        with pytest.raises(PrivacyBudgetExhaustedError, match="max_exact"):
            seller.respond(make_buyer(disclosure="aggregate").offer(max_samples=100), peer=f"ipv4:127.0.0.{k}")
    assert seller._ledger.spent(None) == (0.0, 1)
    seller.respond(make_buyer(disclosure="aggregate").offer(max_samples=100), peer="x509:CN=a", authenticated=True)
    assert seller._ledger.spent("x509:CN=a") == (0.0, 1) and seller._ledger.spent(None) == (0.0, 1)
