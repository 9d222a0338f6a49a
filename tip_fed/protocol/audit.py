"""Post-purchase audit: check a seller's delivered data against its commitment and its scores.

Why: the scores were computed on the seller's side, where the buyer could not look. After a
purchase the seller delivers its records and the (clipped) projected gradients it committed to.
The buyer, from the :class:`SessionRecord` it kept (no secret key in it), then

1. rebuilds the Merkle root over the delivered (record, gradient) leaves and compares it with the
   root in the Reply: records swapped or edited after scoring change the root;
2. recomputes every projected gradient from the delivered records with its own model and spec,
   clipped to the public bound, and compares it with the committed one: a seller that scaled or
   fabricated its gradients (and committed to them) is flagged here, per sample;
3. opens the seller's noise commitment with the delivered seed, regenerates its differential-
   privacy noise and recomputes every released value; they must match the decrypted ones within
   the CKKS tolerance and the rounding, with no allowance for noise: a seller that scored other
   gradients than it committed to, or encrypted values of its own choice, is flagged here;
4. flags duplicate and near-duplicate records (padding inflates a total): exact and near copies
   anywhere in the delivery, and jittered copies by testing random blocks of it as a spot check
   tests its opening (:mod:`tip_fed.protocol.duplicates`).

When only records are delivered (no gradients), step 1 uses the recomputed gradients, which is
exact only on the same software stack; delivering the gradients makes the audit portable.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tip_fed.core.influence import clip_rows
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import batch_size, get_task
from tip_fed.errors import DataError, TipError
from tip_fed.files import read_json_object, write_private
from tip_fed.protocol import commitment
from tip_fed.protocol.data import Batch, dataset_gradients, load_dataset, save_dataset
from tip_fed.protocol.disclosure import release_rows, seed_commitment
from tip_fed.protocol.duplicates import (
    AUDIT_BLOCK,
    NEAR_DUP_TOL,
    RELATIVE_FRACTION,
    duplicated_records,
    sampled_copies,
)
from tip_fed.protocol.model import decode_model
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

GRADIENTS_KEY = "__tip_fed_committed_gradients__"
NOISE_SEED_KEY = "__tip_fed_noise_seed__"
SALT_SEED_KEY = "__tip_fed_salt_seed__"
# float32 gradients recomputed in other batches differ by ~1e-7 of their norm; a cheat is O(1).
GRAD_TOL = 1e-5
# CKKS error of one decrypted score relative to the score bound (measured ~1e-10; generous).
SCORE_TOL = 1e-6
# A delivery in which more than this fraction of records repeat another record is flagged.
DUPLICATE_FRACTION = 0.01
VERDICTS = (
    "ok", "commitment-mismatch", "count-mismatch", "gradient-mismatch", "noise-mismatch", "score-mismatch",
    "duplicate-records",
)


@dataclass
class Delivery:
    """What a seller hands over after a purchase: its records and the gradients it committed to."""

    data: dict[str, torch.Tensor]
    gradients: np.ndarray | None = None
    noise_seed: bytes | None = None  # the seed of the seller's DP noise, committed to in its Reply
    salt_seed: bytes | None = None  # the seed of the commitment's per-record salts (hides the root)

    def save(self, path: str | Path) -> Path:
        """One safetensors file; the committed gradients and the seeds travel under reserved keys."""
        tensors = dict(self.data)
        for reserved in (GRADIENTS_KEY, NOISE_SEED_KEY, SALT_SEED_KEY):
            if reserved in tensors:
                raise DataError(f"a data column may not be named {reserved}")
        if self.gradients is not None:
            tensors[GRADIENTS_KEY] = torch.from_numpy(np.ascontiguousarray(self.gradients, dtype=np.float64))
        n = batch_size(self.data)
        for key, seed in ((NOISE_SEED_KEY, self.noise_seed), (SALT_SEED_KEY, self.salt_seed)):
            if seed is not None:  # one copy per record: every column shares the sample dimension
                tensors[key] = torch.tensor(list(seed), dtype=torch.uint8).repeat(n, 1)
        return save_dataset(tensors, path)

    @classmethod
    def load(cls, path: str | Path) -> Delivery:
        """Read a delivery file (a plain dataset file is a delivery without gradients)."""
        tensors = load_dataset(path)
        grads = tensors.pop(GRADIENTS_KEY, None)
        seeds = {key: tensors.pop(key, None) for key in (NOISE_SEED_KEY, SALT_SEED_KEY)}
        if not tensors:
            raise DataError(f"delivery {path} holds no records")
        for key, seed in seeds.items():
            if seed is not None and (seed.dtype != torch.uint8 or seed.ndim != 2 or not bool((seed == seed[0]).all())):
                raise DataError(
                    f"delivery {path} has a malformed {key.strip('_')} (expected one uint8 row repeated per record)"
                )
        opened = {key: None if seed is None else bytes(seed[0].tolist()) for key, seed in seeds.items()}
        return cls(
            data=tensors,
            gradients=None if grads is None else grads.numpy().astype(np.float64),
            noise_seed=opened[NOISE_SEED_KEY],
            salt_seed=opened[SALT_SEED_KEY],
        )


@dataclass
class SessionRecord:
    """What the buyer keeps of a settled session to audit it later; holds no key material.

    It does hold the buyer's private query and model, so it is saved owner-only.
    """

    session_id: str
    task: str
    model: dict[str, str]
    projection: dict[str, Any]
    query: list[float]
    grad_norm_bound: float
    disclosure: str
    release_quantum: float
    valuation: dict[str, Any]

    @property
    def score_bound(self) -> float:
        """Largest possible |per-sample score|: ||query|| * gradient-norm bound."""
        return float(np.linalg.norm(self.query)) * self.grad_norm_bound

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SessionRecord:
        """Inverse of :meth:`to_dict`; DataError naming what is missing or malformed."""
        try:
            record = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise DataError(f"not a tip-fed session record: missing field {exc}") from None
        record._check()
        return record

    def _check(self) -> None:
        """Types and ranges the audit relies on; DataError naming the first bad field."""

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise DataError(f"session record: {what}")

        def finite(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(isinstance(self.session_id, str) and isinstance(self.task, str), "session_id and task must be strings")
        need(isinstance(self.model, dict) and isinstance(self.projection, dict), "model and projection must be objects")
        need(
            isinstance(self.query, list) and len(self.query) > 0 and all(finite(x) for x in self.query),
            "query must be a non-empty list of finite numbers",
        )
        need(finite(self.grad_norm_bound) and self.grad_norm_bound > 0, "grad_norm_bound must be a finite number > 0")
        need(finite(self.release_quantum) and self.release_quantum >= 0, "release_quantum must be a finite number >= 0")
        sellers = self.valuation.get("sellers") if isinstance(self.valuation, dict) else None
        need(isinstance(sellers, list), "valuation.sellers must be a list")
        for s in sellers:  # type: ignore[union-attr]
            need(
                isinstance(s, dict) and isinstance(s.get("seller_id"), str) and isinstance(s.get("commitment"), str),
                "every valued seller needs a seller_id and a commitment",
            )
            need(
                isinstance(s.get("n_samples"), int) and s["n_samples"] >= 1 and finite(s.get("total")),
                f"seller {s.get('seller_id')!r} needs n_samples >= 1 and a finite total",
            )
            per = s.get("per_sample")
            need(
                per is None or (isinstance(per, list) and len(per) == s["n_samples"] and all(finite(x) for x in per)),
                f"seller {s.get('seller_id')!r}: per_sample must be null or n_samples finite numbers",
            )
            noise = s.get("noise")
            need(
                noise is None or (isinstance(noise, dict) and finite(noise.get("std", 0.0))),
                f"seller {s.get('seller_id')!r}: noise must be null or carry a finite std",
            )

    def save(self, path: str | Path) -> Path:
        """Write as JSON, atomically and readable by the owner only."""
        p = Path(path)
        write_private(p, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> SessionRecord:
        """Read a record written by :meth:`save`."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"session record {p} does not exist; save one with Buyer.record(valuation).save(path)")
        return cls.from_dict(read_json_object(p, "session record"))

    def model_module(self) -> nn.Module:
        """Rebuild the buyer's model from the record (fingerprint checked)."""
        try:
            weights = base64.b64decode(self.model["weights_b64"], validate=True)
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"session record has no valid model weights: {exc}") from None
        payload = pb.ModelPayload(
            architecture=self.model.get("architecture", ""),
            config_json=self.model.get("config_json", ""),
            weights=weights,
            fingerprint=self.model.get("fingerprint", ""),
        )
        return decode_model(payload)


