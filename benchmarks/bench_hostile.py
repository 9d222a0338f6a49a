"""Hostile Offers against a real ``tip-fed seller serve``: peak seller RSS under each, and an honest
buyer's latency with and without a concurrent attack.

    .venv/bin/python benchmarks/bench_hostile.py --out benchmarks/results/hostile-small.json --quick

One seller process (mutual TLS, default resource budget) on 127.0.0.1; the measurement lives in
:mod:`tip_fed.bench.hostile` (definitions in its docstring and in benchmarks/README.md).
"""

from __future__ import annotations

import time

from tip_fed.bench.common import bench_args, machine, versions, write_result
from tip_fed.bench.hostile import run


def main() -> None:
    args = bench_args(__doc__, "60 records, 3 honest rounds (a smoke run)")
    t0 = time.perf_counter()
    result = {"quick": args.quick, "machine": machine(), "versions": versions(), "hostile": run(args.quick)}
    result["seconds"] = time.perf_counter() - t0
    write_result(result, args.out, "hostile")


if __name__ == "__main__":
    main()
