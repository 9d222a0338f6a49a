"""Datasets as dicts of tensors sharing a first (sample) dimension, and their batching."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from tip_fed.core.gradients import projected_grads
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import Task, batch_size
from tip_fed.errors import DataError

Batch = Mapping[str, torch.Tensor]
log = logging.getLogger(__name__)


def check_batch(data: Batch) -> int:
    """Number of samples in a dict-of-tensors dataset; DataError if the tensors disagree."""
    return batch_size(data)


def iter_batches(data: Batch, size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive slices of a dict-of-tensors dataset."""
    n = batch_size(data)
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in data.items()}


def save_dataset(data: Batch, path: str | Path) -> Path:
    """Write a dict-of-tensors dataset as safetensors (no pickles, so loading runs no code)."""
    from safetensors.torch import save_file

    batch_size(data)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    save_file({k: v.contiguous() for k, v in data.items()}, str(tmp))
    tmp.replace(p)
    return p


def load_dataset(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a dataset written by :func:`save_dataset`; DataError if missing or invalid."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"seller data file {p} does not exist; create it with 'tip-fed export-sellers' or save_dataset()"
        )
    try:
        data = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"seller data file {p} is not a valid safetensors dataset: {exc}") from exc
    batch_size(data)
    return data


def dataset_gradients(model: nn.Module, spec: ProjectionSpec, task: Task, data: Batch, size: int) -> torch.Tensor:
    """Float64 projected per-sample gradients of a whole dataset, batch by batch: the rows a seller
    scores, and the audit and spot check recompute.

    A record whose loss or gradient is not finite is a zero row, under one fixed rule: a model the
    buyer crafts to overflow only on some record values must not turn them into a refusal, which
    would reach the buyer as an exact bit beside the noised answer. A record on which the model
    raises (a position table it overruns, an index out of range, any of the hundreds of model
    types' own checks) is such a zero row too: a batch that raises is scored once more, one record
    at a time, so each record's row depends on that record alone, and a record that still raises
    scores zero. That retry is bounded: one single-record pass per record of a failing batch (the
    model's work once more, plus each pass's fixed overhead), and it runs only after the buyer's
    ledger was charged for the answer. Whether the model runs at all was checked before
    the charge (:func:`tip_fed.protocol.model.check_runs`), on a record-free batch of the costed shape. Nothing of an
    exception's text leaves this function: the seller's log has it.
    """
    grads = [_batch_rows(model, spec, task, b) for b in iter_batches(data, size)]
    g = torch.cat(grads).to(torch.float64)
    zeroed = int((g == 0).all(dim=1).sum())
    if zeroed:
        log.info("%d of %d records score as zero rows (a zero gradient, a non-finite loss or gradient, or a "
                 "record the model raises on)", zeroed, g.shape[0])
    return g


def _batch_rows(model: nn.Module, spec: ProjectionSpec, task: Task, batch: Batch) -> torch.Tensor:
    """One batch's rows; if the model raises on the batch, each record's own row (zero if it raises)."""
    try:
        return projected_grads(model, spec, task, batch, zero_nonfinite=True)
    except Exception as exc:  # the buyer's model: whatever it raises is a fact about some record
        log.warning("the model raised on a batch of %d records (%s: %s); scoring them one at a time",
                    batch_size(batch), type(exc).__name__, str(exc)[:300])
    rows = []
    for i in range(batch_size(batch)):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        try:
            rows.append(projected_grads(model, spec, task, one, zero_nonfinite=True).to(torch.float64))
        except Exception as exc:
            log.warning("the model raised on one record (%s: %s); it scores as a zero row",
                        type(exc).__name__, str(exc)[:300])
            rows.append(torch.zeros(1, spec.dim, dtype=torch.float64))
    return torch.cat(rows)


class Placeholder(Protocol):
    """An input format: it makes a record-free batch of its widest shape (see ``TextFormat.placeholder``)."""

    def placeholder(self, size: int) -> dict[str, torch.Tensor]: ...
