"""The results directory of a run of N valuation sessions (one for a single market): one format, one reader.

Every run writes the same files, whatever produced it (``tip-fed simulate`` of any scenario, with
one market or many replicate markets, or ``tip-fed value``); each row names its ``session``:

- ``manifest.json``: run-level settings and versions, and ``sessions[i]`` (session id, seeds,
  projection, CKKS parameters, seller ids) so any payout can be re-derived;
- ``valuations.csv``: one row per session and seller (decrypted score, plaintext reference where
  a simulation knows it, baseline scores where computed);
- ``samples.csv``: per-sample scores (per-sample disclosure only);
- ``ground_truth.csv``: realised benefit per session and seller (simulation only);
- ``payouts.csv``: every payout rule's payout and share per session and seller;
- ``sessions.csv``: per-session signed correlations with realised benefit (with ground truth);
- ``metrics.json``: pooled metrics plus ``sessions[i]`` per-session metrics.

``report.md`` and its plots are rendered from these files alone by :mod:`tip_fed.market.report`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tip_fed import __version__
from tip_fed.errors import DataError
from tip_fed.files import write_private

if TYPE_CHECKING:
    from tip_fed.protocol import Valuation

#: The baseline methods a run reports beside TIP, by name (computed by :mod:`tip_fed.market.baselines`;
#: named here so that reading and rendering results loads no torch).
BASELINES = ("gradient_cosine", "data_cosine", "random", "data_size")
METHODS = ("tip", *BASELINES)
VALUATION_COLUMNS = ("session", "seller_id", "n_samples", "score", "score_plaintext", "mean_score", "rank",
                     "clipped", "commitment", "seconds", *BASELINES)
SAMPLE_COLUMNS = ("session", "seller_id", "sample_index", "score", "score_plaintext")
GROUND_TRUTH_COLUMNS = ("session", "seller_id", "loss_before", "loss_after", "benefit")
PAYOUT_COLUMNS = ("session", "seller_id", "rule", "payout", "share")
SESSION_COLUMNS = ("session", "n_sellers", *(f"{m}_{c}" for m in METHODS for c in ("spearman", "pearson")),
                   "tip_top1", "gradient_cosine_top1", "tip_topk", "gradient_cosine_topk")
FILES = {"valuations.csv": VALUATION_COLUMNS, "samples.csv": SAMPLE_COLUMNS, "ground_truth.csv": GROUND_TRUTH_COLUMNS,
         "payouts.csv": PAYOUT_COLUMNS, "sessions.csv": SESSION_COLUMNS}


@dataclass
class Session:
    """What one settled valuation session contributes to a run's files (rows without the session column)."""

    valuations: list[dict[str, Any]]
    manifest: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    ground_truth: list[dict[str, Any]] = field(default_factory=list)
    payouts: list[dict[str, Any]] = field(default_factory=list)


def session_rows(valuation: Valuation, plain: Mapping[str, np.ndarray] | None = None,
                 baselines: Mapping[str, Mapping[str, float]] | None = None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``valuations.csv`` and ``samples.csv`` rows of one settled session, ranked by decrypted score.

    ``plain`` (seller id -> per-sample plaintext scores) exists only in simulation, where both sides are
    known; ``baselines`` (method -> seller id -> score) where a scenario computed them.
    """
    ranked = sorted(valuation.sellers, key=lambda v: v.total, reverse=True)
    rank = {v.seller_id: i + 1 for i, v in enumerate(ranked)}
    rows = [{"seller_id": v.seller_id, "n_samples": v.n_samples, "score": v.total,
             "score_plaintext": float(plain[v.seller_id].sum()) if plain else None, "mean_score": v.mean,
             "rank": rank[v.seller_id], "clipped": v.clipped, "commitment": v.commitment,
             "seconds": v.timings.get("total_s"),
             **{m: (baselines or {}).get(m, {}).get(v.seller_id) for m in BASELINES}}
            for v in valuation.sellers]
    samples = [{"seller_id": v.seller_id, "sample_index": i, "score": float(s),
                "score_plaintext": float(plain[v.seller_id][i]) if plain else None}
               for v in valuation.sellers if v.per_sample is not None for i, s in enumerate(v.per_sample)]
    return rows, samples


def write_run_files(out: Path, manifest: Mapping[str, Any], sessions: Sequence[Session],
                  metrics: Mapping[str, Any], per_session: Sequence[Mapping[str, Any]] = ()) -> None:
    """Write every results file of a run of ``sessions`` (``per_session``: ``sessions.csv`` rows)."""
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in FILES}
    for i, s in enumerate(sessions):
        for name, rows in (("valuations.csv", s.valuations), ("samples.csv", s.samples),
                           ("ground_truth.csv", s.ground_truth), ("payouts.csv", s.payouts)):
            tables[name] += [{**r, "session": i} for r in rows]
    tables["sessions.csv"] = [dict(r) for r in per_session]
    for name, rows in tables.items():
        if rows or name in ("valuations.csv", "payouts.csv"):
            write_csv(out / name, FILES[name], rows)
    write_json(out / "manifest.json", {**manifest, "sessions": [{"session": i, **s.manifest}
                                                                 for i, s in enumerate(sessions)]})
    write_json(out / "metrics.json", {**metrics, "sessions": [{"session": i, **s.metrics}
                                                              for i, s in enumerate(sessions)]})


@dataclass
class RunResults:
    """A results directory as read back: the JSON files and every CSV's rows (strings, as saved)."""

    out: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    tables: dict[str, list[dict[str, str]]]

    @property
    def n_sessions(self) -> int:
        return len(self.manifest.get("sessions", [])) or 1

    def rows(self, name: str, session: int | None = None) -> list[dict[str, str]]:
        """Rows of a CSV (empty when the run did not write it), optionally of one session."""
        rows = self.tables.get(name, [])
        return rows if session is None else [r for r in rows if r.get("session", "0") == str(session)]

    def benefit(self) -> dict[tuple[str, str], float]:
        """(session, seller id) -> realised benefit, for the sellers whose ground truth was measured."""
        return {(r["session"], r["seller_id"]): float(r["benefit"]) for r in self.rows("ground_truth.csv")
                if r.get("benefit") not in ("", None)}


def read_results(out_dir: str | Path) -> RunResults:
    """Read a results directory; DataError when it is not one (or was written by an older format)."""
    out = Path(out_dir)
    manifest, metrics = read_json(out / "manifest.json"), read_json(out / "metrics.json")
    if "sessions" not in manifest:
        raise DataError(f"{out}/manifest.json has no `sessions`: it was written by an older tip-fed; rerun to "
                        "get the current results format")
    tables = {name: read_csv(out / name) for name in FILES if (out / name).is_file()}
    return RunResults(out, manifest, metrics, tables)


def versions() -> dict[str, str]:
    """Versions of what computed the results, for the manifest."""
    out = {"tip_fed": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("torch", "tenseal", "numpy", "grpcio", "flwr"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "?"
    return out


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
