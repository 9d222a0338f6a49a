"""One typed, frozen settings tree and its single loader (TOML file + ``key=value`` overrides).

Every setting has a default, so an empty file is a valid config. Unknown keys and values of the
wrong type are errors that name the key, because a silently ignored typo in a valuation run
changes the payouts without anyone noticing.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tip_fed.errors import ConfigError

RUNTIMES = ("inprocess",)
DISCLOSURES = ("aggregate", "per-sample")


@dataclass(frozen=True)
class ProjectionConfig:
    """LoGra-style per-layer projection of per-sample gradients."""

    rank: int = 8
    kind: str = "rademacher"
    include: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "projection.rank", "must be >= 1")
        _require(self.kind in ("rademacher", "gaussian"), "projection.kind", "must be 'rademacher' or 'gaussian'")


@dataclass(frozen=True)
class PreconditionerConfig:
    """Inverse damped curvature applied to the buyer's objective gradient."""

    kind: str = "kfac"
    damping: float | None = None

    def __post_init__(self) -> None:
        kinds = ("identity", "raw", "kfac", "ekfac")
        _require(self.kind in kinds, "preconditioner.kind", f"must be one of {', '.join(kinds)}")
        _require(self.damping is None or self.damping >= 0, "preconditioner.damping", "must be >= 0")


@dataclass(frozen=True)
class CryptoConfig:
    """CKKS parameters for the session keys; checked for >= 128-bit security before use."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40


@dataclass(frozen=True)
class ProtocolConfig:
    """What the buyer asks of sellers in the Offer."""

    disclosure: str = "aggregate"
    grad_norm_bound: float | None = None
    query_budget: int = 1

    def __post_init__(self) -> None:
        _require(self.disclosure in DISCLOSURES, "protocol.disclosure", "must be 'aggregate' or 'per-sample'")
        _require(
            self.grad_norm_bound is None or self.grad_norm_bound > 0,
            "protocol.grad-norm-bound",
            "must be > 0 (or unset to derive it from the buyer's own gradients)",
        )
        _require(self.query_budget >= 1, "protocol.query-budget", "must be >= 1")


@dataclass(frozen=True)
class GroundTruthConfig:
    """Realised benefit: fine-tune a copy of the buyer model on one seller's data."""

    enabled: bool = True
    lr: float = 0.05
    epochs: int = 1
    batch_size: int = 16

    def __post_init__(self) -> None:
        _require(self.lr > 0, "ground-truth.lr", "must be > 0")
        _require(self.epochs >= 1, "ground-truth.epochs", "must be >= 1")
        _require(self.batch_size >= 1, "ground-truth.batch-size", "must be >= 1")


@dataclass(frozen=True)
class CausalConfig:
    """Causal-validity market on scikit-learn's handwritten digits.

    The buyer's model never saw ``missing`` classes; its objective needs them. One seller per
    entry of ``seller_classes``; the seller holding a missing class should be valued highest.
    """

    buyer_classes: tuple[int, ...] = (1, 2, 3)
    objective_classes: tuple[int, ...] = (1, 2, 3, 4)
    seller_classes: tuple[tuple[int, ...], ...] = ((1,), (2,), (3,), (4,))
    samples_per_seller: int = 60
    objective_per_class: int = 20
    hidden: int = 32
    train_epochs: int = 30

    def __post_init__(self) -> None:
        every = set(self.buyer_classes) | set(self.objective_classes)
        every |= {c for group in self.seller_classes for c in group}
        _require(all(0 <= c <= 9 for c in every), "causal", "classes must be digits 0..9")
        _require(len(self.seller_classes) >= 2, "causal.seller-classes", "needs at least two sellers")
        _require(self.samples_per_seller >= 1, "causal.samples-per-seller", "must be >= 1")
        _require(self.objective_per_class >= 1, "causal.objective-per-class", "must be >= 1")


@dataclass(frozen=True)
class TipConfig:
    """Root of the settings tree; ``scenario`` picks the market simulation."""

    scenario: str = "causal"
    seed: int = 0
    runtime: str = "inprocess"
    quick: bool = False
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    preconditioner: PreconditionerConfig = field(default_factory=PreconditionerConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)

    def __post_init__(self) -> None:
        _require(self.runtime in RUNTIMES, "runtime", f"must be one of {', '.join(RUNTIMES)}")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict with TOML (kebab-case) keys, for manifests."""
        return _to_dict(self)


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {what}")


def _toml_key(name: str) -> str:
    return name.replace("_", "-")


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_toml_key(f.name): _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_dict(v) for v in obj]
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``hint``; lists become tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = args[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {hint!r}")  # pragma: no cover


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {_toml_key(f.name): f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = _toml_key(raw_key)
        full = f"{prefix}{key}"
        if key not in names:
            valid = ", ".join(sorted(f"{prefix}{k}" for k in names))
            raise ConfigError(f"unknown setting '{full}'; valid keys here: {valid}")
        name = names[key]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{full}' is a table of settings, not a value")
            kwargs[name] = _build(hint, value, f"{full}.")
        else:
            kwargs[name] = _coerce(value, hint, full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - dataclass internals
        raise ConfigError(f"invalid settings under '{prefix or 'top level'}': {exc}") from exc


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (as given to ``--set``) onto a nested dict."""
    merged = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. seed=3")
        dotted, text = item.split("=", 1)
        parts = [p.strip() for p in dotted.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key part")
        node = merged
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a table")
            node = child
        node[parts[-1]] = _parse_value(text.strip())
    return merged


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def config_from_dict(data: Mapping[str, Any]) -> TipConfig:
    """Build and validate a :class:`TipConfig` from nested (TOML-shaped) data."""
    return _build(TipConfig, data, "")  # type: ignore[no-any-return]


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TipConfig:
    """Load a TOML config (or only defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass a path such as configs/causal.toml")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file '{p}' is not valid TOML: {exc}") from exc
    return config_from_dict(apply_overrides(data, overrides))
