"""Reading TOML into typed settings: one error shape for every mistake, one declaration per setting.

A setting is a field of a frozen dataclass declared with :func:`setting` (its default, the help
text the CLI and the docs show, and the values it allows, which the :class:`Section` base checks);
a section is a field whose type is such a dataclass. From those
declarations come the loader (:func:`build`, TOML keys in kebab-case, unknown keys refused), the
``key=value`` overrides, the plain-dict form written to manifests and the listing of every setting
(:func:`describe`). The helpers for hand-checked tables (buyer.toml, sellers.toml) raise a
:class:`~tip_fed.errors.ConfigError` that names the file, the key and the fix; paths in a file are
relative to that file. Nothing here imports torch, TenSEAL or grpcio.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tip_fed.errors import ConfigError


def setting(default: Any, help: str, *, at_least: float | None = None, above: float | None = None,
            at_most: float | None = None, below: float | None = None, one_of: tuple[str, ...] = ()) -> Any:
    """A declared setting: its default, one line of help (shown by ``tip-fed settings``, ``--help``
    and the settings table of the docs) and the values it may take: numbers within the given bounds
    (each entry of a list; unset passes), or one of ``one_of``. :class:`Section` checks them when a
    section is made, so no section writes its own range checks."""
    allowed: Bounds | tuple[str, ...] | None = one_of or None
    if (at_least, above, at_most, below) != (None,) * 4:
        allowed = Bounds(at_least if above is None else above, above is not None,
                         at_most if below is None else below, below is not None)
    return dataclasses.field(default=default, metadata={"help": help, "allowed": allowed})


@dataclass(frozen=True)
class Bounds:
    """The finite numbers a setting may take: ``low`` and ``high`` (None: no end), each end excluded
    when ``*_open``."""

    low: float | None
    low_open: bool
    high: float | None
    high_open: bool

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return low_ok and (self.high is None or (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"{'<' if self.high_open else '<='} {high}"


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def allowed_text(allowed: Bounds | tuple[str, ...] | None) -> str:
    """What a setting may be, in words ("" when anything of its type goes)."""
    if isinstance(allowed, tuple):
        return f"one of {', '.join(allowed)}"
    return "" if allowed is None else str(allowed)


class Section:
    """Base of a settings section (a frozen dataclass of :func:`setting` fields): making one checks
    every value against what its declaration allows, naming the dotted TOML key
    (``class GrpcConfig(Section, key="grpc")``; roots have no key). Checks across settings go in a
    subclass's ``__post_init__`` after ``super().__post_init__()``."""

    key: ClassVar[str] = ""

    def __init_subclass__(cls, key: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.key = key

    def __post_init__(self) -> None:
        prefix = f"{self.key}." if self.key else ""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed, value = f.metadata.get("allowed"), getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if allowed is not None and value is not None and not all(v in allowed for v in values):
                each = "each entry " if isinstance(value, tuple) else ""
                odd = any(isinstance(v, float) and not math.isfinite(v) for v in values)
                finite = "a finite number " if odd else ""
                raise ConfigError(f"{prefix}{toml_key(f.name)} {each}must be {finite}{allowed_text(allowed)} "
                                  f"({f.metadata['help']}), got {to_dict(value)!r}")


def require(ok: bool, key: str, what: str) -> None:
    """ConfigError ``"<key> <what>"`` unless ``ok``: the validation of a declared setting."""
    if not ok:
        raise ConfigError(f"{key} {what}")


def toml_key(name: str) -> str:
    """The TOML (kebab-case) key of a field name."""
    return name.replace("_", "-")


def read_toml(path: str | Path, what: str, example: str) -> tuple[Path, dict[str, Any]]:
    """The resolved path and parsed contents of a TOML file; ConfigError if absent or invalid."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file '{p}' does not exist; {example}")
    try:
        return p.resolve(), tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file '{p}' is not valid TOML: {exc}") from None


def check_keys(table: Mapping[str, Any], allowed: Iterable[str], where: str, name: str = "") -> None:
    """ConfigError naming the first key of ``table`` not in ``allowed`` (``where``: its dotted prefix;
    ``name``: the file, when there is one)."""
    allowed = tuple(allowed)
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{name + ': ' if name else ''}unknown key '{where}{unknown[0]}'; valid keys here: "
                          + ", ".join(f"{where}{k}" for k in allowed))


# ---- typed settings trees ----


def is_section(hint: Any) -> bool:
    """True for a field type that is itself a dataclass of settings."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def keys_of(cls: type) -> tuple[str, ...]:
    """The TOML keys of a settings class, in declaration order."""
    return tuple(toml_key(f.name) for f in dataclasses.fields(cls))


def to_dict(obj: Any) -> Any:
    """Nested plain data with TOML keys (tuples as lists), the inverse of :func:`build`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {toml_key(f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
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
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = typing.get_args(hint)[0]
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
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key} = {value} is too large for a floating-point setting") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {hint!r}")  # pragma: no cover


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of the settings class ``cls`` from TOML-shaped ``data``: unknown keys, values of
    the wrong type and values its checks refuse are ConfigErrors naming the dotted key."""
    hints = typing.get_type_hints(cls)
    names = dict(zip(keys_of(cls), (f.name for f in dataclasses.fields(cls)), strict=True))
    check_keys({toml_key(k): v for k, v in data.items()}, names, prefix)
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        full, name = f"{prefix}{toml_key(raw_key)}", names[toml_key(raw_key)]
        if is_section(hints[name]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{full}' is a table of settings, not a value")
            kwargs[name] = build(hints[name], value, f"{full}.")
        else:
            kwargs[name] = _coerce(value, hints[name], full)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (as given to ``--set``) onto a copy of nested ``data``."""
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


def load_typed(cls: type, path: str | Path | None, overrides: Iterable[str], example: str) -> Any:
    """Settings of class ``cls`` from a TOML file (defaults only when ``path`` is None) and overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path, "config", example)[1]
    return build(cls, apply_overrides(data, overrides))


@dataclass(frozen=True)
class Declared:
    """One declared setting as listed to users: dotted TOML key, type, default, help and what values it allows."""

    key: str
    type: str
    default: str
    help: str
    allowed: str = ""


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("unset" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(hint, str(hint))


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(to_dict(value)).replace("'", '"')


def describe(cls: type, prefix: str = "") -> list[Declared]:
    """Every setting of ``cls`` (sections expanded), in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[Declared] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{toml_key(f.name)}"
        if is_section(hints[f.name]):
            out += describe(hints[f.name], f"{key}.")
        else:
            out.append(Declared(key, _type_name(hints[f.name]), _show(f.default), f.metadata.get("help", ""),
                                allowed_text(f.metadata.get("allowed"))))
    return out


def markdown_table(declared: Iterable[Declared]) -> str:
    """Declared settings (see :func:`describe`) as a markdown table: key, type, allowed values, default, meaning."""
    rows = ["| setting | type | allowed | default | meaning |", "|---|---|---|---|---|"]
    rows += [f"| `{d.key}` | {d.type} | {d.allowed} | `{d.default}` | {d.help.replace('|', '/')} |" for d in declared]
    return "\n".join(rows) + "\n"


# ---- hand-checked tables (buyer.toml, sellers.toml) ----


def table(data: Mapping[str, Any], key: str, name: str, required: bool = True) -> dict[str, Any]:
    """The sub-table ``[key]`` (empty when absent and not ``required``)."""
    value = data.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: [{key}] is {'missing' if value is None else 'not a table'}; add a [{key}] table")
    return dict(value)


def existing_path(base: Path, value: Any, key: str, name: str, *, directory: bool | None = False) -> Path:
    """``value`` as a path relative to the TOML file; ConfigError unless it exists (a directory when
    ``directory``, a file when False, either when None)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: {key} must be a path (a string), got {value!r}")
    path = (base / value).resolve()
    ok = path.exists() if directory is None else (path.is_dir() if directory else path.is_file())
    if not ok:
        kind = "path" if directory is None else ("directory" if directory else "file")
        raise ConfigError(f"{name}: {key} = {value!r}: {kind} {path} does not exist; paths are relative to {name}")
    return path


def string(table_: Mapping[str, Any], key: str, where: str, name: str, default: str | None = None) -> str | None:
    """A non-empty string value (or ``default`` when absent)."""
    value = table_.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{name}: {where}{key} must be a non-empty string, got {value!r}")
    return value


def positive_int(table_: Mapping[str, Any], key: str, where: str, name: str, what: str) -> int | None:
    """An integer >= 1 (None when absent)."""
    value = table_.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name}: {where}{key} must be an integer >= 1 ({what}), got {value!r}")
    return value


def flag(table_: Mapping[str, Any], key: str, where: str, name: str) -> bool:
    """A boolean (False when absent)."""
    value = table_.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: {where}{key} must be true or false")
    return value
