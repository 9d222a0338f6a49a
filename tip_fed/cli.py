"""The ``tip-fed`` command: run simulations and re-render reports.

Every user-facing failure is a TipError, printed as one line (no traceback) with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tip_fed import __version__
from tip_fed.errors import TipError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tip-fed", description="Secure federated data valuation (TIP) under CKKS.")
    p.add_argument("--version", action="version", version=f"tip-fed {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a market scenario end to end and write its results directory")
    sim.add_argument("config", help="TOML config, e.g. configs/causal.toml")
    sim.add_argument("--out", default="out", help="results directory (default: out)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set seed=3 --set projection.rank=16 (repeatable)")
    sim.add_argument("--quiet", action="store_true", help="no progress bars")

    exp = sub.add_parser("export-sellers", help="write each seller's data of a scenario to DIR/<seller_id>.safetensors")
    exp.add_argument("config", help="TOML config, e.g. configs/causal.toml")
    exp.add_argument("--out", required=True, help="directory for the seller data files")
    exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    rep = sub.add_parser("report", help="re-render report.md and plots from a results directory")
    rep.add_argument("dir", help="results directory written by 'tip-fed simulate'")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tip-fed`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "simulate":
            from simulations.runner import run_scenario
            from tip_fed.config import load_config

            config = load_config(args.config, args.overrides)
            result = run_scenario(config, args.out, progress=not args.quiet)
            if not args.quiet:
                print(json.dumps(result.metrics, indent=2, default=str))
            print(f"results written to {result.out_dir}/ (report: {result.out_dir}/report.md)")
        elif args.command == "export-sellers":
            from simulations.runner import export_sellers
            from tip_fed.config import load_config

            for path in export_sellers(load_config(args.config, args.overrides), args.out):
                print(path)
        elif args.command == "report":
            from tip_fed.market.report import render_report

            print(f"wrote {render_report(args.dir)}")
    except TipError as exc:
        print(f"tip-fed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tip-fed: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
