"""How to turn a batch into one loss per sample: the only model-specific piece of the math.

A :class:`Task` maps ``(model, batch)`` to a ``[n]`` tensor of per-sample losses. Losses are
*sums* over a sample's terms (tokens), never means over the batch, so that the gradient of
sample ``i``'s loss is the quantity an SGD step on sample ``i`` would follow. Batches are
dicts of tensors whose first dimension is the sample axis. Users plug in their own task by
implementing the protocol (a ``name`` and a ``per_sample_loss`` method).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from tip_fed.errors import ConfigError, DataError, ModelError

__all__ = [
    "TASKS",
    "CausalLMTask",
    "ClassificationTask",
    "SequenceClassificationTask",
    "Task",
    "batch_size",
    "get_task",
]

Batch = Mapping[str, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    """Per-sample losses for one kind of model and batch."""

    name: str

    def per_sample_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Loss of each sample of ``batch`` under ``model``, shape ``[n]``."""
        ...


def batch_size(batch: Batch) -> int:
    """Number of samples in ``batch`` (DataError if it is empty or its tensors disagree)."""
    if not isinstance(batch, Mapping) or not batch:
        raise DataError("a batch must be a non-empty dict of tensors, e.g. {'x': ..., 'y': ...}.")
    sizes = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise DataError(
                f"batch[{key!r}] must be a tensor with a sample dimension, got "
                f"{type(value).__name__}{'' if not isinstance(value, torch.Tensor) else ' (0-d)'}."
            )
        sizes[key] = int(value.shape[0])
    if len(set(sizes.values())) != 1:
        raise DataError(f"batch tensors disagree on the number of samples: {sizes}.")
    n = next(iter(sizes.values()))
    if n == 0:
        raise DataError("the batch is empty (0 samples); pass at least one sample.")
    return n


def _require(batch: Batch, keys: tuple[str, ...], task: str) -> None:
    batch_size(batch)
    missing = [key for key in keys if key not in batch]
    if missing:
        raise DataError(
            f"task {task!r} needs batch keys {list(keys)}; missing {missing} "
            f"(batch has {sorted(batch)})."
        )


def _logits(output: Any) -> torch.Tensor:
    """Logits from a plain tensor, a transformers ModelOutput, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(
        f"the model returned {type(output).__name__}; expected logits (a tensor or an "
        "object with .logits). Wrap the model or write a custom Task."
    )


def _class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy; a label outside the model's classes gives a NaN loss, not an
    exception: whether a record's values fit a model is then decided per record (the gradient code
    refuses a non-finite loss, or zeroes that record's row), never for the whole batch at once."""
    classes = logits.shape[-1]
    loss = F.cross_entropy(logits, labels.clamp(0, classes - 1), reduction="none")
    return _nan_unless((labels >= 0) & (labels < classes), loss)


def _in_vocabulary(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids clamped to the model's input embedding, which samples attend only to ids inside it): a token
    id outside the vocabulary gives that sample a NaN loss (as :func:`_class_loss`), not an IndexError."""
    try:
        size = getattr(model.get_input_embeddings(), "num_embeddings", None)  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        size = None
    if not isinstance(size, int):
        return ids, torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    valid = ((ids >= 0) & (ids < size) | (mask == 0)).all(dim=1)
    return ids.clamp(0, size - 1), valid


def _nan_unless(valid: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` where ``valid``, NaN elsewhere."""
    return torch.where(valid, loss, torch.full_like(loss, float("nan")))


def _check_mask(batch: Batch, ids_key: str = "input_ids") -> torch.Tensor:
    ids, mask = batch[ids_key], batch["attention_mask"]
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise DataError(
            f"input_ids and attention_mask must both be [n, T]; got {tuple(ids.shape)} "
            f"and {tuple(mask.shape)}."
        )
    return mask


class ClassificationTask:
    """Cross-entropy of ``model(x)`` against ``y``; batch ``{"x": [n, ...], "y": long [n]}``."""

    name = "classification"

    def per_sample_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        _require(batch, ("x", "y"), self.name)
        labels = batch["y"]
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise DataError(f"batch['y'] must be integer class labels [n], got {labels.dtype} "
                            f"{tuple(labels.shape)}.")
        logits = _logits(model(batch["x"]))
        return _class_loss(logits, labels)


class SequenceClassificationTask:
    """transformers sequence classifier; batch ``{"input_ids", "attention_mask", "labels"}``.

    Integer labels give cross-entropy; float labels with one logit give squared error
    (regression, as transformers does for ``num_labels == 1``).
    """

    name = "sequence-classification"

    def per_sample_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        _require(batch, ("input_ids", "attention_mask", "labels"), self.name)
        mask = _check_mask(batch)
        ids, known = _in_vocabulary(model, batch["input_ids"], mask)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"]
        try:
            output = model(**inputs)
        except ValueError as exc:  # decoder classifiers pool the last non-pad token: they need its id
            if "padding token" not in str(exc):
                raise
            raise ModelError(
                f"{type(model).__name__} pools each sequence's last non-padding token and its config has no "
                "pad_token_id; set model.config.pad_token_id to the tokenizer's pad id (and pad batches "
                "with it) before valuing."
            ) from exc
        logits = _logits(output)
        labels = batch["labels"]
        if labels.dtype.is_floating_point:
            if logits.shape[-1] != 1:
                raise DataError("float labels need a single-output (regression) model; "
                                "use integer class labels for classification.")
            return _nan_unless(known, (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2)
        return _nan_unless(known, _class_loss(logits, labels))


class CausalLMTask:
    """Next-token loss summed over each sample's real target tokens.

    Batch ``{"input_ids": [n, T], "attention_mask": [n, T]}``. A target position counts when
    both it and its context token are real (mask 1), so right and left padding both give the
    sample's unpadded loss. With left padding, position ids are derived from the mask so
    positions match the unpadded sequence (the model must accept ``position_ids``).
    """

    name = "causal-lm"

    def per_sample_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        _require(batch, ("input_ids", "attention_mask"), self.name)
        mask = _check_mask(batch)
        ids, known = _in_vocabulary(model, batch["input_ids"], mask)
        if ids.shape[1] < 2:
            raise DataError("causal-lm needs sequences of at least 2 tokens to predict one.")
        inputs = {"input_ids": ids, "attention_mask": mask}
        if bool((mask[:, 0] == 0).any()):
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = _logits(model(**inputs))
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        n, length, vocab = logits.shape
        token_loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none"
        ).view(n, length - 1)
        valid = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
        return _nan_unless(known, (token_loss * valid.to(token_loss.dtype)).sum(dim=1))


TASKS: dict[str, type] = {
    ClassificationTask.name: ClassificationTask,
    SequenceClassificationTask.name: SequenceClassificationTask,
    CausalLMTask.name: CausalLMTask,
}


def get_task(name: str | Task) -> Task:
    """The built-in task called ``name`` (a Task passes through; ConfigError if unknown)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ConfigError(
            f"unknown task {name!r}; use one of {sorted(TASKS)} or pass a Task object."
        )
    return TASKS[name]()
