"""A seller's raw records as it holds them: tables (CSV, Parquet) and text (JSONL, plain text).

:func:`load_seller_data` reads a seller's data file by its extension:

- ``.safetensors``: a dict-of-tensors dataset already in the buyer's input format (a ``Batch``);
- ``.csv``: a header row, then one record per row (values stay text until a format reads them);
- ``.parquet``: one record per row, column types as stored;
- ``.jsonl``: one JSON object per line (blank lines are skipped);
- ``.txt``: one record per non-empty line, ``{"text": line}`` (as Hugging Face ``datasets``' text
  loader does); put multi-line documents in a JSONL file instead.

Raw records are turned into tensors only by the buyer's input format carried in each Offer
(:mod:`tip_fed.protocol.formats`). A buyer's format may name any field the records have, so a
seller sells only the fields it lists (``fields=``, ``tip-fed seller serve --fields``): the others
are dropped at loading, before anything else sees them. Without a list every field is offered.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tip_fed.errors import DataError

__all__ = ["RECORD_SUFFIXES", "RawRecords", "load_seller_data", "read_records"]

RECORD_SUFFIXES = (".csv", ".parquet", ".jsonl", ".txt")
_FIX = "; fix the file or export it again"


@dataclass(frozen=True)
class RawRecords:
    """Records as dicts of field values, in file order; ``source`` names them in error messages."""

    rows: tuple[Mapping[str, Any], ...]
    source: str = "the records"

    def __post_init__(self) -> None:
        if not self.rows:
            raise DataError(f"{self.source} holds no records; a seller needs at least one")

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], source: str = "the records") -> RawRecords:
        """Records from any sequence of dicts (e.g. ``DataFrame.to_dict("records")``)."""
        return cls(tuple(dict(r) for r in rows), source)

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def fields(self) -> frozenset[str]:
        """Fields every record has: the schema (a table's header), not any record's values."""
        common = set(self.rows[0])
        for row in self.rows[1:]:
            common.intersection_update(row)
        return frozenset(common)

    def select(self, fields: Sequence[str]) -> RawRecords:
        """Only ``fields`` of every record (what a seller sells); DataError naming a field not in every record."""
        wanted = list(dict.fromkeys(f.strip() for f in fields if f.strip()))
        if not wanted:
            raise DataError(f"the list of fields to offer from {self.source} is empty; name at least one field")
        absent = [f for f in wanted if f not in self.fields]
        if absent:
            raise DataError(f"{self.source} has no field {absent[0]!r} in every record (it has "
                            f"{sorted(self.fields)}); fix the list of fields to offer")
        return RawRecords(tuple({f: row[f] for f in wanted} for row in self.rows), self.source)

    def column(self, name: str, what: str = "field") -> list[Any]:
        """Every record's value of ``name``; DataError naming the fields there are if one lacks it."""
        try:
            return [row[name] for row in self.rows]
        except KeyError:
            have = sorted({k for row in self.rows[:100] for k in row})
            shown = ", ".join(repr(k) for k in have[:20]) + (", ..." if len(have) > 20 else "")
            raise DataError(
                f"{self.source} has no {what} column {name!r} (it has {shown}); the buyer's input format reads "
                f"{name!r}: rename the column or ask the buyer which column it means"
            ) from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path} is empty: a CSV needs a header row and at least one record")
        if len(set(header)) != len(header):
            raise DataError(f"{path} has duplicate column names in its header{_FIX}")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}, line {reader.line_num}: {len(row)} values for {len(header)} columns{_FIX}")
            rows.append(dict(zip(header, row, strict=True)))
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file: {str(exc)[:200]}{_FIX}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: malformed JSON ({exc.msg} at column {exc.colno}){_FIX}") \
                    from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object; "
                                "write one object per line, e.g. {\"text\": \"...\"}")
            rows.append(row)
    return rows


def _read_txt(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        return [{"text": line.rstrip("\r\n")} for line in f if line.strip()]


_READERS = {".csv": _read_csv, ".parquet": _read_parquet, ".jsonl": _read_jsonl, ".txt": _read_txt}


def read_records(path: str | Path, fields: Sequence[str] | None = None) -> RawRecords:
    """Raw records of a ``.csv``, ``.parquet``, ``.jsonl`` or ``.txt`` file (UTF-8 text); with
    ``fields``, only those fields of each record (see :meth:`RawRecords.select`)."""
    p = Path(path)
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"{p} has extension {p.suffix!r}; seller data must be one of "
                        f"{', '.join(('.safetensors', *RECORD_SUFFIXES))}")
    if not p.is_file():
        raise DataError(f"seller data file {p} does not exist")
    try:
        rows = reader(p)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{p} is not a valid CSV file: {exc}{_FIX}") from None
    if not rows:
        raise DataError(f"{p} holds no records; a seller needs at least one")
    records = RawRecords(tuple(rows), p.name)  # the name only: messages about them may reach a buyer
    return records if fields is None else records.select(fields)


def load_seller_data(path: str | Path, fields: Sequence[str] | None = None
                     ) -> Mapping[str, torch.Tensor] | RawRecords:
    """A seller's data file: tensors (``.safetensors``) or raw records restricted to ``fields`` (all
    of them when None; see the module docstring)."""
    from tip_fed.protocol.data import load_dataset

    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        if fields is not None:
            raise DataError(f"{p} holds tensors already in one input format; a list of fields to offer applies "
                            "only to raw records (.csv, .parquet, .jsonl, .txt): drop it")
        return load_dataset(p)
    return read_records(p, fields)
