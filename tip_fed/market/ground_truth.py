"""Realised benefit of a seller's data: fine-tune a copy of the buyer's model on it.

``benefit = loss_before - loss_after`` on the buyer's objective set, so a positive benefit means
the data helped, the same sign as a positive influence score.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tip_fed.core.tasks import Task
from tip_fed.errors import ModelError
from tip_fed.protocol.data import Batch, check_batch, iter_batches


@dataclass(frozen=True)
class Benefit:
    """Objective loss before and after fine-tuning on one seller's data."""

    loss_before: float
    loss_after: float

    @property
    def benefit(self) -> float:
        """Loss reduction; > 0 means the data helped."""
        return self.loss_before - self.loss_after


def objective_loss(model: nn.Module, task: Task, objective: Batch, batch_size: int = 256) -> float:
    """Mean per-sample objective loss."""
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(objective, batch_size):
            losses = task.per_sample_loss(model, batch)
            total += float(losses.sum())
            n += int(losses.shape[0])
    return total / n


@dataclass(frozen=True)
class FineTune:
    """How a copy of the buyer's model is fine-tuned to measure realised benefit: plain SGD on the
    mean batch loss, shuffled by ``seed``.

    ``layers``: fnmatch patterns over parameter names (e.g. ``transformer.h.*``) to fine-tune only
    the layers the influence score sees; empty = every parameter.
    """

    lr: float
    epochs: int
    batch_size: int
    seed: int
    layers: Sequence[str] = ()


def finetune_benefit(model: nn.Module, task: Task, data: Batch, objective: Batch, tune: FineTune) -> Benefit:
    """Fine-tune a copy of ``model`` on ``data`` as ``tune`` says; the objective loss before and after."""
    n = check_batch(data)
    before = objective_loss(model, task, objective)
    tuned = copy.deepcopy(model)
    tuned.eval()  # deterministic (no dropout) so benefit reflects the data, not noise
    layers = tune.layers
    params = [
        p for name, p in tuned.named_parameters() if not layers or any(fnmatch.fnmatchcase(name, pat) for pat in layers)
    ]
    if not params:
        raise ModelError(
            f"ground-truth.layers {list(layers)} match no parameter of the model; "
            f"parameter names look like {[n for n, _ in tuned.named_parameters()][:4]}"
        )
    opt = torch.optim.SGD(params, lr=tune.lr)
    gen = torch.Generator().manual_seed(tune.seed)
    for _ in range(tune.epochs):
        order = torch.randperm(n, generator=gen)
        shuffled = {k: v[order] for k, v in data.items()}
        for batch in iter_batches(shuffled, tune.batch_size):
            opt.zero_grad(set_to_none=True)
            task.per_sample_loss(tuned, batch).mean().backward()
            opt.step()
    return Benefit(before, objective_loss(tuned, task, objective))


def coalition_utility(
    model: nn.Module, task: Task, sellers: Mapping[str, Batch], objective: Batch, tune: FineTune
) -> Callable[[frozenset[str]], float]:
    """Realised benefit of buying a *set* of sellers: fine-tune once on their pooled data.

    Unlike summing single-seller benefits this is not additive (overlapping or conflicting data),
    which is what leave-one-out and Shapley payouts need.
    """

    def utility(coalition: frozenset[str]) -> float:
        ids = sorted(coalition)
        data = {k: torch.cat([sellers[s][k] for s in ids]) for k in sellers[ids[0]]}
        return finetune_benefit(model, task, data, objective, tune).benefit

    return utility
