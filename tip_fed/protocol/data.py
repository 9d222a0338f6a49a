"""Datasets as dicts of tensors sharing a first (sample) dimension, and their batching."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from tip_fed.core.tasks import batch_size

Batch = Mapping[str, torch.Tensor]


def check_batch(data: Batch) -> int:
    """Number of samples in a dict-of-tensors dataset; DataError if the tensors disagree."""
    return batch_size(data)


def iter_batches(data: Batch, size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive slices of a dict-of-tensors dataset."""
    n = batch_size(data)
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in data.items()}
