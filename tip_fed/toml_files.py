"""Reading the user's TOML files (buyer.toml, sellers.toml): one error shape for every mistake.

Each helper raises a :class:`~tip_fed.errors.ConfigError` that names the file, the key and the
fix; paths in a file are relative to that file. Nothing here imports torch, TenSEAL or grpcio.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tip_fed.errors import ConfigError


def read_toml(path: str | Path, what: str, example: str) -> tuple[Path, dict[str, Any]]:
    """The resolved path and parsed contents of a TOML file; ConfigError if absent or invalid."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file '{p}' does not exist; write one (see {example})")
    try:
        return p.resolve(), tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file '{p}' is not valid TOML: {exc}") from None


def check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str, name: str) -> None:
    """ConfigError naming the first key of ``table`` not in ``allowed`` (``where``: its dotted prefix)."""
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown key '{where}{unknown[0]}'; valid keys here: "
                          + ", ".join(f"{where}{k}" for k in allowed))


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
