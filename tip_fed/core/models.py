"""Model builders that every party can reproduce from (architecture, config) alone.

Sellers rebuild the buyer's model from the Offer: a builder name, a JSON config and the weights.
Only the builders registered here are accepted, so an Offer can never make a seller import or run
arbitrary code (no ``trust_remote_code``, no pickles):

* ``"mlp"``: tip_fed's :class:`MLP`, config ``{"sizes": [...], "bias": ...}``;
* ``"sequential"``: a flat ``nn.Sequential`` of standard layers, config ``{"layers": [...]}``
  (:mod:`tip_fed.core.sequential`);
* ``"transformers"``: any transformers class that the library's own auto mappings list as the
  causal-LM or sequence-classification model of a built-in ``model_type``, config
  ``{"model_class": ..., "config": {..., "model_type": ...}}``.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tip_fed.core.sequential import describe_sequential, sequential_from_spec
from tip_fed.errors import ModelError

__all__ = [
    "BUILDERS",
    "MLP",
    "TRANSFORMERS_TASKS",
    "build",
    "describe",
    "load_local",
    "load_pretrained",
    "load_state",
    "load_weights",
    "save_weights",
    "sequential_from_spec",
    "supported_transformers",
    "tied_aliases",
    "weights_state",
]


class MLP(nn.Sequential):
    """Plain multilayer perceptron (Linear + ReLU), the tabular and image buyer model."""

    def __init__(self, sizes: Sequence[int], bias: bool = True) -> None:
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ModelError(f"MLP sizes must be >= 2 positive integers, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
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


def _build_sequential(config: Mapping[str, Any]) -> nn.Module:
    if set(config) != {"layers"}:
        raise ModelError("a 'sequential' model config is {\"layers\": [...]}, one object per layer, e.g. "
                         "{\"layers\": [{\"type\": \"Linear\", \"in_features\": 64, \"out_features\": 10}]}")
    return sequential_from_spec(config["layers"])


# ---------------------------------------------------------------- transformers

#: task -> name of the transformers auto mapping (model_type -> class name) it draws classes from.
TRANSFORMERS_TASKS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
}
#: Most layers (or experts per layer) a transformers description may ask for.
MAX_TRANSFORMER_LAYERS = 512
_REFUSED_KEYS = ("auto_map", "trust_remote_code", "quantization_config", "use_kernels", "kernel_config")
_IMPLEMENTATION_KEYS = ("attn_implementation", "experts_implementation")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
                     "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_NOISY_KEYS = ("transformers_version", "architectures", "torch_dtype", "dtype")


@functools.cache
def supported_transformers() -> dict[str, dict[str, str]]:
    """``task -> {model_type: class name}`` for every transformers class tip_fed builds from a config."""
    from transformers.models.auto import modeling_auto

    return {task: dict(getattr(modeling_auto, mapping)) for task, mapping in TRANSFORMERS_TASKS.items()}


def _supported_hint() -> str:
    types = sorted(set().union(*(m.keys() for m in supported_transformers().values())))
    common = [t for t in ("gpt2", "bert", "llama", "qwen2", "opt", "mistral", "gemma") if t in types]
    return (f"supported: the causal-LM and sequence-classification classes of transformers' built-in model "
            f"types ({len(types)} model types, e.g. {', '.join(common)}; "
            "tip_fed.core.models.supported_transformers() lists them), built from a config without remote code")


def _check_class(model_class: Any, model_type: Any) -> str:
    """The task of ``(model_class, model_type)``; ModelError unless transformers maps one to the other."""
    if not isinstance(model_type, str) or not model_type:
        raise ModelError("a 'transformers' model config needs config.model_type, e.g. 'llama'; " + _supported_hint())
    tasks = supported_transformers()
    classes = {task: mapping[model_type] for task, mapping in tasks.items() if model_type in mapping}
    if not classes:
        raise ModelError(f"model_type {model_type[:60]!r} is not supported; {_supported_hint()}")
    for task, name in classes.items():
        if model_class == name:
            return task
    raise ModelError(
        f"model_class {str(model_class)[:60]!r} is not supported for model_type {model_type!r}; use "
        + " or ".join(f"{name} ({task})" for task, name in classes.items())
    )


def _check_config(config: Any, where: str = "config") -> None:
    """Refuse anything in a transformers config that could fetch or run code, or ask for a huge model."""
    if isinstance(config, list):
        for i, item in enumerate(config):
            _check_config(item, f"{where}[{i}]")
        return
    if not isinstance(config, Mapping):
        return
    for key, value in config.items():
        if not isinstance(key, str):  # id2label's integer keys
            continue
        if key in _REFUSED_KEYS or key.startswith("_"):
            raise ModelError(
                f"{where}.{key[:40]} is refused: tip_fed builds transformers models from the library's own code "
                "only (no auto_map, remote code, quantizers, hub kernels or internal keys); remove it. "
                + _supported_hint()
            )
        if key in _IMPLEMENTATION_KEYS and value is not None and (
            not isinstance(value, str) or "/" in value or ":" in value
        ):
            raise ModelError(f"{where}.{key} = {str(value)[:60]!r} is refused: only built-in implementations "
                             "such as 'eager' or 'sdpa' (no hub kernels)")
        if key in _LAYER_COUNT_KEYS and isinstance(value, int) and value > MAX_TRANSFORMER_LAYERS:
            raise ModelError(f"{where}.{key} = {value} is above the {MAX_TRANSFORMER_LAYERS} layers tip_fed builds "
                             "(refused before building it)")
        _check_config(value, f"{where}.{key}")


def _build_transformers(config: Mapping[str, Any]) -> nn.Module:
    import transformers

    if not isinstance(config.get("config", {}), Mapping):
        raise ModelError("a 'transformers' model config is {\"model_class\": ..., \"config\": {..., \"model_type\": "
                         "...}}")
    name = config.get("model_class")
    cfg = dict(config.get("config", {}))
    model_type = cfg.pop("model_type", None)
    _check_class(name, model_type)
    _check_config(cfg)
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
        return getattr(transformers, str(name))(hf_config)
    except Exception as exc:
        raise ModelError(
            f"cannot build a {name} from this {model_type!r} config, transformers rejects it: "
            f"{str(exc)[:300]}; fix the config (describe() writes a valid one from a live model)"
        ) from None


def _clean(value: Any) -> Any:
    """A config dict without internal, version or dtype keys, nor values JSON cannot carry."""
    if isinstance(value, Mapping):
        return {
            k: _clean(v)
            for k, v in value.items()
            if not (isinstance(k, str) and (k.startswith("_") or k in _NOISY_KEYS)) and _jsonable(v)
        }
    return value


def _describe_transformers(model: nn.Module) -> dict[str, Any] | None:
    """``{"model_class", "config"}`` for a supported transformers model, None if ``model`` is not one."""
    import sys

    transformers = sys.modules.get("transformers")
    cls = type(model)
    if transformers is None or not cls.__module__.startswith("transformers.") or not hasattr(model, "config"):
        return None
    if getattr(transformers, cls.__name__, None) is not cls:
        return None
    hf_config: Any = model.config
    model_type = getattr(hf_config, "model_type", None)
    _check_class(cls.__name__, model_type)
    cfg = _clean(hf_config.to_dict())
    _check_config(cfg)
    attn = getattr(hf_config, "_attn_implementation", None)
    if attn in ("eager", "sdpa"):
        cfg["attn_implementation"] = attn
    cfg["model_type"] = model_type
    return {"model_class": cls.__name__, "config": cfg}


BUILDERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "mlp": _build_mlp,
    "sequential": _build_sequential,
    "transformers": _build_transformers,
}


def describe(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """Return (architecture, config) from which :func:`build` recreates ``model``'s structure."""
    if isinstance(model, MLP):
        return "mlp", {"sizes": model.sizes, "bias": model.bias}
    if type(model) is nn.Sequential:
        return "sequential", {"layers": describe_sequential(model)}
    described = _describe_transformers(model)
    if described is not None:
        return "transformers", described
    cls = type(model)
    raise ModelError(
        f"cannot describe a {cls.__module__}.{cls.__qualname__} for sellers; supported: tip_fed MLP, a flat "
        f"torch.nn.Sequential of standard layers (tip_fed.core.sequential.LAYERS), and transformers models "
        f"({_supported_hint()})"
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
    if not isinstance(config, Mapping):
        raise ModelError(f"a {architecture!r} model config must be a JSON object")
    model = builder(config)
    model.eval()
    return model


# ---------------------------------------------------------------- weights


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``state_dict`` keys that name the same tensor as an earlier key (``alias -> first name``).

    Works on the meta device too: ties are the same Parameter object, found by identity.
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    return aliases


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` with every key accounted for: each of the model's tensors once, tied ones
    either once (re-tied by the architecture) or under every name with equal values."""
    aliases = tied_aliases(model)
    shipped: dict[str, str] = {}  # tie group (its first name) -> the shipped key seen first
    for key, tensor in state.items():
        group = aliases.get(key, key)
        if group in shipped and not torch.equal(tensor, state[shipped[group]]):
            raise ModelError(
                f"model weights: {key!r} and {shipped[group]!r} are one tied tensor in the announced "
                "architecture but the offer ships different values for them"
            )
        shipped.setdefault(group, key)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"model weights do not fit the announced architecture: {str(exc)[:300]}") from exc
    missing = [key for key in missing if aliases.get(key, key) not in shipped]
    if missing or unexpected:
        raise ModelError(
            f"model weights do not fit the announced architecture: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )


def weights_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state as contiguous CPU copies, each tied tensor once (under its first name)."""
    aliases = tied_aliases(model)
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if k not in aliases}


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s weights as safetensors (tied tensors once), readable by :func:`load_weights`."""
    from safetensors.torch import save_file

    save_file(weights_state(model), str(path))
    return Path(path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors weights file into ``model`` (e.g. one built by :func:`sequential_from_spec`).

    Every tensor of the model must be in the file, under its ``state_dict`` name, and nothing else.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ModelError(
            f"weights file {str(path)!r} does not exist; write it with tip_fed.core.models.save_weights "
            "or safetensors.torch.save_file(model.state_dict(), path)"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{str(path)!r} is not a safetensors file: {str(exc)[:200]}") from exc
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # weights saved in float64 (or bf16) keep their precision
        model.to(dtypes.pop())
    load_state(model, state)
    return model.eval()


# ---------------------------------------------------------------- loading saved models


def _from_pretrained(name_or_path: str | Path, model_class: str, config: Mapping[str, Any], **kwargs: Any) -> nn.Module:
    import transformers

    _check_class(model_class, config.get("model_type"))
    _check_config(_clean(config))
    try:
        model = getattr(transformers, model_class).from_pretrained(str(name_or_path), use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load {str(name_or_path)!r} as {model_class}: {str(exc)[:300]}. tip_fed loads safetensors "
            "weights only: pass a directory written by save_pretrained (safe_serialization, the default), "
            "or make sure the hub is reachable."
        ) from exc
    model.eval()
    return model


def load_local(path: str | Path) -> nn.Module:
    """Load a transformers model from a local ``save_pretrained`` directory, offline.

    The class is ``architectures[0]`` of its ``config.json`` and must be a supported causal-LM or
    sequence-classification class; weights must be safetensors; no remote code is ever run.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(
            f"model directory {str(folder)!r} does not exist; pass the folder written by model.save_pretrained(folder)"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"{str(folder)!r} has no config.json; pass the folder written by model.save_pretrained(folder)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} must hold a JSON object")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise ModelError(
            f"{config_file} names no architectures; save the model with save_pretrained from its "
            "class, or call load_pretrained(path, model_class, local_files_only=True)"
        )
    return _from_pretrained(folder, architectures[0], config, local_files_only=True)


def load_pretrained(
    name_or_path: str | Path, model_class: str, *, local_files_only: bool = False, revision: str | None = None
) -> nn.Module:
    """Load a supported transformers model from the hub (or a local directory) with the library's own code."""
    import transformers

    supported = {name for mapping in supported_transformers().values() for name in mapping.values()}
    if model_class not in supported:
        raise ModelError(f"model_class {model_class!r} is not supported; {_supported_hint()}")
    try:
        config, _ = transformers.PretrainedConfig.get_config_dict(
            str(name_or_path), local_files_only=local_files_only, revision=revision
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load {str(name_or_path)!r}: {str(exc)[:300]}. Pass a local directory written by "
            "save_pretrained, or make sure the hub is reachable."
        ) from exc
    return _from_pretrained(name_or_path, model_class, config, local_files_only=local_files_only, revision=revision)
