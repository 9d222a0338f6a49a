"""The buyer role: prepare the private query, make Offers, settle Replies into a valuation.

The buyer owns the only secret key. Each Offer opens a session with a fresh key pair; settling
decrypts the scores it asked for and destroys that session's secret key.
"""

from __future__ import annotations

import copy
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import nn

from tip_fed.core.precondition import Preconditioner
from tip_fed.core.tasks import Task, get_task
from tip_fed.crypto.keys import SessionKeys
from tip_fed.crypto.packing import decrypt_scores, encrypt_query
from tip_fed.crypto.params import HEParams, PackingPlan, plan_packing
from tip_fed.errors import ConfigError, ProtocolError, SessionError, TipError
from tip_fed.protocol.audit import SessionRecord, model_record
from tip_fed.protocol.data import Batch
from tip_fed.protocol.disclosure import NoisePolicy, check_declared_std, noise_ceiling, release_quantum, round_release
from tip_fed.protocol.formats import InputFormat
from tip_fed.protocol.ledger import composed_epsilon
from tip_fed.protocol.messages import PROTOCOL_VERSION
from tip_fed.protocol.model import decode_model
from tip_fed.protocol.offer import Offer, encode_offer
from tip_fed.protocol.prepared import BuyerSettings, PreparedQuery, fit_query
from tip_fed.protocol.records import RawRecords
from tip_fed.protocol.reply import Reply, decode_reply, reply_label

QUERY_NORM = 2.0**10


