"""Hostile Offers against a real ``tip-fed seller serve``: peak seller RSS under each, and an honest
buyer's latency with and without a concurrent attack.

    .venv/bin/python benchmarks/bench_hostile.py --out benchmarks/results/hostile-small.json --quick

One seller process (mutual TLS, default resource budget) on 127.0.0.1; the measurement lives in
:mod:`tip_fed.bench.hostile` (definitions in its docstring and in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tip_fed.bench.common import machine, versions
from tip_fed.bench.hostile import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="60 records, 3 honest rounds (a smoke run)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = {"quick": args.quick, "machine": machine(), "versions": versions(), "hostile": run(args.quick)}
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["hostile"], indent=2))


if __name__ == "__main__":
    main()
