"""``tip-fed bench``: the benchmark suite behind benchmarks/README.md, one JSON per run.

Sections (each a module here, each measured side by side within this one run so machine load
affects both sides of every ratio alike):

- ``packing``: packed CKKS scoring vs its floor ``k * t_mul / S`` and vs one score per ciphertext;
- ``gradients``: hook-based projected gradients vs explicit per-sample full gradients;
- ``seller``: share of a seller's wall time spent on encryption work (GPT-2-style model);
- ``scale``: ``tip-fed simulate`` with many sellers under Flower's simulation runtime.

``quick`` shrinks every size so the whole run takes under two minutes (a smoke test, not for
citing); the full run is what benchmarks/results/*.json hold. Keys are flattened into the
``summary`` block (``packing.us_per_score`` ...) so tools can read the headline numbers directly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tip_fed.errors import ConfigError

from .common import machine, versions, write_result

__all__ = ["SECTIONS", "SUMMARY_KEYS", "merge_results", "run_bench"]

SECTIONS = ("packing", "gradients", "seller", "scale")
#: The headline keys the issue asks for, "section.key".
SUMMARY_KEYS = (
    "packing.us_per_score",
    "packing.us_per_score_cold",
    "packing.bound_us_per_score",
    "packing.ratio_to_bound",
    "packing.speedup_vs_naive",
    "gradients.speedup_vs_full",
    "gradients.memory_ratio",
    "seller.he_share",
    "scale.sellers",
    "scale.seconds",
    "scale.peak_rss_mb",
)


def _section(name: str, quick: bool) -> dict[str, Any]:
    run: Callable[[bool], dict[str, Any]]
    if name == "packing":
        from .packing import run
    elif name == "gradients":
        from .gradients import run
    elif name == "seller":
        from .seller import run
    else:
        from .scale import run
    return run(quick)


def run_bench(quick: bool, out: Path | str, sections: Sequence[str] = SECTIONS) -> dict[str, Any]:
    """Run the chosen sections and write ``out`` (JSON); returns what was written."""
    out = Path(out)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ConfigError(f"unknown benchmark section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    result: dict[str, Any] = {"mode": "quick" if quick else "full", "machine": machine(), "versions": versions()}
    started = time.perf_counter()
    for name in sections:
        t0 = time.perf_counter()
        result[name] = _section(name, quick)
        result[name]["section_seconds"] = time.perf_counter() - t0
        print(f"tip-fed bench: {name} done in {result[name]['section_seconds']:.1f} s", flush=True)
    result["total_seconds"] = time.perf_counter() - started
    result["machine"]["load_avg_1m_end"] = machine()["load_avg_1m"]
    return _write(result, out)


def _write(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """Add the ``summary`` block (headline keys, None when not finite), write and print it."""
    summary = {}
    for key in SUMMARY_KEYS:
        section, field = key.split(".")
        if section in result:
            value = result[section][field]
            summary[key] = value if isinstance(value, (int, float)) and math.isfinite(value) else None
    result["summary"] = summary
    write_result(result, out)
    for key, value in summary.items():
        print(f"  {key} = {value:.4g}" if isinstance(value, float) else f"  {key} = {value}")
    print(f"wrote {out}")
    return result


def merge_results(paths: Sequence[Path | str], out: Path | str) -> dict[str, Any]:
    """One JSON from runs of different sections (later files win); each section keeps the
    machine description and mode of the run that measured it under ``runs``."""
    merged: dict[str, Any] = {"runs": {}}
    for path in paths:
        data = json.loads(Path(path).read_text())
        merged.setdefault("mode", data["mode"])
        if data["mode"] != merged["mode"]:
            raise ConfigError(f"cannot merge a {data['mode']} run into {merged['mode']} runs: {path}")
        merged["machine"], merged["versions"] = data["machine"], data["versions"]
        for name in SECTIONS:
            if name in data:
                merged[name] = data[name]
                merged["runs"][name] = {"file": Path(path).name, "machine": data["machine"]}
    return _write(merged, Path(out))
