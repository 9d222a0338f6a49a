"""The results directory of a run: CSV and JSON for programs, written atomically.

Files: ``manifest.json``, ``valuations.csv``, ``samples.csv`` (per-sample disclosure),
``ground_truth.csv`` (when computed), ``payouts.csv``, ``metrics.json``. ``report.md`` is rendered from these by
:mod:`tip_fed.market.report`, so a report can always be re-derived from saved results.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tip_fed.errors import DataError
from tip_fed.files import write_private

VALUATION_COLUMNS = (
    "seller_id",
    "n_samples",
    "score",
    "score_plaintext",
    "mean_score",
    "rank",
    "clipped",
    "commitment",
    "seconds",
)
SAMPLE_COLUMNS = ("seller_id", "sample_index", "score", "score_plaintext")
GROUND_TRUTH_COLUMNS = ("seller_id", "loss_before", "loss_after", "benefit")
PAYOUT_COLUMNS = ("seller_id", "rule", "payout", "share")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomically write JSON (NaN/inf become null so any JSON reader accepts it)."""
    write_private(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Atomically write a CSV with a fixed column order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    write_private(path, buf.getvalue())


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else value


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a results CSV; DataError when the file is missing."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; is this a tip-fed results directory?")
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_json(path: Path) -> dict[str, Any]:
    """A results JSON file; DataError when missing or invalid."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; is this a tip-fed results directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object")
    return data


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, the dotted keys metrics are documented with."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