def model_record(payload: pb.ModelPayload) -> dict[str, str]:
    """JSON form of a model payload, for :class:`SessionRecord`."""
    return {
        "architecture": payload.architecture,
        "config_json": payload.config_json,
        "fingerprint": payload.fingerprint,
        "weights_b64": base64.b64encode(payload.weights).decode("ascii"),
    }


@dataclass
class SellerAudit:
    """The audit of one seller's delivery."""

    seller_id: str
    verdict: str
    commitment_ok: bool
    n_samples_ok: bool
    max_gradient_deviation: float | None
    max_score_deviation: float
    total_deviation: float
    score_tolerance: float
    flagged_samples: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when nothing was flagged."""
        return self.verdict == "ok"


@dataclass
class AuditReport:
    """Audit of every delivered seller of one session."""

    session_id: str
    sellers: list[SellerAudit]

    @property
    def passed(self) -> bool:
        """True when every audited seller passed."""
        return all(s.passed for s in self.sellers)

    def by_id(self) -> dict[str, SellerAudit]:
        """Seller audits keyed by seller id."""
        return {s.seller_id: s for s in self.sellers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"session_id": self.session_id, "passed": self.passed, "sellers": [asdict(s) for s in self.sellers]}

    def to_markdown(self) -> str:
        """Human-readable table of verdicts and reasons."""
        lines = [
            f"# Audit of session {self.session_id}",
            "",
            f"**{'PASSED' if self.passed else 'FLAGGED'}**: {sum(s.passed for s in self.sellers)} of "
            f"{len(self.sellers)} delivered sellers match their commitments and scores.",
            "",
            "| seller | verdict | commitment | max gradient dev. | max score dev. | tolerance | flagged samples |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.sellers:
            grad = "n/a" if s.max_gradient_deviation is None else f"{s.max_gradient_deviation:.3g}"
            flagged = ", ".join(map(str, s.flagged_samples[:20])) + (" …" if len(s.flagged_samples) > 20 else "")
            lines.append(
                f"| {s.seller_id} | {s.verdict} | {'ok' if s.commitment_ok else 'MISMATCH'} | {grad} | "
                f"{s.max_score_deviation:.3g} | {s.score_tolerance:.3g} | {flagged or '-'} |"
            )
        reasons = [f"- **{s.seller_id}**: {r}" for s in self.sellers for r in s.reasons]
        if reasons:
            lines += ["", "## Findings", "", *reasons]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``audit.json`` and ``audit.md`` atomically into ``out_dir``."""
        out = Path(out_dir)
        js, md = out / "audit.json", out / "audit.md"
        write_private(js, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", mode=0o644)
        write_private(md, self.to_markdown(), mode=0o644)
        return js, md


def audit(
    record: SessionRecord,
    deliveries: Mapping[str, Delivery],
    *,
    model: nn.Module | None = None,
    batch: int = 64,
    near_fraction: float = RELATIVE_FRACTION,
) -> AuditReport:
    """Audit every delivered seller of a settled session (see the module doc for the checks);
    ``near_fraction``: the relative near-copy test's fraction (:func:`duplicates.calibrate`)."""
    sellers = {s["seller_id"]: s for s in record.valuation["sellers"]}
    unknown = sorted(set(deliveries) - set(sellers))
    if unknown:
        raise DataError(f"deliveries from sellers {unknown} that were not valued in session {record.session_id}")
    model = model if model is not None else record.model_module()
    try:
        spec = ProjectionSpec.from_dict(record.projection)
    except TipError as exc:
        raise DataError(f"the session record's projection spec is invalid: {exc}") from exc
    task = get_task(record.task)
    query = torch.tensor(record.query, dtype=torch.float64)
    if query.ndim != 1 or query.shape[0] != spec.dim:
        raise DataError(f"the session record's query has shape {tuple(query.shape)}, expected ({spec.dim},)")
    ctx = _Context(model, spec, task, query, record, batch, near_fraction)
    return AuditReport(record.session_id, [ctx.seller(sellers[sid], d) for sid, d in deliveries.items()])


@dataclass
class _Context:
    model: nn.Module
    spec: ProjectionSpec
    task: Any
    query: torch.Tensor
    record: SessionRecord
    batch: int
    near_fraction: float

    def seller(self, valued: Mapping[str, Any], delivery: Delivery) -> SellerAudit:
        sid, bound = valued["seller_id"], self.record.grad_norm_bound
        reasons: list[str] = []
        n = batch_size(delivery.data)
        n_ok = n == int(valued["n_samples"])
        if not n_ok:
            reasons.append(f"delivered {n} records but was valued on {valued['n_samples']}")
        recomputed = self._gradients(delivery.data)
        flagged: set[int] = set()

        claimed = delivery.gradients
        max_grad_dev: float | None = None
        if claimed is not None and claimed.shape != recomputed.shape:
            reasons.append(f"delivered gradients of shape {claimed.shape}; the records give {recomputed.shape}")
            claimed = None
        leaves = claimed if claimed is not None else recomputed
        root = _root(delivery, leaves)
        commitment_ok = root == valued["commitment"]
        if root is None:
            reasons.append(
                "the delivery reveals no valid commitment salt seed, so its records cannot be matched "
                "to the committed root; ask the seller for its delivery file as written by the seller"
            )
        elif not commitment_ok:
            reasons.append(
                f"the delivered data hash to root {root[:12]}… but the reply committed to "
                f"{str(valued['commitment'])[:12]}…: records or gradients changed after scoring"
            )
        if claimed is not None:
            dev = np.linalg.norm(claimed - recomputed, axis=1) / bound
            max_grad_dev = float(dev.max()) if dev.size else 0.0
            bad = np.flatnonzero(dev > GRAD_TOL)
            flagged |= set(bad.tolist())
            if bad.size:
                reasons.append(
                    f"{bad.size} committed gradients differ from the ones its records give "
                    f"(max {max_grad_dev:.3g} of the norm bound; tolerance {GRAD_TOL:g})"
                )

        per_sample = valued.get("per_sample") is not None
        seed, noise_ok = self._noise_seed(valued, delivery, reasons)
        plain, total, scale = self._released(
            recomputed, per_sample, seed, float((valued.get("noise") or {}).get("gradient_std", 0.0))
        )
        # No allowance for noise: with the seed revealed the released values are recomputed exactly,
        # up to the CKKS error (which grows with the norm of the scored rows) and the rounding.
        per_tol = SCORE_TOL * self.record.score_bound * scale + self.record.release_quantum / 2
        total_dev = abs(float(valued["total"]) - total)
        total_tol = n * SCORE_TOL * self.record.score_bound * scale + self.record.release_quantum / 2
        max_dev, per_bad = total_dev, False
        if per_sample and n_ok:
            dev = np.abs(np.asarray(valued["per_sample"], dtype=np.float64) - plain)
            max_dev = float(dev.max())
            bad = np.flatnonzero(dev > per_tol)
            flagged |= set(bad.tolist())
            per_bad = bool(bad.size)
            if per_bad:
                reasons.append(
                    f"{bad.size} decrypted per-sample scores differ from the plaintext recomputation "
                    f"(max {max_dev:.3g}, tolerance {per_tol:.3g})"
                )
        score_bad = total_dev > total_tol or not math.isfinite(total_dev)
        if score_bad:
            reasons.append(
                f"the decrypted total differs from the recomputed one by {total_dev:.3g} (tolerance {total_tol:.3g})"
            )
        near = sampled_copies(delivery.data, fraction=self.near_fraction)
        dups = sorted(set(duplicated_records(delivery.data)) | set(near))
        if dups:
            reasons.append(
                f"{len(dups)} of {n} records repeat another record (standardised RMS distance <= {NEAR_DUP_TOL:g}, "
                f"or below {self.near_fraction:g} of the spacing of a random block of {AUDIT_BLOCK}): "
                "padding inflates the total"
            )
            flagged |= set(dups)
        checks = [
            ("commitment-mismatch", not commitment_ok),
            ("count-mismatch", not n_ok),
            ("gradient-mismatch", max_grad_dev is not None and max_grad_dev > GRAD_TOL),
            ("noise-mismatch", not noise_ok),
            ("score-mismatch", score_bad or per_bad),
            ("duplicate-records", len(dups) > DUPLICATE_FRACTION * n),
        ]
        verdict = next((name for name, failed in checks if failed), "ok")
        return SellerAudit(
            seller_id=sid,
            verdict=verdict,
            commitment_ok=commitment_ok,
            n_samples_ok=n_ok,
            max_gradient_deviation=max_grad_dev,
            max_score_deviation=max_dev,
            total_deviation=total_dev,
            score_tolerance=per_tol if valued.get("per_sample") is not None else total_tol,
            flagged_samples=sorted(flagged),
            reasons=reasons,
        )

    def _noise_seed(
        self, valued: Mapping[str, Any], delivery: Delivery, reasons: list[str]
    ) -> tuple[bytes | None, bool]:
        """The delivered noise seed if it opens the Reply's commitment; (None, False) otherwise."""
        noise = valued.get("noise")
        if not noise:
            if delivery.noise_seed is not None:
                reasons.append("a noise seed was delivered but the reply declared no noise")
                return None, False
            return None, True
        if delivery.noise_seed is None:
            reasons.append("the reply declared differential-privacy noise but the delivery reveals no noise seed")
            return None, False
        try:
            opened = seed_commitment(delivery.noise_seed, self.record.session_id, str(valued["seller_id"])).hex()
        except TipError as exc:
            reasons.append(f"the delivered noise seed is malformed: {exc}")
            return None, False
        if opened != noise.get("commitment"):
            reasons.append("the delivered noise seed does not open the commitment in the reply")
            return None, False
        return delivery.noise_seed, True

    def _released(
        self, gradients: np.ndarray, per_sample: bool, seed: bytes | None, std: float
    ) -> tuple[np.ndarray, float, float]:
        """What an honest seller releases for these gradients and seed: (per-sample scores, total,
        largest scored row norm in units of C)."""
        bound = self.record.grad_norm_bound
        clean, noise = release_rows(gradients / bound, per_sample, seed, std if seed is not None else 0.0)
        rows = clean + noise
        scores = (rows @ self.query.numpy()) * bound
        scale = max(1.0, float(np.linalg.norm(rows, axis=1).max()))
        return scores[:-1] if per_sample else scores, float(scores[-1]) * gradients.shape[0], scale

    def _gradients(self, data: Batch) -> np.ndarray:
        try:
            g = dataset_gradients(self.model, self.spec, self.task, data, self.batch)
        except TipError as exc:
            raise DataError(f"cannot recompute gradients on the delivered records: {exc}") from exc
        clipped, _ = clip_rows(g, self.record.grad_norm_bound)
        return clipped.numpy()


def _root(delivery: Delivery, gradients: np.ndarray) -> str | None:
    """Hex root the delivered records and gradients commit to under the delivered salt seed."""
    if delivery.salt_seed is None or len(delivery.salt_seed) != commitment.SALT_BYTES:
        return None
    return commitment.commit(delivery.data, gradients, delivery.salt_seed).hex()
