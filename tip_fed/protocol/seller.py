"""The seller role: decode an Offer, score private data against the encrypted query, Reply.

The seller's records and gradients never leave this object; only the commitment root and the
masked result ciphertexts do. Everything in the Offer is untrusted input and is validated first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tip_fed.config import SellerBudgetConfig, SellerConfig
from tip_fed.core.influence import clip_rows, released_rows
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import Task, get_task
from tip_fed.crypto.encoding_cache import EncodingCache
from tip_fed.crypto.keys import PublicContext, load_public_context
from tip_fed.crypto.packing import score_rows
from tip_fed.crypto.query import LoadedQuery, load_query
from tip_fed.errors import DataError, ProtocolError, SessionError, TipError
from tip_fed.protocol import commitment
from tip_fed.protocol.audit import Delivery
from tip_fed.protocol.data import Batch, check_batch, dataset_gradients
from tip_fed.protocol.disclosure import NoisePolicy, Release, plan_release
from tip_fed.protocol.formats import InputFormat, TextFormat, check_fields
from tip_fed.protocol.ledger import LedgerPolicy, PrivacyLedger, default_ledger
from tip_fed.protocol.messages import SELLER_ID
from tip_fed.protocol.model import RunShape, decode_model
from tip_fed.protocol.model_cache import HeldModel, ModelCache
from tip_fed.protocol.offer import Offer, decode_offer
from tip_fed.protocol.records import RawRecords
from tip_fed.protocol.reply import Reply, Timings, encode_reply
from tip_fed.protocol.resources import InFlight, OfferCost, ResourceBudget, WeightsHeader, cost_offer
from tip_fed.protocol.sessions import AnsweredSessions, session_key

log = logging.getLogger(__name__)

_KEPT_SESSIONS = 64
_KEPT_BYTES = 256 << 20


_SELLER = SellerConfig()  # the [seller] defaults: a policy made in code starts where a served seller does


def _noise(c: SellerConfig) -> NoisePolicy:
    return NoisePolicy(c.dp_epsilon, c.dp_delta)


def _lifetime(c: SellerConfig) -> LedgerPolicy:
    return LedgerPolicy(c.lifetime_epsilon, c.lifetime_delta, max_exact=None if c.max_exact == -1 else c.max_exact,
                        total_epsilon=c.total_epsilon, total_delta=c.total_delta,
                        total_max_exact=None if c.total_max_exact == -1 else c.total_max_exact)


@dataclass
class SellerPolicy:
    """Limits a seller enforces whatever the buyer asks.

    Every default is the ``[seller]`` / ``[seller-budget]`` default of :mod:`tip_fed.config` (one typed
    config), so ``SellerPolicy()`` is what ``tip-fed seller serve`` answers under with no flags, except
    where the ledger lives: ``ledger=None`` keeps it in this object's memory, and
    :meth:`beside` (what :func:`tip_fed.grpc.serve` and a Flower SuperNode apply) puts it in a file.
    """

    max_queries_per_session: int = _SELLER.max_queries_per_session
    batch_size: int = _SELLER.batch_size
    expected_fingerprint: str | None = _SELLER.expected_fingerprint
    # Gaussian noise this seller adds to what it releases, whatever the Offer asks (the stricter wins).
    noise: NoisePolicy = field(default_factory=lambda: _noise(_SELLER))
    # Keep encoded score plaintexts (MiB) for repeated queries over the same gradients; 0 = off.
    encoding_cache_mb: int = 0
    # What one Offer, and all Offers at once, may cost this seller (checked before allocating).
    budget: ResourceBudget = field(default_factory=ResourceBudget)
    # Privacy ledger file (per-buyer lifetime budget, answered public keys); None = in memory only.
    ledger: str | None = _SELLER.ledger
    lifetime: LedgerPolicy = field(default_factory=lambda: _lifetime(_SELLER))
    # Per-sample scores without noise are exact linear functionals of each record: refused unless set.
    exact_per_sample: bool = _SELLER.exact_per_sample
    # Models held for Offers that reference them by fingerprint (MiB of weights; 0 = none held, every
    # reference is answered "model not held"), optionally persisted in a directory.
    model_cache_mb: int = _SELLER.model_cache_mb
    model_cache_dir: str | None = _SELLER.model_cache_dir

    @classmethod
    def from_config(cls, config: SellerConfig, budget: SellerBudgetConfig | None = None) -> SellerPolicy:
        """The policy the ``[seller]`` settings declare (``tip-fed seller serve`` flags; -1 = unlimited)."""
        c = config
        return cls(
            max_queries_per_session=c.max_queries_per_session, batch_size=c.batch_size,
            expected_fingerprint=c.expected_fingerprint, noise=_noise(c), budget=budget or ResourceBudget(),
            ledger=c.ledger, lifetime=_lifetime(c), exact_per_sample=c.exact_per_sample,
            model_cache_mb=c.model_cache_mb, model_cache_dir=c.model_cache_dir,
        )

    def beside(self, data_path: str | Path) -> SellerPolicy:
        """This policy for a seller serving ``data_path``: its ledger a file, the ``ledger`` setting's or
        else :func:`~tip_fed.protocol.ledger.default_ledger` beside the data. A served seller's lifetime
        caps (``max-exact``, the DP budget) must outlive its process: an in-memory ledger would give every
        restart, crash or reload a fresh budget."""
        return replace(self, ledger=self.ledger or str(default_ledger(data_path)))


@dataclass(frozen=True)
class _Job:
    """What answering one Offer needs besides the Offer itself (none of it depends on a record)."""

    context: PublicContext
    query: LoadedQuery  # parsed before the charge: a damaged query costs the buyer nothing
    model: nn.Module
    task: Task
    release: Release  # the noise, decided and drawn before any record is read
    fmt: tuple[bytes, InputFormat] | None
    t_ctx: float  # seconds loading the public context (HE work, reported under encrypted_s)


class Seller:
    """One data seller.

    Parameters
    ----------
    seller_id:
        Public name of the seller, echoed in every Reply.
    data:
        The private records: a dict of tensors with a shared first (sample) dimension, in the
        format of the buyer's task (e.g. ``{"x": float[n, d], "y": long[n]}``), or raw records
        (:class:`~tip_fed.protocol.records.RawRecords`: table rows, text) that each Offer's input
        format encodes into that session's tensors.
    answered:
        Queries already answered per session (see :mod:`tip_fed.protocol.sessions`). A runtime that
        recreates the seller for every message (Flower ClientApps are stateless) passes the same
        dict each time, so the query budget holds across messages; it is updated in place.
    """

    def __init__(
        self,
        seller_id: str,
        data: Batch | RawRecords,
        *,
        policy: SellerPolicy | None = None,
        seed: int | None = None,
        answered: dict[str, int] | None = None,
    ):
        if not SELLER_ID.match(seller_id):
            raise DataError(f"seller id {seller_id!r} must be 1-128 characters of letters, digits, _.:@-")
        self.seller_id = seller_id
        self._raw = data if isinstance(data, RawRecords) else None
        self.n_samples = len(data) if isinstance(data, RawRecords) else check_batch(data)
        self._data: Batch = {} if isinstance(data, RawRecords) else dict(data)
        self._encoded: tuple[bytes, InputFormat, Batch] | None = None  # the last input format and its tensors
        self._scoring: Batch = self._data  # the tensors of the Offer being scored
        self.policy = policy or SellerPolicy()
        budget = self.policy.budget
        self._sessions = AnsweredSessions(answered, capacity=budget.kept_sessions, window_s=budget.session_window_s)
        self._in_flight = InFlight(budget)
        # Services answer offers on many threads: check-and-spend of the budget must be atomic,
        # or one offer sent N times at once would be answered N times.
        self._lock = threading.Lock()
        # Costing and validation run concurrently; the scoring itself (shared RNG, encoding
        # cache) runs one Offer at a time.
        self._compute_lock = threading.Lock()
        self._tokens = _tokens_per_sample(self._data)
        self._rng = np.random.default_rng(seed)
        self._committed: dict[str, tuple[np.ndarray, bytes | None, bytes, Batch]] = {}
        self._ledger = PrivacyLedger(self.policy.ledger, self.policy.lifetime)
        mb = self.policy.encoding_cache_mb
        self._encodings = EncodingCache(mb * 1024 * 1024) if mb > 0 else None
        self.models = ModelCache(self.policy.model_cache_mb * 1024 * 1024, self.policy.model_cache_dir)

    def respond(self, offer_bytes: bytes, *, peer: str | None = None, authenticated: bool = False) -> bytes:
        """Answer one Offer with a Reply (both as bytes), one protocol step after the other.

        ``peer`` is the buyer as the carrier knows it (a client certificate subject, a network
        address); the query budget and the commitment are kept per (session, peer), and a referenced
        model must be one this peer uploaded. The privacy ledger charges the answer to ``peer`` only
        if the carrier says it ``authenticated`` it (False by default, so that a carrier passing a
        network address cannot grant one ledger identity per address); otherwise (and for None) to
        the one identity all unauthenticated buyers share: an address is no identity, a buyer can
        bind many.
        The Offer is costed against ``policy.budget`` before anything is allocated. Admission takes
        one query of the session's budget at once (so concurrent copies of one Offer cannot all pass)
        and gives it back if the Offer is refused or fails before it is answered; the privacy ledger
        is charged only once the whole Offer has validated.
        """
        t0 = time.perf_counter()
        offer = decode_offer(offer_bytes, self.policy.budget)  # decoded and validated, once
        key = self._admit(offer, peer)  # sizes checked, one query of the session's budget taken
        try:
            # a referenced model this buyer uploaded before, else ModelNotHeldError: nothing allocated
            held = self.models.resolve(offer.model, self.seller_id, peer) if offer.references_model else None
            cost = self.cost(offer, held=held.header if held else None)  # before anything is allocated
            with self._in_flight.reserve(cost.total_bytes):
                job = self._open(offer, peer, held, cost)  # context, model, noise, input format
                self._charge(offer, job, peer if authenticated else None)  # the whole Offer validated
                reply = self._score(offer, job, t0, key)  # gradients, commitment, scores under encryption
        except BaseException:
            with self._lock:
                self._sessions.refund(key)  # nothing was answered: the query taken at admission is given back
            raise
        return encode_reply(reply)

    def cost(self, offer: Offer, held: WeightsHeader | None = None) -> OfferCost:
        """What answering the decoded ``offer`` would cost this seller (``held``: the weights of a
        referenced model this seller holds); ResourceLimitError if over budget."""
        return cost_offer(offer, self.n_samples, batch_size=self.policy.batch_size, tokens_per_sample=self._tokens,
                          budget=self.policy.budget, held=held)

    def _admit(self, offer: Offer, peer: str | None) -> str:
        """The session key of an Offer this seller may answer, one query of its budget taken (the
        caller refunds it unless the Offer is answered); refusals here take nothing."""
        if self.n_samples > offer.max_samples:
            raise ProtocolError(
                f"seller {self.seller_id} holds {self.n_samples} samples but the offer accepts at most "
                f"{offer.max_samples}; ask the buyer for a larger max_samples"
            )
        if self._raw is not None and offer.input_format is None:
            raise ProtocolError(
                f"seller {self.seller_id} holds raw records ({self._raw.source}) and the offer carries no input "
                "format to encode them; the buyer must send one (Buyer(..., input_format=TableFormat|TextFormat))"
            )
        limit = min(offer.query_budget, self.policy.max_queries_per_session)
        with self._lock:
            return self._sessions.spend(offer.session_id, limit, self.seller_id, peer)

    def _open(self, offer: Offer, peer: str | None, held: HeldModel | None, cost: OfferCost) -> _Job:
        """Everything scoring needs that depends on no record's values: a failure here charges nothing."""
        t_ctx = time.perf_counter()
        context = load_public_context(offer.public_context, offer.plan)  # early: a bad context fails fast
        t_ctx = time.perf_counter() - t_ctx  # HE work: reported under encrypted_s
        # the fingerprint is checked again either way; the header is the one costing read
        task, fmt = get_task(offer.task), self._input_format(offer)
        # built, then run on a record-free batch of the costed shape: a model that fails there is refused uncharged
        shape = RunShape(offer.spec, task, fmt[1] if fmt else self._data, min(self.policy.batch_size, self.n_samples))
        model = decode_model(held.payload if held is not None else offer.model, runs_on=shape,
                             expected_fingerprint=self.policy.expected_fingerprint, header=cost.weights)
        if held is None:
            # shipped and built (its fingerprint checked): the buyer may reference it from now on
            self.models.admit(offer.model, peer, checked=cost.weights)
        release = plan_release(self.policy.noise, offer.dp_epsilon, offer.dp_delta, per_sample=offer.per_sample,
                               shape=(self.n_samples, offer.spec.dim), session_id=offer.session_id,
                               seller_id=self.seller_id)
        noise = release.noise
        if offer.per_sample and not noise.enabled and not self.policy.exact_per_sample:
            raise ProtocolError(
                f"seller {self.seller_id} releases per-sample scores only with differential-privacy noise; "
                "set protocol.dp-epsilon in the offer, or ask for aggregate disclosure"
            )
        # parsed, and the noise the release adds (per coordinate: a row's, or the mean's) checked to fit
        std = release.gradient_std / (1 if offer.per_sample else self.n_samples)
        query = load_query(context, offer.plan, list(offer.query), noise_std=std)
        return _Job(context, query, model, task, release, fmt, t_ctx)

    def _charge(self, offer: Offer, job: _Job, buyer: str | None) -> None:
        """The whole Offer validated: charge the buyer's lifetime privacy budget (the session's query
        was taken at admission)."""
        with self._lock:
            self._ledger.charge(buyer=buyer, key=job.context.public_key_digest, session_id=offer.session_id,
                                noise_multiplier=job.release.noise_multiplier)

    def _score(self, offer: Offer, job: _Job, t0: float, key: str) -> Reply:
        """Projected gradients, clipped and committed to, then scored under encryption."""
        data = self._session_data(job.fmt)  # reads record values: a failure here was charged like an answer
        with self._compute_lock:
            self._scoring = data  # under the compute lock: what projected_gradients reads
            grads = self.projected_gradients(job.model, offer.spec, job.task)
            clipped, factors = clip_rows(grads, offer.grad_norm_bound)
            n_clipped = int((factors < 1.0).sum())
            t_grad = time.perf_counter()

            g = clipped.numpy()
            root, salt_seed = commitment.commit_fresh(data, g)  # the salt hides the root until delivery
            t_commit = time.perf_counter()

            scores, n_rows = self.encrypted_scores(offer, job.query, g / offer.grad_norm_bound, job.release)
            self._keep(key, g, job.release.seed, salt_seed, data)
        t_end = time.perf_counter()
        release = job.release
        noise = release.noise
        return Reply(
            session_id=offer.session_id,
            seller_id=self.seller_id,
            n_samples=self.n_samples,
            commitment=root,
            n_rows=n_rows,
            scores=tuple(scores),
            # the exact count at a buyer-chosen bound tells neighbouring datasets apart: withheld under DP
            clipped=0 if noise.enabled else n_clipped,
            timings=Timings(
                gradients_s=t_grad - t0 - job.t_ctx,
                commit_s=t_commit - t_grad,
                encrypted_s=t_end - t_commit + job.t_ctx,
                total_s=t_end - t0,
            ),
            dp_epsilon=noise.epsilon or 0.0,
            dp_delta=noise.delta if noise.enabled else 0.0,
            noise_std=release.gradient_std,
            noise_commitment=release.commitment,
        )

    def encrypted_scores(
        self, offer: Offer, query: LoadedQuery, rows: np.ndarray, release: Release
    ) -> tuple[list[bytes], int]:
        """(reply ciphertexts, rows scored) for the committed gradients ``rows`` in units of the
        bound (norm <= 1): their mean, and each row under per-sample disclosure, plus the noise
        ``release`` drew, against the encrypted ``query`` (loaded when the Offer was opened)."""
        matrix = released_rows(rows, release.per_sample)
        cache = None if release.noise.enabled else self._encodings  # noisy rows never repeat
        cts = score_rows(query.ctx, offer.plan, query, matrix, rng=self._rng, row_noise=release.row_noise,
                         cache=cache)
        return cts, int(matrix.shape[0])

    def projected_gradients(self, model: nn.Module, spec: ProjectionSpec, task: Task) -> torch.Tensor:
        """Float64 projected per-sample gradients of the records being scored (before clipping)."""
        return dataset_gradients(model, spec, task, self._scoring, self.policy.batch_size)

    def _input_format(self, offer: Offer) -> tuple[bytes, InputFormat] | None:
        """The Offer's input format for raw records (None for a tensor seller), its tokenizer parsed
        and the fields it reads checked against the records' schema, so what fails here depends
        on no record's values and is refused before anything is charged."""
        if self._raw is None or offer.input_format is None or offer.input_digest is None:
            return None
        digest = offer.input_digest
        with self._lock:
            cached = self._encoded
        if cached is not None and cached[0] == digest:
            return digest, cached[1]
        fmt = offer.input_format
        if isinstance(fmt, TextFormat):
            fmt.tokenizer()
        check_fields(fmt, self._raw)
        return digest, fmt

    def _session_data(self, fmt: tuple[bytes, InputFormat] | None) -> Batch:
        """The tensors an Offer is scored on: the seller's own, or its raw records in the Offer's input
        format (reused while the buyer keeps sending the same format).

        Whether a format fits the records' values is itself information about them, so a failure here
        reaches the buyer without values or record numbers (the seller's log has them) and only after the
        buyer's ledger was charged for the answer: a buyer cannot probe records for free.
        """
        if fmt is None or self._raw is None:
            return self._data
        digest, form = fmt
        with self._lock:
            cached = self._encoded
        if cached is not None and cached[0] == digest:
            return cached[2]
        try:
            data = form.encode(self._raw)
            check_batch(data)
        except TipError as exc:
            log.warning("seller %s: the records do not fit an offer's input format: %s", self.seller_id, exc)
            raise DataError(
                f"seller {self.seller_id}'s records do not fit the offer's input format (a value is not numeric, "
                "not one of its classes, or an empty text; the seller's log says which); the refusal counted "
                "as an answer"
            ) from None
        with self._lock:
            self._encoded = (digest, form, data)
        return data

    def deliver(self, session_id: str, peer: str | None = None) -> Delivery:
        """After a purchase: the records and the gradients committed to in that session, for the audit.

        ``peer`` is the buyer as :meth:`respond` knew it: what was committed is kept per (session, peer),
        so another peer replaying the buyer's Offer bytes is answered under its own entry and cannot
        replace the commitment the buyer audits."""
        kept = self._committed.get(session_key(session_id, peer))
        if kept is None:
            raise SessionError(
                f"seller {self.seller_id} has no commitment for session {session_id[:8]}…; it never answered "
                f"that session or it was forgotten (the last {_KEPT_SESSIONS} sessions, at most "
                f"{_KEPT_BYTES >> 20} MiB of gradients, are kept); deliver right after the purchase"
            )
        return Delivery(data=dict(kept[3]), gradients=kept[0].copy(), noise_seed=kept[1], salt_seed=kept[2])

    def _keep(self, key: str, gradients: np.ndarray, seed: bytes | None, salt_seed: bytes, data: Batch) -> None:
        """Remember committed gradients (and the tensors scored) for delivery under the session's table
        key (session and peer); bounded in sessions and bytes (a long-running service must not grow
        with every buyer), oldest sessions forgotten first."""
        with self._lock:
            self._committed[key] = (gradients, seed, salt_seed, data)
            while len(self._committed) > _KEPT_SESSIONS or (
                len(self._committed) > 1 and _kept_bytes(self._committed.values(), self._data) > _KEPT_BYTES
            ):
                del self._committed[next(iter(self._committed))]


def _kept_bytes(kept: Iterable[tuple[np.ndarray, bytes | None, bytes, Batch]], own: Batch) -> int:
    """Gradients plus the distinct encoded batches (sessions of one input format share theirs; a
    tensor seller's own data is held anyway)."""
    entries = list(kept)
    batches = {id(k[3]): k[3] for k in entries if k[3] is not own}
    return sum(k[0].nbytes for k in entries) + sum(t.nbytes for b in batches.values() for t in b.values())


def _tokens_per_sample(data: Batch) -> int:
    """Positions per record the model sees (token ids: their length; feature rows: 1)."""
    tokens = [
        int(np.prod(v.shape[1:]))
        for v in data.values()
        if v.ndim >= 2 and not torch.is_floating_point(v) and v.dtype != torch.bool
    ]
    return max(tokens, default=1)
