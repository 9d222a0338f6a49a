"""What every market scenario builds: a trained buyer model, its objective, and the sellers' data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tip_fed.core.tasks import Task
from tip_fed.protocol.data import Batch


@dataclass
class Market:
    """A buyer (model, task, training and objective data) and sellers (id -> private data).

    ``replicate`` is the market's index among its scenario's replicates (None for a scenario that
    builds one market): every party that rebuilds the market needs it to rebuild the same one,
    and the buyer's projection seed is drawn from it.
    """

    name: str
    model: nn.Module
    task: Task
    train: Batch
    objective: Batch
    sellers: Mapping[str, Batch]
    expected_best: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    replicate: int | None = None
