"""Packed (BSGS) vs naive encrypted scoring and the k * t_mul / S floor - the packing section alone.

    .venv/bin/python benchmarks/bench_packing.py --out benchmarks/results/packing.json [--quick]

Same as ``tip-fed bench --sections packing``; the measurement lives in
:mod:`tip_fed.bench.packing` (definitions there and in benchmarks/README.md).
"""

from __future__ import annotations

import argparse

from tip_fed.bench import run_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="one block instead of four, fewer repetitions")
    args = ap.parse_args()
    run_bench(quick=args.quick, out=args.out, sections=["packing"])


if __name__ == "__main__":
    main()
