"""Pre-purchase spot check: open k random committed records with Merkle proofs and test the total.

Why: the audit only helps after a purchase. Before paying, the buyer can ask a seller to open k
records chosen at random *after* the seller committed (its Reply holds the Merkle root). For each
opened record the buyer checks the Merkle path to the committed root, recomputes the record's
clipped projected gradient with its own model (a fabricated or scaled gradient is caught), and
finally tests whether the seller's total is plausible given the opened records' scores: every
score lies in [-B, B] with B = ||v|| C, and the k opened records are drawn without replacement from
the n committed ones, so by the Hoeffding-Serfling inequality (Bardenet & Maillard 2015, Cor. 2.5)
the sample mean of k scores is within ``B sqrt(2 rho_k ln(2/alpha) / k)`` of the true mean except
with probability alpha, where ``rho_k = min(1 - (k-1)/n, (1 - k/n)(1 + 1/k))`` is the finite-
population correction: it falls to 0 as k reaches n, so opening every record demands the exact
total (up to the CKKS error and rounding the audit also allows, and the declared DP noise). A total
whose mean lies further away is flagged.

Catch probability: if a fraction f of a seller's n records is fabricated, opening k distinct
records uniformly at random finds at least one with probability
``1 - C(n - fn, k) / C(n, k)`` (>= ``1 - (1 - f)^k``), see :func:`catch_probability`.
Cost to the seller: the k opened records are revealed before any purchase.

The record count n is the seller's declaration, and the buyer's total is the decrypted mean times
n, so a seller holding r records that declares n > r multiplies its total by n / r. The committed
root binds n and every path is checked at its requested position in a tree of n leaves
(:mod:`tip_fed.protocol.commitment`), so such a seller must commit to n leaves: n - r of them are
fabricated records (caught as above when their gradients are forged; records made up whole and
scored honestly are beyond any check of consistency) or copies of its r records. Copies are caught
when two opened records repeat each other (exact or near copies, or jittered copies closer than a
fraction of the opened records' spacing, :mod:`tip_fed.protocol.duplicates`; an identical leaf hash
at two positions cannot come from an honest seller, whose salts differ per position): whatever the
multiplicities, k distinct positions avoid every repeat with probability at
most ``C(r, k) (n/r)^k / C(n, k)`` (Maclaurin's inequality; 0 once k > r), see
:func:`padding_catch_probability`. An honest seller with duplicate records fails this test too, as
its audit would (``duplicate-records``): with d repeated pairs, with probability at most
``d k (k-1) / (n (n-1))``.
Copies jittered by about the spacing of genuine records cannot be told from genuine records: a
pass refutes padding by close copies, it does not prove n distinct real records (:func:`payable`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tip_fed.core.influence import clip_rows
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import get_task
from tip_fed.errors import DataError
from tip_fed.protocol import commitment
from tip_fed.protocol.audit import GRAD_TOL, SCORE_TOL, Delivery, SessionRecord
from tip_fed.protocol.data import check_batch, dataset_gradients
from tip_fed.protocol.duplicates import RELATIVE_FRACTION, near_copies

if TYPE_CHECKING:
    from tip_fed.protocol.buyer import Valuation


@dataclass
class Opening:
    """k opened records: their data, committed gradients, leaf salts and Merkle paths."""

    indices: list[int]
    data: dict[str, torch.Tensor]
    gradients: np.ndarray
    paths: list[list[tuple[bytes, bool]]]
    salts: list[bytes]


@dataclass
class SpotCheck:
    """Outcome of a spot check of one seller."""

    seller_id: str
    passed: bool
    opened: int
    bad_proofs: list[int] = field(default_factory=list)
    bad_gradients: list[int] = field(default_factory=list)
    repeats: list[tuple[int, int]] = field(default_factory=list)  # opened positions holding the same record
    total_gap: float = 0.0
    total_threshold: float = 0.0
    reasons: list[str] = field(default_factory=list)


def choose(n: int, k: int) -> list[int]:
    """k distinct record indices out of n, from OS entropy (the seller must not predict them)."""
    if not 1 <= k <= n:
        raise DataError(f"a spot check opens 1..{n} records, asked for {k}")
    rng = np.random.default_rng(secrets.randbits(128))
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def open_records(delivery: Delivery, indices: Sequence[int]) -> Opening:
    """Seller side: the records at ``indices`` with their committed gradients and Merkle paths."""
    if delivery.gradients is None or delivery.salt_seed is None:
        raise DataError("opening records needs the committed gradients and the commitment's salt seed")
    check_batch(delivery.data)
    leaves = commitment.leaves(delivery.data, delivery.gradients, delivery.salt_seed)
    idx = list(indices)
    return Opening(
        indices=idx,
        data={k: v[idx] for k, v in delivery.data.items()},
        gradients=delivery.gradients[idx].copy(),
        paths=[commitment.merkle_proof(leaves, i) for i in idx],
        salts=[commitment.record_salt(delivery.salt_seed, i) for i in idx],  # only the opened records' salts
    )


def spot_check(
    record: SessionRecord, valued: Mapping[str, Any], opening: Opening, *, asked: Sequence[int] | None = None,
    alpha: float = 1e-3, near_fraction: float = RELATIVE_FRACTION,
) -> SpotCheck:
    """Buyer side: check an opening of the positions ``asked`` (by default the opening's own, which
    the caller then chose) against the seller's committed root, its declared count and its total;
    ``near_fraction``: the relative near-copy test's fraction (:func:`duplicates.calibrate` for
    tables of mostly discrete columns)."""
    sid = str(valued["seller_id"])
    root = bytes.fromhex(str(valued["commitment"]))
    n = int(valued["n_samples"])
    k = len(opening.indices)
    out = SpotCheck(seller_id=sid, passed=True, opened=k)
    if asked is not None and sorted(opening.indices) != sorted(asked):
        out.reasons.append("the opened positions are not the ones asked for")
    if len(set(opening.indices)) != k:
        out.reasons.append("the opening repeats a position")
    first: dict[bytes, int] = {}
    for j, (i, path, salt) in enumerate(zip(opening.indices, opening.paths, opening.salts, strict=True)):
        try:
            leaf = commitment.leaf_hash(commitment.sample_bytes(opening.data, j), opening.gradients[j], salt)
        except ValueError:
            out.bad_proofs.append(i)
            continue
        # one leaf at two positions: an honest seller's salts differ per position
        if first.setdefault(leaf, i) != i or not commitment.verify_proof(root, leaf, path, i, n):
            out.bad_proofs.append(i)
    near = near_copies(opening.data, fraction=near_fraction)
    out.repeats = [(opening.indices[a], opening.indices[b]) for a, b in near]
    spec = ProjectionSpec.from_dict(record.projection)
    grads = dataset_gradients(record.model_module(), spec, get_task(record.task), opening.data, 64)
    recomputed = clip_rows(grads, record.grad_norm_bound)[0].numpy()
    dev = np.linalg.norm(recomputed - opening.gradients, axis=1) / record.grad_norm_bound
    out.bad_gradients = [opening.indices[j] for j in np.flatnonzero(dev > GRAD_TOL)]
    query = np.asarray(record.query, dtype=np.float64)
    bound = record.score_bound
    mean_opened = float((recomputed @ query).mean())
    claimed = float(valued["total"]) / n
    noise = valued.get("noise") or {}
    out.total_gap = abs(claimed - mean_opened)
    # sampling k of n scores in [-B, B], plus 4 std of the declared noise on the claimed mean, plus the
    # CKKS error and rounding of the released total (the audit's tolerance, per record)
    precision = SCORE_TOL * bound + record.release_quantum / (2 * n)
    out.total_threshold = (sampling_width(bound, k, n, alpha) + 4 * float(noise.get("total_std", 0.0)) / n
                           + precision)
    if out.bad_proofs:
        out.reasons.append(
            f"{len(out.bad_proofs)} opened records do not match their positions under the committed root "
            f"of {n} records"
        )
    if out.repeats:
        out.reasons.append(
            f"{len(out.repeats)} pairs of opened records repeat each other: padding inflates the declared count"
        )
    if out.bad_gradients:
        out.reasons.append(f"{len(out.bad_gradients)} opened records' gradients differ from what their data give")
    if out.total_gap > out.total_threshold:
        out.reasons.append(
            f"the claimed mean score {claimed:.4g} is {out.total_gap:.3g} from the opened records' mean "
            f"{mean_opened:.4g} (threshold {out.total_threshold:.3g} at alpha {alpha:g})"
        )
    out.passed = not out.reasons
    return out


def payable(valuation: Valuation, checks: Iterable[SpotCheck]) -> Valuation:
    """The valuation to pay on after spot checks: a seller whose check failed moves to ``rejected``
    with the reasons; one whose check passed is marked ``spot_checked``, one not checked is not.

    A pass does not confirm the declared count n: it shows that the opened records open at the
    positions asked under a root of n leaves, carry the gradients their data give, repeat no other
    opened record (exactly, or closer than the relative test of :mod:`tip_fed.protocol.duplicates`)
    and agree with the total. n leaves made of fewer real records jittered by about the spacing of
    genuine records pass it; a buyer bounds what any seller can declare with the Offer's
    ``max_samples`` (``settle`` rejects a larger count) and the count paid on with
    ``PayoutInputs.from_valuation(..., max_records=...)``."""
    by_id = {c.seller_id: c for c in checks}
    unknown = sorted(set(by_id) - {s.seller_id for s in valuation.sellers})
    if unknown:
        raise DataError(f"spot checks of sellers this valuation does not hold: {', '.join(unknown)}")
    rejected = dict(valuation.rejected)
    sellers = []
    for s in valuation.sellers:
        check = by_id.get(s.seller_id)
        if check is not None and not check.passed:
            rejected[s.seller_id] = "failed the spot check: " + "; ".join(check.reasons)
        else:
            sellers.append(replace(s, spot_checked=s.spot_checked or check is not None))
    return replace(valuation, sellers=sellers, rejected=rejected)


def sampling_width(bound: float, k: int, n: int, alpha: float) -> float:
    """Half-width that the mean of k of n values in [-bound, bound], drawn without replacement,
    exceeds around the population mean with probability at most alpha (Hoeffding-Serfling)."""
    if not 1 <= k <= n:
        raise DataError(f"a spot check opens 1..{n} records, got {k}")
    rho = min(1.0 - (k - 1) / n, (1.0 - k / n) * (1.0 + 1.0 / k))
    return bound * math.sqrt(2.0 * rho * math.log(2.0 / alpha) / k)


def catch_probability(n: int, bad: int, k: int) -> float:
    """Probability that k distinct records drawn from n include at least one of ``bad`` ones."""
    if bad <= 0:
        return 0.0
    if k > n - bad:
        return 1.0
    return 1.0 - math.comb(n - bad, k) / math.comb(n, k)


def padding_catch_probability(n: int, distinct: int, k: int) -> float:
    """Lower bound on the probability that k distinct positions of n, holding only ``distinct``
    different records, open two copies of one: ``1 - C(r, k) (n/r)^k / C(n, k)`` (module docstring)."""
    if not 1 <= distinct <= n or not 1 <= k <= n:
        raise DataError(f"need 1 <= distinct records, opened records <= n = {n}; got {distinct} and {k}")
    if k > distinct:
        return 1.0
    log_free = (math.lgamma(distinct + 1) - math.lgamma(distinct - k + 1) + k * math.log(n / distinct)
                - math.lgamma(n + 1) + math.lgamma(n - k + 1))
    return max(0.0, 1.0 - math.exp(log_free))