@dataclass
class SellerValuation:
    """What the buyer learned about one seller."""

    seller_id: str
    n_samples: int
    total: float
    per_sample: np.ndarray | None
    commitment: str
    clipped: int
    timings: dict[str, float]
    # DP noise the seller declared: epsilon, delta, gradient_std (units of C), std and total_std (score
    # units), commitment (hex of the seed commitment, opened at delivery)
    noise: dict[str, Any] | None = None
    # a spot check of this seller passed (spotcheck.payable). n_samples (and so total = mean x n) stays
    # the seller's declaration either way: a pass shows that the opened leaves open at their positions
    # under a root of n leaves and repeat no other opened record, not that n distinct real records exist
    spot_checked: bool = False

    @property
    def mean(self) -> float:
        """Average score per sample."""
        return self.total / self.n_samples

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (per-sample scores as a list)."""
        d = dict(self.__dict__)
        d["per_sample"] = None if self.per_sample is None else [float(x) for x in self.per_sample]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SellerValuation:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)
        d["per_sample"] = None if d.get("per_sample") is None else np.asarray(d["per_sample"], dtype=np.float64)
        return cls(**d)


@dataclass
class Valuation:
    """Result of settling one session."""

    session_id: str
    sellers: list[SellerValuation]
    rejected: dict[str, str]
    missing: list[str]
    manifest: dict[str, Any]

    def by_id(self) -> dict[str, SellerValuation]:
        """Seller valuations keyed by seller id."""
        return {s.seller_id: s for s in self.sellers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, so a valuation made in another process can be handed back."""
        return {
            "session_id": self.session_id,
            "sellers": [s.to_dict() for s in self.sellers],
            "rejected": dict(self.rejected),
            "missing": list(self.missing),
            "manifest": self.manifest,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Valuation:
        """Inverse of :meth:`to_dict`."""
        return cls(
            session_id=data["session_id"],
            sellers=[SellerValuation.from_dict(s) for s in data["sellers"]],
            rejected=dict(data["rejected"]),
            missing=list(data["missing"]),
            manifest=dict(data["manifest"]),
        )


@dataclass
class BuyerSession:
    """One session the buyer opened: its fresh keys, the packing plan, and whether it is settled."""

    session_id: str
    keys: SessionKeys
    plan: PackingPlan
    disclosure: str
    max_samples: int
    settled: bool = False


class Buyer:
    """One data buyer with a model, a task, an objective set and (optionally) its training data.

    The preconditioner is fitted on ``train`` (the buyer's own training data, or the objective
    set when absent); the query is ``v = P · mean objective gradient``. That fit is the costly
    part: :meth:`prepare` does it alone, and :meth:`from_prepared` makes a buyer from a (saved)
    :class:`~tip_fed.protocol.prepared.PreparedQuery` without refitting.
    With ``input_format`` (:mod:`tip_fed.protocol.formats`) every Offer carries it, so sellers
    holding raw records encode them exactly as the buyer encodes its own raw records.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        objective: Batch | RawRecords,
        train: Batch | RawRecords | None = None,
        settings: BuyerSettings | None = None,
        input_format: InputFormat | None = None,
    ) -> None:
        self._adopt(self.prepare(model, task, objective, train, settings, input_format), model=model, task=task)

    # Fit the query once (gradients, preconditioner, query, bound); save it with ``.save(dir)``.
    prepare = staticmethod(fit_query)

    @classmethod
    def from_prepared(cls, prepared: PreparedQuery, *, task: Task | None = None) -> Buyer:
        """A buyer that makes Offers from ``prepared`` without refitting (``task``: a custom Task
        object for a prepared query whose task is not built in)."""
        buyer = cls.__new__(cls)
        buyer._adopt(prepared, model=None, task=task)
        return buyer

    def _adopt(self, prepared: PreparedQuery, *, model: nn.Module | None, task: Task | None) -> None:
        if task is not None and task.name != prepared.task:
            raise ConfigError(f"task {task.name!r} is not the prepared query's task {prepared.task!r}")
        self.prepared = prepared
        self.task = task if task is not None else get_task(prepared.task)
        self.settings = prepared.settings
        self.spec = prepared.spec
        self.query = prepared.query
        self.query_norm = prepared.query_norm
        self.grad_norm_bound = prepared.grad_norm_bound
        self.input_format = prepared.input_format
        self.params = HEParams(
            poly_modulus_degree=self.settings.crypto.poly_modulus_degree,
            coeff_mod_bit_sizes=tuple(self.settings.crypto.coeff_mod_bit_sizes),
            global_scale_bits=self.settings.crypto.global_scale_bits,
        )
        #: Step released scores are rounded to (exact decryptions never leave the buyer).
        self.release_quantum = release_quantum(self.query_norm * self.grad_norm_bound,
                                               self.settings.protocol.release_digits)
        #: Largest gradient-noise std a reply may declare (its range check widens with the declared noise).
        self.max_noise_std = noise_ceiling(self.settings.protocol)
        # the one security check of the buyer's CKKS parameters: every session's plan derives from this one
        self._plan = plan_packing(self.spec.dim, 1, self.params)
        self._payload = prepared.model
        self._model = model
        self._sessions: dict[str, BuyerSession] = {}
        self.session_id: str | None = None
        # what every session's manifest states of the disclosure controls (from the settings alone)
        self._disclosure_controls = self._controls()

    @property
    def model(self) -> nn.Module:
        """The buyer's model (rebuilt from the prepared payload, fingerprint checked, on first use)."""
        if self._model is None:
            self._model = decode_model(self._payload)
        return self._model

    @property
    def preconditioner(self) -> Preconditioner:
        """The fitted preconditioner ``P`` of the query."""
        return self.prepared.preconditioner

    @property
    def model_fingerprint(self) -> str:
        """Fingerprint sellers see in every Offer."""
        return self._payload.fingerprint

    def offer(self, max_samples: int = 10_000) -> bytes:
        """Open a session with fresh keys and return its Offer, the same bytes for every seller."""
        if max_samples < 1:
            raise ProtocolError("max_samples must be >= 1")
        protocol = self.settings.protocol
        max_rows = max_samples + 1 if protocol.disclosure == "per-sample" else 1
        plan = self._plan.for_rows(max_rows)
        keys, public_context = SessionKeys.open(plan)
        x = (self.query / self.query_norm * QUERY_NORM).numpy()
        offer = Offer(
            session_id=uuid.uuid4().hex,
            model=self._payload,
            task=self.task.name,
            spec=self.spec,
            plan=plan,
            public_context=public_context,
            query=tuple(encrypt_query(keys, plan, x)),
            query_norm=QUERY_NORM,
            disclosure=protocol.disclosure,
            grad_norm_bound=self.grad_norm_bound,
            query_budget=protocol.query_budget,
            max_samples=max_samples,
            dp_epsilon=protocol.dp_epsilon or 0.0,
            dp_delta=protocol.dp_delta if protocol.dp_epsilon else 0.0,
            input_format=self.input_format,
        )
        self._sessions[offer.session_id] = BuyerSession(offer.session_id, keys, plan, protocol.disclosure, max_samples)
        self.session_id = offer.session_id
        return encode_offer(offer)

    def settle(
        self, replies: Iterable[bytes], *, session_id: str | None = None, expected: Sequence[str] = ()
    ) -> Valuation:
        """Decrypt every valid Reply of a session (the latest by default), then destroy its secret key.

        Invalid replies do not abort settlement: each is listed in ``Valuation.rejected`` with the
        reason, and sellers in ``expected`` that sent nothing valid are listed as missing.
        """
        session_id = session_id or self.session_id
        session = self._sessions.get(session_id) if session_id else None
        if session_id is None or session is None:
            raise SessionError("no such session: call offer() first, then settle that session's replies")
        if session.settled:
            raise SessionError(f"session {session_id[:8]}… is already settled and its key destroyed; open a new one")
        sellers: list[SellerValuation] = []
        rejected: dict[str, str] = {}
        try:
            for i, data in enumerate(replies):
                try:
                    sellers.append(self._decode(session, data, {s.seller_id for s in sellers}))
                except TipError as exc:
                    rejected[reply_label(data, i)] = str(exc)
        finally:
            session.keys.destroy()
            session.settled = True
        got = {s.seller_id for s in sellers}
        return Valuation(
            session_id=session_id,
            sellers=sellers,
            rejected=rejected,
            missing=[s for s in expected if s not in got],
            manifest=self._manifest(session),
        )

    def _decode(self, session: BuyerSession, data: bytes, seen: set[str]) -> SellerValuation:
        """One Reply's valuation, one step after the other; a TipError rejects this reply only."""
        reply = decode_reply(data)  # decoded and validated, once
        rows = _check_reply(session, reply, seen)  # this session's, from a new seller, the shape asked for
        noise = _declared_noise(reply, session.disclosure == "per-sample", self.max_noise_std)  # consistent, or refused
        y = self._decrypt(session, reply, rows)
        return self._release(session, reply, y, noise)

    def _decrypt(self, session: BuyerSession, reply: Reply, rows: int) -> np.ndarray:
        """The reply's scores decrypted with the session's key, in units of the scaled query."""
        y = decrypt_scores(session.keys, session.plan, list(reply.scores), rows)
        # Rows have norm <= 1 and the query norm is QUERY_NORM, so |y| <= QUERY_NORM plus the
        # declared gradient noise seen through the query (std QUERY_NORM * noise_std per row; the mean
        # row, the last, averages n rows' noise: / sqrt(n) per-sample, / n aggregate). Anything larger
        # was not encrypted under this session's key (a replayed or forged reply decrypts to values
        # spread over the whole modulus) or was tampered with.
        row_std = np.full(rows, reply.noise_std)
        row_std[-1] /= math.sqrt(reply.n_samples) if session.disclosure == "per-sample" else reply.n_samples
        limit = QUERY_NORM * (1 + 1e-6 + 8 * row_std) + 1e-3
        bad = np.flatnonzero(~(np.abs(y) <= limit))  # NaN counts as outside
        if bad.size:
            raise ProtocolError(
                f"seller {reply.seller_id}'s scores decrypt outside the possible range (|y| <= {limit[bad[0]]:.6g}): "
                "the reply was not computed under this session's key or was altered in transit"
            )
        return y

    def _release(
        self, session: BuyerSession, reply: Reply, y: np.ndarray, noise: dict[str, Any] | None
    ) -> SellerValuation:
        """Scores in the buyer's units, rounded to the release quantum (exact decryptions stay here)."""
        per_sample = session.disclosure == "per-sample"
        scores = y * (self.query_norm * self.grad_norm_bound / QUERY_NORM)
        scores[-1] *= reply.n_samples  # the last row is the mean: released as the seller's total
        released = round_release(scores, self.release_quantum)
        if noise is not None:
            # score units: a per-sample score's noise, and the total's (sum of n rows' or one sum's noise)
            noise["std"] = reply.noise_std * self.query_norm * self.grad_norm_bound
            noise["total_std"] = noise["std"] * (math.sqrt(reply.n_samples) if per_sample else 1.0)
        return SellerValuation(
            seller_id=reply.seller_id,
            n_samples=reply.n_samples,
            total=float(released[-1]),
            per_sample=released[:-1] if per_sample else None,
            commitment=reply.commitment.hex(),
            clipped=reply.clipped,
            timings=asdict(reply.timings),
            noise=noise,
        )

    def _manifest(self, session: BuyerSession) -> dict[str, Any]:
        packing = session.plan.to_dict()  # holds the session's CKKS parameters too
        return {
            "protocol_version": PROTOCOL_VERSION,
            "session_id": session.session_id,
            "model_fingerprint": self.model_fingerprint,
            "projection": self.spec.to_dict(),
            "projection_fidelity": self.prepared.fidelity,
            "preconditioner": self.preconditioner.to_dict(),
            "he_params": packing["params"],
            "packing": packing,
            "disclosure": session.disclosure,
            "grad_norm_bound": self.grad_norm_bound,
            "query_budget": self.settings.protocol.query_budget,
            "disclosure_controls": copy.deepcopy(self._disclosure_controls),
        }

    def _controls(self) -> dict[str, Any]:
        """Disclosure controls as the report states them: noise asked, its composition, rounding."""
        proto = self.settings.protocol
        budget = proto.query_budget
        eps = proto.dp_epsilon
        multiplier = None if eps is None else NoisePolicy(eps, proto.dp_delta).noise_multiplier
        return {
            "dp_requested": None if eps is None else {"epsilon": eps, "delta": proto.dp_delta},
            # a session answers up to `budget` queries: composed by the accountant the sellers' ledgers use
            "dp_session_composed": None
            if multiplier is None
            else {
                "epsilon": composed_epsilon({multiplier: budget}, budget * proto.dp_delta),
                "delta": budget * proto.dp_delta,
            },
            "dp_mechanism": "Gaussian noise on clipped projected gradients (sum or rows), std from (epsilon, delta) "
            "only",
            "release_digits": proto.release_digits,
            "release_quantum": self.release_quantum,
            "fresh_key_per_session": True,
            "secret_key_destroyed_at_settle": True,
        }

    def record(self, valuation: Valuation) -> SessionRecord:
        """What to keep of a settled session for a later :func:`~tip_fed.protocol.audit.audit`.

        No key material: the record holds the model, spec, query and decrypted (rounded) scores.
        """
        return SessionRecord(
            session_id=valuation.session_id,
            task=self.task.name,
            model=model_record(self._payload),
            projection=self.spec.to_dict(),
            query=[float(x) for x in self.query],
            grad_norm_bound=self.grad_norm_bound,
            disclosure=str(valuation.manifest.get("disclosure", self.settings.protocol.disclosure)),
            release_quantum=self.release_quantum,
            valuation=valuation.to_dict(),
        )


def _check_reply(session: BuyerSession, reply: Reply, seen: set[str]) -> int:
    """The rows a reply must hold: it answers this session, its seller has not answered yet, and its
    row count is the one the session asked for (else SessionError / ProtocolError)."""
    if reply.session_id != session.session_id:
        raise SessionError(
            f"reply from {reply.seller_id} belongs to session {reply.session_id[:8]}…, not {session.session_id[:8]}…"
        )
    if reply.seller_id in seen:
        raise SessionError(f"a second reply from seller {reply.seller_id} in one session was ignored")
    if reply.n_samples > session.max_samples:
        raise ProtocolError(f"seller {reply.seller_id} reports {reply.n_samples} samples, above the offered maximum")
    rows = reply.n_samples + 1 if session.disclosure == "per-sample" else 1
    if reply.n_rows != rows:
        raise ProtocolError(
            f"seller {reply.seller_id} scored {reply.n_rows} rows; {session.disclosure} disclosure "
            f"of {reply.n_samples} samples needs {rows}"
        )
    return rows  # the ciphertexts those rows take are counted when they are decrypted


def _declared_noise(reply: Reply, per_sample: bool, ceiling: float) -> dict[str, Any] | None:
    """The DP noise a reply declares, checked against what its (epsilon, delta) imply and the buyer's
    ceiling (the range check widens with the declared noise).

    The gradient-noise std depends only on (epsilon, delta) (never on the query or the seller's
    size), so any other declared std is a lie; noise must come with a seed commitment, which the
    audit opens to recompute the released values exactly.
    """
    if reply.dp_epsilon == 0:
        if reply.noise_std != 0 or reply.noise_commitment:
            raise ProtocolError(f"seller {reply.seller_id} declares noise std {reply.noise_std} without an epsilon")
        return None
    try:
        expected = NoisePolicy(reply.dp_epsilon, reply.dp_delta).gradient_std
    except TipError as exc:
        raise ProtocolError(f"seller {reply.seller_id} declares an invalid privacy guarantee: {exc}") from exc
    if not math.isclose(reply.noise_std, expected, rel_tol=1e-9):
        raise ProtocolError(
            f"seller {reply.seller_id} declares noise std {reply.noise_std:.6g}, but (epsilon, delta) = "
            f"({reply.dp_epsilon:g}, {reply.dp_delta:g}) imply {expected:.6g}"
        )
    if len(reply.noise_commitment) != 32:
        raise ProtocolError(
            f"seller {reply.seller_id} declares noise without a 32-byte commitment to its seed; the audit "
            "could not check what it released"
        )
    check_declared_std(reply.seller_id, reply.noise_std, reply.dp_epsilon, reply.dp_delta, ceiling)
    return {
        "epsilon": reply.dp_epsilon,
        "delta": reply.dp_delta,
        "gradient_std": reply.noise_std,
        "commitment": reply.noise_commitment.hex(),
    }
