"""Datasets as dicts of tensors sharing a first (sample) dimension, and their batching."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

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
    would reach the buyer as an exact bit beside the noised answer. Records that do not fit the
    model (feature count, dtype, label range) are a DataError, not a torch error: the model comes
    from the other party, so a mismatch is bad input, not a bug.
    """
    try:
        grads = [projected_grads(model, spec, task, b, zero_nonfinite=True) for b in iter_batches(data, size)]
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise DataError(
            f"the records do not fit the model and task ({task.name}): {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    g = torch.cat(grads).to(torch.float64)
    zeroed = int((g == 0).all(dim=1).sum())
    if zeroed:
        log.info("%d of %d records score as zero rows (a zero gradient, or a non-finite loss or gradient)",
                 zeroed, g.shape[0])
    return g
