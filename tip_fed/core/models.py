"""Model builders that every party can reproduce from (architecture, config) alone.

Sellers rebuild the buyer's model from the Offer: a builder name, a JSON config and the weights.
Only builders registered here are accepted, so an Offer can never make a seller import or run
arbitrary code (no ``trust_remote_code``, no pickles).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tip_fed.errors import ModelError


class MLP(nn.Sequential):
    """Plain multilayer perceptron (Linear + ReLU), the tabular and image buyer model."""

    def __init__(self, sizes: Sequence[int], bias: bool = True) -> None:
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ModelError(f"MLP sizes must be >= 2 positive integers, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(int(a), int(b), bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.sizes = [int(s) for s in sizes]
        self.bias = bias


def _build_mlp(config: Mapping[str, Any]) -> nn.Module:
    try:
        return MLP(config["sizes"], bias=bool(config.get("bias", True)))
    except KeyError as exc:
        raise ModelError("an 'mlp' model config needs 'sizes', e.g. {\"sizes\": [64, 32, 10]}") from exc


TRANSFORMERS_CLASSES = (
    "GPT2LMHeadModel",
    "BertForSequenceClassification",
    "GPT2ForSequenceClassification",
)


def _build_transformers(config: Mapping[str, Any]) -> nn.Module:
    import transformers

    name = config.get("model_class")
    if name not in TRANSFORMERS_CLASSES:
        raise ModelError(f"model_class {name!r} is not supported; use one of {', '.join(TRANSFORMERS_CLASSES)}")
    cfg = dict(config.get("config", {}))
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ModelError("a 'transformers' model config needs config.model_type, e.g. 'gpt2'")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"cannot build a {model_type!r} config: {exc}") from exc
    return getattr(transformers, name)(hf_config)


BUILDERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "mlp": _build_mlp,
    "transformers": _build_transformers,
}


def describe(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """Return (architecture, config) from which :func:`build` recreates ``model``'s structure."""
    if isinstance(model, MLP):
        return "mlp", {"sizes": model.sizes, "bias": model.bias}
    cls = type(model).__name__
    if cls in TRANSFORMERS_CLASSES and hasattr(model, "config"):
        cfg = model.config.to_dict()
        keep = {k: v for k, v in cfg.items() if _jsonable(v) and not k.startswith("_")}
        keep["model_type"] = cfg["model_type"]
        for noisy in ("transformers_version", "architectures", "torch_dtype", "dtype"):
            keep.pop(noisy, None)
        return "transformers", {"model_class": cls, "config": keep}
    raise ModelError(
        f"cannot describe a {cls} for sellers; supported: tip_fed MLP and {', '.join(TRANSFORMERS_CLASSES)}"
    )


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def build(architecture: str, config: Mapping[str, Any]) -> nn.Module:
    """Recreate a model (random weights) from its architecture name and config."""
    builder = BUILDERS.get(architecture)
    if builder is None:
        raise ModelError(f"unknown model architecture {architecture!r}; known: {', '.join(sorted(BUILDERS))}")
    model = builder(config)
    model.eval()
    return model


def load_pretrained(name_or_path: str | Path, model_class: str, *, local_files_only: bool = False) -> nn.Module:
    """Load a transformers model from the hub or a local directory made by ``save_pretrained``."""
    import transformers

    if model_class not in TRANSFORMERS_CLASSES:
        raise ModelError(f"model_class {model_class!r} is not supported; use one of {', '.join(TRANSFORMERS_CLASSES)}")
    try:
        model = getattr(transformers, model_class).from_pretrained(
            str(name_or_path), local_files_only=local_files_only
        )
    except OSError as exc:
        raise ModelError(
            f"cannot load {name_or_path!r}: {exc}. Pass a local directory written by save_pretrained, "
            "or make sure the hub is reachable."
        ) from exc
    model.eval()
    return model
