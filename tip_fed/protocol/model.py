"""The buyer's model as it travels in an Offer: builder name, config, safetensors weights, fingerprint.

Weights travel as safetensors (never pickles), so loading an Offer cannot execute code. A weight
the architecture ties to another (a language model's output layer sharing its input embedding)
travels once, under its first name in ``state_dict`` order; the rebuilt model re-ties it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from tip_fed.core import models
from tip_fed.core.gradients import projected_grads
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import Task
from tip_fed.errors import DataError, FingerprintMismatchError, ModelError, ProtocolError, TipError
from tip_fed.protocol.data import Batch, Placeholder
from tip_fed.protocol.resources import WeightsHeader, read_weights_header
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

#: Buffer elements (position ids, rotary tables) a model may hold beyond twice its parameter count.
_BUFFER_ALLOWANCE = 1 << 22


def fingerprint(architecture: str, config_json: str, weights: bytes) -> str:
    """sha256 binding the architecture, its config and the exact weight bytes."""
    h = hashlib.sha256()
    for part in (architecture.encode(), config_json.encode(), weights):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def encode_model(model: nn.Module) -> pb.ModelPayload:
    """Serialize ``model`` into a payload any seller can rebuild."""
    architecture, config = models.describe(model)
    config_json = json.dumps(config, sort_keys=True)
    weights = st_save(models.weights_state(model))
    return pb.ModelPayload(
        architecture=architecture,
        config_json=config_json,
        weights=weights,
        fingerprint=fingerprint(architecture, config_json, weights),
    )


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of ``model`` as :func:`encode_model` would announce it."""
    return encode_model(model).fingerprint


@dataclass(frozen=True)
class RunShape:
    """What a built model must score before the buyer is charged: ``size`` records of the widest
    shape the seller's records can take (a tensor dataset, or an input format's placeholder)."""

    spec: ProjectionSpec
    task: Task
    source: Batch | Placeholder
    size: int


def decode_model(
    payload: pb.ModelPayload, *, expected_fingerprint: str | None = None, header: WeightsHeader | None = None,
    runs_on: RunShape | None = None,
) -> nn.Module:
    """Check the fingerprint, then rebuild the model with the shipped weights (``header``: their
    safetensors header when the caller already read it, as costing an Offer does; ``runs_on``: the
    record-free batch it must score, see :func:`check_runs`)."""
    actual = fingerprint(payload.architecture, payload.config_json, payload.weights)
    if actual != payload.fingerprint:
        raise FingerprintMismatchError(
            f"model weights do not match their announced fingerprint ({payload.fingerprint[:12]}… announced, "
            f"{actual[:12]}… received): the model was altered or corrupted in transit; ask the buyer to resend"
        )
    if expected_fingerprint is not None and actual != expected_fingerprint:
        raise FingerprintMismatchError(
            f"model fingerprint {actual[:12]}… is not the one this seller was told to expect "
            f"({expected_fingerprint[:12]}…); refusing to score against an unexpected model"
        )
    try:
        config: dict[str, Any] = json.loads(payload.config_json)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"model config is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ProtocolError("model config is nested too deeply to be a model description") from None
    if not isinstance(config, dict):
        raise ProtocolError("model config must be a JSON object")
    # Sized from the header alone (float dtypes only, bytes by dtype) before any tensor is loaded.
    header = header or read_weights_header(payload.weights)
    _check_size(payload.architecture, config, header.n_elements)
    try:
        state = st_load(payload.weights)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise ModelError(f"model weights are not valid safetensors: {exc}") from exc
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        # refused before any record is read: non-finite weights make every record's loss non-finite
        raise ModelError("model weights hold NaN or infinite values; send a model with finite weights")
    model = models.build(payload.architecture, config)
    models.load_state(model, state)
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.float32:
        model.to(dtype)
    model.eval()
    if runs_on is not None:
        check_runs(model, runs_on)
    return model


def _check_size(architecture: str, config: dict[str, Any], n_weights: int) -> None:
    """Build the announced model on the meta device (no memory) and refuse it unless its size is
    exactly that of the shipped weights, so a config cannot make a seller allocate more than the
    (size-limited) Offer itself carries."""
    try:
        with torch.device("meta"):
            skeleton = models.build(architecture, config)
        state = skeleton.state_dict(keep_vars=True)
        aliases = models.tied_aliases(skeleton)
        n_all = sum(t.numel() for t in state.values())
        n_model = n_all - sum(state[key].numel() for key in aliases)
        n_buffers = sum(b.numel() for b in skeleton.buffers())  # non-persistent ones too: never shipped
    except TipError:
        raise
    except Exception as exc:
        raise ModelError(
            f"cannot build the announced {architecture!r} model from its config: {str(exc)[:300]}"
        ) from None
    if n_buffers > 2 * n_model + _BUFFER_ALLOWANCE:
        raise ModelError(
            f"the announced model would allocate {n_buffers} buffer elements for {n_model} parameters "
            "(refused before building it): its config asks for tables far larger than its weights"
        )
    if n_weights not in (n_model, n_all):  # tied tensors shipped once (n_model) or under every name (n_all)
        raise ModelError(
            f"model weights do not fit the announced architecture: it has {n_model} parameters but "
            f"the offer ships {n_weights} weights (refused before building it)"
        )


def check_runs(model: nn.Module, shape: RunShape) -> None:
    """DataError unless the model and ``shape.task`` score ``shape.size`` records at the widest shape the seller's
    records can take, holding no record's values: zeros in the dtype and width of a tensor dataset,
    or the input format's placeholder (text: ``max_length`` pad tokens, all attended).

    Run before the buyer's ledger is charged: a model that fails on any input (a position table
    shorter than the format's max_length, a feature count the records do not have) is refused for
    free, and since the batch holds no record's values, so is its message."""
    source, size, task = shape.source, shape.size, shape.task
    if isinstance(source, Mapping):
        batch = {k: torch.zeros_like(v[:1]).expand(size, *v.shape[1:]).clone() for k, v in source.items()}
    else:
        batch = source.placeholder(size)
    try:
        projected_grads(model, shape.spec, task, batch, zero_nonfinite=True)
    except TipError:
        raise
    except Exception as exc:  # the buyer's model: anything it raises is bad input
        dims = {k: tuple(v.shape) for k, v in batch.items()}
        raise DataError(
            f"the records do not fit the model and task ({task.name}): it fails on a placeholder batch of the "
            f"offered shape {dims} ({type(exc).__name__}: {str(exc)[:200]}); fix the model or the input "
            "format (a text model needs positions for the format's max_length)"
        ) from None
