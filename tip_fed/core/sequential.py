"""Plain torch models as data: an ``nn.Sequential`` of standard layers written as a JSON list.

A buyer with an ordinary ``nn.Sequential`` (or a model declared in a TOML file) ships it to
sellers as a list such as ``[{"type": "Linear", "in_features": 64, "out_features": 32,
"bias": true}, {"type": "ReLU"}, ...]``. Only the layer types in :data:`LAYERS` are built, each
from typed, range-checked arguments, so a spec can never import or run code. Sizes are bounded
(:data:`MAX_LAYERS`, :data:`MAX_FEATURES`, :data:`MAX_PARAMETERS`) and checked from the spec's
numbers alone, before any module exists, so a hostile spec costs a seller nothing.

Sequentials are flat: a nested ``nn.Sequential`` would change every weight's name, so it is
refused with a hint to flatten it (``nn.Sequential(*inner, *outer)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from tip_fed.errors import ModelError

__all__ = [
    "LAYERS",
    "MAX_FEATURES",
    "MAX_LAYERS",
    "MAX_PARAMETERS",
    "describe_sequential",
    "sequential_from_spec",
    "spec_parameter_count",
]

#: Most layers a spec may list.
MAX_LAYERS = 1024
#: Largest feature size of any one dimension (Linear in/out, each LayerNorm dimension).
MAX_FEATURES = 1 << 20
#: Most parameters a spec may declare in all (2**31, 8 GiB in float32).
MAX_PARAMETERS = 1 << 31


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise ValueError(f"an integer in [{lo}, {hi if hi is not None else '∞'}]")
        return value
    return check


def _float(lo: float, hi: float, *, open_hi: bool = False, open_lo: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"a finite number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")
        if value < lo or value > hi or (open_hi and value == hi) or (open_lo and value == lo):
            raise ValueError(f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")
        return float(value)
    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"one of {list(options)}")
        return str(value)
    return check


def _shape(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise TypeError(f"an integer or a list of 1 to 8 integers in [1, {MAX_FEATURES}]")
    if not 1 <= len(value) <= 8:
        raise ValueError(f"an integer or a list of 1 to 8 integers in [1, {MAX_FEATURES}]")
    return [_int(1, MAX_FEATURES)(v) for v in value]


_FEATURES = _int(1, MAX_FEATURES)
_DIM = _int(-8, 8)
_ANY = _float(-1e6, 1e6)


class _Layer:
    """One supported layer type: its torch class and its arguments (name -> (check, default))."""

    def __init__(self, cls: type[nn.Module], args: dict[str, tuple[Callable[[Any], Any], Any]],
                 read: Callable[[Any], dict[str, Any]] | None = None) -> None:
        self.cls, self.args = cls, args
        self.read = read or (lambda module: {name: getattr(module, name) for name in args})


LAYERS: dict[str, _Layer] = {
    "Linear": _Layer(
        nn.Linear,
        {"in_features": (_FEATURES, None), "out_features": (_FEATURES, None), "bias": (_bool, True)},
        lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    ),
    "ReLU": _Layer(nn.ReLU, {}),
    "GELU": _Layer(nn.GELU, {"approximate": (_choice("none", "tanh"), "none")}),
    "Tanh": _Layer(nn.Tanh, {}),
    "Sigmoid": _Layer(nn.Sigmoid, {}),
    "SiLU": _Layer(nn.SiLU, {}),
    "Mish": _Layer(nn.Mish, {}),
    "LeakyReLU": _Layer(nn.LeakyReLU, {"negative_slope": (_ANY, 0.01)}),
    "ELU": _Layer(nn.ELU, {"alpha": (_ANY, 1.0)}),
    "Softplus": _Layer(nn.Softplus, {"beta": (_ANY, 1.0), "threshold": (_ANY, 20.0)}),
    "Dropout": _Layer(nn.Dropout, {"p": (_float(0.0, 1.0, open_hi=True), 0.5)}),
    "LayerNorm": _Layer(
        nn.LayerNorm,
        {
            "normalized_shape": (_shape, None),
            "eps": (_float(0.0, 1.0, open_lo=True), 1e-5),
            "elementwise_affine": (_bool, True),
            "bias": (_bool, True),
        },
        lambda m: {
            "normalized_shape": list(m.normalized_shape),
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
            "bias": getattr(m, "bias", None) is not None,
        },
    ),
    "Flatten": _Layer(nn.Flatten, {"start_dim": (_DIM, 1), "end_dim": (_DIM, -1)}),
    "Identity": _Layer(nn.Identity, {}, lambda m: {}),
}

_SUPPORTED = ", ".join(LAYERS)


def _unsupported(what: str) -> ModelError:
    return ModelError(
        f"{what}; a 'sequential' model is a flat torch.nn.Sequential of these layers only: {_SUPPORTED}. "
        "Use tip_fed's MLP, a supported transformers model, or express the model with these layers."
    )


def _check_layer(index: int, entry: Any) -> tuple[str, _Layer, dict[str, Any]]:
    """Validated (type name, layer type, full argument dict) of spec entry ``index``."""
    if not isinstance(entry, Mapping):
        raise ModelError(
            f'sequential layer #{index} must be an object like {{"type": "ReLU"}}, got {type(entry).__name__}'
        )
    kind = entry.get("type")
    layer = LAYERS.get(kind) if isinstance(kind, str) else None
    if layer is None or not isinstance(kind, str):
        raise _unsupported(f"sequential layer #{index} has type {str(kind)[:40]!r}")
    unknown = sorted(str(k)[:40] for k in entry if k != "type" and k not in layer.args)
    if unknown:
        raise ModelError(
            f"sequential layer #{index} ({kind}) has unknown arguments {unknown}; "
            f"{kind} takes {sorted(layer.args) or 'no arguments'}"
        )
    args: dict[str, Any] = {}
    for name, (check, default) in layer.args.items():
        if name not in entry and default is None:
            raise ModelError(f"sequential layer #{index} ({kind}) needs {name!r}")
        try:
            args[name] = check(entry.get(name, default))
        except (TypeError, ValueError) as exc:
            raise ModelError(
                f"sequential layer #{index} ({kind}): {name} must be {exc}, got {str(entry.get(name))[:40]}"
            ) from None
    return kind, layer, args


def _layer_parameters(kind: str, args: Mapping[str, Any]) -> int:
    if kind == "Linear":
        return args["in_features"] * args["out_features"] + (args["out_features"] if args["bias"] else 0)
    if kind == "LayerNorm" and args["elementwise_affine"]:
        return math.prod(args["normalized_shape"]) * (2 if args["bias"] else 1)
    return 0


def _checked_spec(spec: Any) -> list[tuple[str, _Layer, dict[str, Any]]]:
    if not isinstance(spec, (list, tuple)):
        raise ModelError(f"a sequential spec must be a list of layer objects, got {type(spec).__name__}")
    if not spec:
        raise ModelError("a sequential spec needs at least one layer")
    if len(spec) > MAX_LAYERS:
        raise ModelError(
            f"a sequential spec may list at most {MAX_LAYERS} layers, this one lists {len(spec)} "
            "(refused before building it)"
        )
    checked = [_check_layer(i, entry) for i, entry in enumerate(spec)]
    total = sum(_layer_parameters(kind, args) for kind, _, args in checked)
    if total > MAX_PARAMETERS:
        raise ModelError(
            f"a sequential spec may declare at most {MAX_PARAMETERS} parameters, this one declares "
            f"{total} (refused before building it)"
        )
    return checked


def spec_parameter_count(spec: Sequence[Mapping[str, Any]]) -> int:
    """Number of parameters the validated ``spec`` declares, computed without building it."""
    return sum(_layer_parameters(kind, args) for kind, _, args in _checked_spec(spec))


def sequential_from_spec(spec: Sequence[Mapping[str, Any]]) -> nn.Sequential:
    """Build the ``nn.Sequential`` that ``spec`` (a list of layer objects) declares, random weights.

    E.g. ``[{"type": "Linear", "in_features": 64, "out_features": 32}, {"type": "ReLU"},
    {"type": "Linear", "in_features": 32, "out_features": 10}]``; omitted arguments take torch's
    defaults. ModelError names the offending layer and the supported layer types.
    """
    return nn.Sequential(*(layer.cls(**args) for _, layer, args in _checked_spec(spec)))


def describe_sequential(model: nn.Sequential) -> list[dict[str, Any]]:
    """The spec that :func:`sequential_from_spec` turns back into ``model``'s structure."""
    spec: list[dict[str, Any]] = []
    for index, (name, module) in enumerate(model.named_children()):
        if name != str(index):
            raise ModelError(
                f"layer {name!r} of the Sequential is named; sellers rebuild layers named 0, 1, 2, ... "
                "so build it as nn.Sequential(layer0, layer1, ...) without an OrderedDict"
            )
        cls = type(module)
        layer = LAYERS.get(cls.__name__)
        if layer is None or layer.cls is not cls:
            hint = " (flatten it: nn.Sequential(*inner, *outer))" if isinstance(module, nn.Sequential) else ""
            raise _unsupported(f"layer {name!r} is a {cls.__module__}.{cls.__qualname__}{hint}")
        spec.append({"type": cls.__name__, **layer.read(module)})
    _checked_spec(spec)
    return spec
