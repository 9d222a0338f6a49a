"""The seller role: validate an Offer, score private data against the encrypted query, Reply.

The seller's records and gradients never leave this object; only the commitment root and the
masked result ciphertexts do. Everything in the Offer is untrusted input and is validated first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.tasks import get_task
from tip_fed.crypto.keys import load_public_context
from tip_fed.crypto.packing import score_rows
from tip_fed.crypto.params import check_params
from tip_fed.errors import BudgetExceededError, DataError, ProtocolError
from tip_fed.protocol import commitment
from tip_fed.protocol.data import Batch, check_batch, iter_batches
from tip_fed.protocol.convert import params_from_pb, plan_from_pb, spec_from_pb
from tip_fed.protocol.messages import PROTOCOL_VERSION, SELLER_ID, decode_offer, disclosure_name
from tip_fed.protocol.model import decode_model
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

@dataclass
class SellerPolicy:
    """Limits a seller enforces whatever the buyer asks."""

    max_queries_per_session: int = 1
    batch_size: int = 64
    expected_fingerprint: str | None = None


class Seller:
    """One data seller.

    Parameters
    ----------
    seller_id:
        Public name of the seller, echoed in every Reply.
    data:
        The private records as a dict of tensors with a shared first (sample) dimension, in the
        format of the buyer's task (e.g. ``{"x": float[n, d], "y": long[n]}``).
    """

    def __init__(self, seller_id: str, data: Batch, *, policy: SellerPolicy | None = None, seed: int | None = None):
        if not SELLER_ID.match(seller_id):
            raise DataError(f"seller id {seller_id!r} must be 1-128 characters of letters, digits, _.:@-")
        self.seller_id = seller_id
        self.n_samples = check_batch(data)
        self._data = dict(data)
        self.policy = policy or SellerPolicy()
        self._answered: dict[str, int] = {}
        self._rng = np.random.default_rng(seed)

    def respond(self, offer_bytes: bytes) -> bytes:
        """Answer one Offer with a Reply (both as bytes)."""
        t0 = time.perf_counter()
        offer = decode_offer(offer_bytes)
        self._spend_budget(offer)
        disclosure = disclosure_name(offer.disclosure)
        if self.n_samples > offer.max_samples:
            raise ProtocolError(
                f"seller {self.seller_id} holds {self.n_samples} samples but the offer accepts at most "
                f"{offer.max_samples}; ask the buyer for a larger max_samples"
            )
        params = params_from_pb(offer.he)
        check_params(params)
        plan = plan_from_pb(offer.packing, params)
        context = load_public_context(offer.public_context, params)
        model = decode_model(offer.model, expected_fingerprint=self.policy.expected_fingerprint)
        spec = spec_from_pb(offer.projection)
        if plan.dim != spec.dim:
            raise ProtocolError(f"the offer's packing is for dimension {plan.dim} but its projection has {spec.dim}")
        task = get_task(offer.task)

        grads = torch.cat(
            [projected_grads(model, spec, task, b) for b in iter_batches(self._data, self.policy.batch_size)]
        ).to(torch.float64)
        clipped, factors = clip_rows(grads, offer.grad_norm_bound)
        n_clipped = int((factors < 1.0).sum())
        t_grad = time.perf_counter()

        g = clipped.numpy()
        root = commitment.commit(self._data, g)
        t_commit = time.perf_counter()

        rows = g / offer.grad_norm_bound
        mean = rows.mean(axis=0, keepdims=True)
        matrix = np.vstack([rows, mean]) if disclosure == "per-sample" else mean
        cts = score_rows(context, plan, list(offer.query), matrix, rng=self._rng)
        t_end = time.perf_counter()

        reply = pb.Reply(
            protocol_version=PROTOCOL_VERSION,
            session_id=offer.session_id,
            seller_id=self.seller_id,
            n_samples=self.n_samples,
            commitment=root,
            n_rows=int(matrix.shape[0]),
            scores=cts,
            clipped=n_clipped,
            timings=pb.Timings(
                gradients_s=t_grad - t0, commit_s=t_commit - t_grad, encrypted_s=t_end - t_commit, total_s=t_end - t0
            ),
        )
        return reply.SerializeToString()

    def _spend_budget(self, offer: pb.Offer) -> None:
        limit = min(offer.query_budget, self.policy.max_queries_per_session)
        used = self._answered.get(offer.session_id, 0)
        if used >= limit:
            raise BudgetExceededError(
                f"seller {self.seller_id} already answered {used} quer{'y' if used == 1 else 'ies'} in session "
                f"{offer.session_id[:8]}…, its budget; start a new session with fresh keys"
            )
        self._answered[offer.session_id] = used + 1
