"""The buyer's costly, private preparation, fitted once and valued against sellers many times.

A :class:`PreparedQuery` holds everything a :class:`~tip_fed.protocol.buyer.Buyer` needs to make
Offers and settle Replies: the model as sellers receive it (architecture, config, safetensors
weights, fingerprint), the projection spec, the fitted preconditioner ``P``, the float64 query vector
``v = P · mean objective gradient``, its norm, the gradient-norm bound and the settings. Fitting it
(per-sample gradients of the buyer's training and objective sets, curvature, query) is the
expensive part; opening a session afterwards only costs fresh keys and one encryption.

Saved to a directory (:meth:`PreparedQuery.save`) it is the buyer's private objective: the
directory is 0700, every file 0600 and written atomically, and a manifest with the sha256 of every
file is checked at :meth:`PreparedQuery.load`, so a corrupted or edited file is refused instead of
silently changing the valuation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tip_fed.config import BuyerSettings, SellerBudgetConfig
from tip_fed.core.fidelity import plan_ranks
from tip_fed.core.gradients import kfac_statistics, projected_grads
from tip_fed.core.influence import query_vector
from tip_fed.core.precondition import (
    Preconditioner,
    fit_preconditioner,
    load_preconditioner,
)
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import Task
from tip_fed.errors import ConfigError, DataError, TipError, VersionMismatchError
from tip_fed.files import read_json_object, write_private
from tip_fed.protocol.data import Batch, iter_batches
from tip_fed.protocol.formats import InputFormat, encode_records, format_from_pb
from tip_fed.protocol.model import encode_model, fingerprint
from tip_fed.protocol.records import RawRecords
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

FORMAT_VERSION = 1
BOUND_HEADROOM = 2.0
MANIFEST = "manifest.json"
FILES = ("prepared.json", "model.safetensors", "query.safetensors", "preconditioner.safetensors")
#: Fields saved in prepared.json as they are (the others have their own file or form).
PLAIN_FIELDS = ("task", "query_norm", "grad_norm_bound", "train_grad_norm", "sources", "fidelity")


@dataclass(frozen=True)
class PreparedQuery:
    """The buyer's fitted query: everything an Offer needs but the session keys.

    ``input_format`` (None for tensor datasets) is how raw records become the task's tensors; it
    travels in every Offer and is saved as its protobuf bytes.
    """

    task: str
    model: pb.ModelPayload
    spec: ProjectionSpec
    preconditioner: Preconditioner
    query: torch.Tensor  # float64 [spec.dim]
    query_norm: float
    grad_norm_bound: float
    train_grad_norm: float  # largest projected gradient norm of the set P was fitted on
    settings: BuyerSettings
    input_format: InputFormat | None = None
    # sha256 of the files the query was fitted from ("objective", "train"), when it was fitted from files
    sources: dict[str, str] = field(default_factory=dict)
    # how the ranks were chosen and the measured agreement with exact scores (FidelityPlan.to_dict);
    # None when the ranks were set by hand
    fidelity: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """What every prepared query holds, fitted here or read from files that left this process."""
        query, dim = self.query, self.spec.dim
        if not isinstance(query, torch.Tensor) or query.dtype != torch.float64 or tuple(query.shape) != (dim,):
            raise DataError(f"the query must be a float64 vector of the projection dimension {dim}")
        if not bool(torch.isfinite(query).all()) or not math.isclose(
            self.query_norm, float(torch.linalg.vector_norm(query)), rel_tol=1e-9
        ):
            raise DataError("the query norm does not match the query vector")
        bound, train_norm = self.grad_norm_bound, self.train_grad_norm
        if not (math.isfinite(bound) and bound > 0 and math.isfinite(train_norm) and train_norm >= 0):
            raise DataError("the gradient-norm bound must be a finite number > 0 (and the train gradient norm >= 0)")
        if not isinstance(self.task, str) or not isinstance(self.preconditioner, Preconditioner):
            raise DataError("task must be a name and preconditioner a fitted preconditioner")
        if not isinstance(self.sources, dict) or not all(isinstance(v, str) for v in self.sources.values()):
            raise DataError("sources must map names to sha256 hex strings")
        if self.fidelity is not None and not isinstance(self.fidelity, dict):
            raise DataError("fidelity must be null or a mapping")

    @property
    def model_fingerprint(self) -> str:
        """Fingerprint sellers see in every Offer."""
        return self.model.fingerprint

    def with_objective(
        self, objective: Batch | RawRecords, model: nn.Module | None = None, task: Task | None = None
    ) -> PreparedQuery:
        """The query for another objective set, reusing this projection and preconditioner: only the
        objective's gradients are computed (fit the curvature once, query many times).

        ``model`` defaults to the saved one (rebuilt, fingerprint checked); one given must have the
        same fingerprint. ``task``: a custom Task object when the task is not built in.
        """
        from tip_fed.core.tasks import get_task
        from tip_fed.protocol.model import decode_model

        if model is None:
            model = decode_model(self.model)
        elif encode_model(model).fingerprint != self.model_fingerprint:
            raise ConfigError(
                "the model is not the one this query was prepared for (fingerprints differ); "
                "prepare a new query with fit_query / Buyer.prepare"
            )
        task = task if task is not None else get_task(self.task)
        objective = encode_records(self.input_format, objective)
        query, norm, bound = _query(
            model.eval(), self.spec, task, objective, self.settings, self.preconditioner, self.train_grad_norm
        )
        sources = {k: v for k, v in self.sources.items() if k != "objective"}  # fitted from data, not that file
        return replace(self, query=query, query_norm=norm, grad_norm_bound=bound, sources=sources)

    def save(self, directory: str | Path) -> Path:
        """Write the query to ``directory`` (0700; files 0600, atomic), the manifest last."""
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{out} is a file; give a directory for the prepared query")
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(out, 0o700)
        from safetensors.torch import save as st_save

        meta = {
            "format_version": FORMAT_VERSION,
            **{name: getattr(self, name) for name in PLAIN_FIELDS},
            "architecture": self.model.architecture,
            "config_json": self.model.config_json,
            "model_fingerprint": self.model.fingerprint,
            "projection": self.spec.to_dict(),
            "preconditioner": self.preconditioner.to_dict(),
            "settings": self.settings.to_dict(),
            "input_format": _format_dict(self.input_format),
        }
        contents = {
            "prepared.json": (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode("utf-8"),
            "model.safetensors": bytes(self.model.weights),
            "query.safetensors": st_save({"query": self.query.detach().to("cpu", torch.float64).contiguous()}),
            "preconditioner.safetensors": st_save(
                {k: v.contiguous() for k, v in self.preconditioner.tensors().items()}
            ),
        }
        for name, data in contents.items():
            write_private(out / name, data)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "tip_fed prepared query",
            "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()},
        }
        write_private(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> PreparedQuery:
        """Read a query written by :meth:`save`; DataError naming the file on any mismatch."""
        src = Path(directory)
        fix = f"run 'tip-fed buyer prepare' again into {src}"
        if not (src / MANIFEST).is_file():
            raise DataError(f"{src} is not a prepared query (no {MANIFEST}); {fix}")
        manifest = read_json_object(src / MANIFEST, "prepared query manifest", fix)
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise VersionMismatchError(
                f"prepared query {src} has format version {version!r}; this tip_fed reads "
                f"version {FORMAT_VERSION}: {fix}"
            )
        sums = manifest.get("sha256")
        if not isinstance(sums, dict) or sorted(sums) != sorted(FILES):
            raise DataError(f"{src / MANIFEST} must list exactly {list(FILES)}; {fix}")
        raw: dict[str, bytes] = {}
        for name in FILES:
            path = src / name
            if not path.is_file():
                raise DataError(f"prepared query file {path} is missing; {fix}")
            raw[name] = path.read_bytes()
            if hashlib.sha256(raw[name]).hexdigest() != sums[name]:
                raise DataError(
                    f"prepared query file {path} does not match its sha256 in {MANIFEST}: it was "
                    f"altered or corrupted after it was written; {fix}"
                )
        try:
            return _from_files(raw)
        except TipError as exc:
            raise DataError(f"prepared query {src} is invalid: {exc}; {fix}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"prepared query {src} is invalid ({type(exc).__name__}: {exc}); {fix}") from None


def _format_dict(input_format: InputFormat | None) -> dict[str, str] | None:
    """The input format as it travels in an Offer (its protobuf bytes, base64), or None."""
    if input_format is None:
        return None
    return {"protobuf": base64.b64encode(input_format.to_pb().SerializeToString()).decode("ascii")}


def _format_from(saved: Any) -> InputFormat | None:
    """Inverse of :func:`_format_dict`, validated like the format of an incoming Offer."""
    if saved is None:
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("protobuf"), str):
        raise DataError('input_format must be null or {"protobuf": base64}')
    msg = pb.InputFormat()
    msg.ParseFromString(base64.b64decode(saved["protobuf"], validate=True))
    return format_from_pb(msg)


def _from_files(raw: dict[str, bytes]) -> PreparedQuery:
    """Rebuild from verified bytes; every value is checked, since the files left this process."""
    from safetensors.torch import load as st_load

    meta = json.loads(raw["prepared.json"].decode("utf-8"))
    payload = pb.ModelPayload(
        architecture=meta["architecture"],
        config_json=meta["config_json"],
        weights=raw["model.safetensors"],
        fingerprint=meta["model_fingerprint"],
    )
    if fingerprint(payload.architecture, payload.config_json, payload.weights) != payload.fingerprint:
        raise DataError("the model weights do not match the model fingerprint")
    spec = ProjectionSpec.from_dict(meta["projection"])
    if not isinstance(meta["preconditioner"], dict):
        raise DataError("preconditioner must be a mapping")
    # every value is checked as the query is made (PreparedQuery.__post_init__)
    return PreparedQuery(
        model=payload, spec=spec,
        preconditioner=load_preconditioner(meta["preconditioner"], st_load(raw["preconditioner.safetensors"]), spec),
        query=st_load(raw["query.safetensors"]).get("query", torch.empty(0)),
        settings=BuyerSettings.from_dict(meta["settings"]), input_format=_format_from(meta.get("input_format")),
        **{name: meta[name] for name in PLAIN_FIELDS if name in meta},
    )


def fit_query(
    model: nn.Module,
    task: Task,
    objective: Batch | RawRecords,
    train: Batch | RawRecords | None = None,
    settings: BuyerSettings | None = None,
    input_format: InputFormat | None = None,
) -> PreparedQuery:
    """Fit the buyer's query: projected gradients, preconditioner ``P`` on ``train`` (the objective
    set when absent), ``v = P · mean objective gradient`` and the gradient-norm bound."""
    settings = settings or BuyerSettings()
    objective = encode_records(input_format, objective)
    train = None if train is None else encode_records(input_format, train)
    model.eval()
    spec, fidelity = _projection(model, task, objective, train, settings)
    payload = encode_model(model)
    train_batches = list(iter_batches(train if train is not None else objective, settings.batch_size))
    train_grads = torch.cat([projected_grads(model, spec, task, b) for b in train_batches]).double()
    cfg = settings.preconditioner
    stats = kfac_statistics(model, spec, task, train_batches) if cfg.kind in ("kfac", "ekfac") else None
    preconditioner = fit_preconditioner(cfg.kind, spec, train_grads=train_grads, kfac_stats=stats, damping=cfg.damping)
    train_norm = float(torch.linalg.vector_norm(train_grads, dim=1).max())
    query, norm, bound = _query(model, spec, task, objective, settings, preconditioner, train_norm)
    return PreparedQuery(
        task=task.name,
        model=payload,
        spec=spec,
        preconditioner=preconditioner,
        query=query,
        query_norm=norm,
        grad_norm_bound=bound,
        train_grad_norm=train_norm,
        settings=settings,
        input_format=input_format,
        fidelity=fidelity,
    )


def _projection(
    model: nn.Module, task: Task, objective: Batch, train: Batch | None, settings: BuyerSettings
) -> tuple[ProjectionSpec, dict[str, Any] | None]:
    """The spec: per-layer ranks planned from measured fidelity (``rank = "auto"``), or one rank for all."""
    cfg = settings.projection
    include = list(cfg.include) or None
    if cfg.rank != "auto":
        rank = int(cfg.rank)
        return ProjectionSpec.for_model(model, rank=rank, seed=settings.seed, kind=cfg.kind, include=include), None
    plan = plan_ranks(
        model, task, train if train is not None else objective, objective, seed=settings.seed, kind=cfg.kind,
        include=include, target=cfg.fidelity_target, max_dim=cfg.max_dim,
        # what a seller with the default budget accepts (resources are costed before allocation)
        max_projection_bytes=SellerBudgetConfig().projection_memory_mb << 20,
    )
    return plan.spec, plan.to_dict()


def _query(
    model: nn.Module,
    spec: ProjectionSpec,
    task: Task,
    objective: Batch,
    settings: BuyerSettings,
    preconditioner: Preconditioner,
    train_norm: float,
) -> tuple[torch.Tensor, float, float]:
    """``v = P · mean objective gradient``, its norm, and the gradient-norm bound (the configured one,
    else twice the largest projected gradient norm of the training and objective sets)."""
    obj_grads = torch.cat(
        [projected_grads(model, spec, task, b) for b in iter_batches(objective, settings.batch_size)]
    ).double()
    query = query_vector(preconditioner, obj_grads).double()
    norm = float(torch.linalg.vector_norm(query))
    if not math.isfinite(norm) or norm == 0.0:
        raise TipError(
            "the buyer's query vector is zero or not finite: the objective set gives no gradient signal "
            "(check the objective data, the loss, and the projection rank)"
        )
    bound = settings.protocol.grad_norm_bound
    if bound is None:
        bound = BOUND_HEADROOM * max(train_norm, float(torch.linalg.vector_norm(obj_grads, dim=1).max()))
    return query, norm, float(bound)
