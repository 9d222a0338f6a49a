"""``tip-fed buyer prepare`` and ``tip-fed value``: the buyer's own model against real sellers.

Both read and check their TOML files (and the output directory) before torch, TenSEAL or grpcio
load, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tip_fed.errors import ConfigError


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``buyer prepare`` and ``value`` subcommands."""
    buyer = sub.add_parser("buyer", help="the buyer's side: fit and save its private query")
    cmds = buyer.add_subparsers(dest="buyer_command", required=True)
    prep = cmds.add_parser("prepare", help="fit the query of buyer.toml once (gradients, preconditioner) and save it "
                           "to an owner-only directory for 'tip-fed value --prepared'")
    prep.add_argument("config", help="buyer.toml: [model], [data] and the protocol settings")
    prep.add_argument("--out", required=True, help="directory for the prepared query (created 0700, files 0600)")
    prep.add_argument("--force", action="store_true", help="replace a prepared query already in --out")
    prep.add_argument("--quiet", action="store_true", help="no progress on stderr")

    val = sub.add_parser("value", help="value the sellers of sellers.toml for the buyer of buyer.toml and write "
                         "valuations, payouts, report.md and manifest.json")
    val.add_argument("config", help="buyer.toml: [model], [data], protocol settings and [payouts]")
    val.add_argument("--sellers", required=True,
                     help="sellers.toml: runtime (grpc, inprocess, flower-simulation, flower-deployment), [[sellers]], "
                     "[tls], [grpc], [flower], [superlink]")
    val.add_argument("--out", required=True, help="results directory")
    val.add_argument("--prepared", help="a query saved by 'tip-fed buyer prepare' (default: fit it now, in memory)")
    val.add_argument("--force", action="store_true",
                     help="write into a non-empty --out directory (its old result files are replaced)")
    val.add_argument("--quiet", action="store_true", help="no progress on stderr")


def check_out_dir(out: Path, force: bool, what: str = "results of two runs would mix") -> None:
    """ConfigError if ``out`` is a file, or a non-empty directory without ``force``."""
    if out.is_file():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is not empty: {what}; choose another --out, "
                          "empty it, or pass --force to replace its files")
    if out.is_dir():  # a run killed mid-write leaves its hidden temporary files (never a half-written result)
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> None:
    """Run ``buyer prepare`` or ``value``; every failure is a TipError."""
    from tip_fed.buyer_config import check_buyer_task, load_buyer_config
    from tip_fed.console import quiet_third_party, run_progress, step, waiting
    from tip_fed.sellers_config import load_sellers_config

    out = Path(args.out)
    progress = not args.quiet
    quiet_third_party()
    if args.command == "buyer":
        check_out_dir(out, args.force, "it would mix with another prepared query")
        cfg = load_buyer_config(args.config, check_task=False)  # every mistake but the task before loading
        with waiting("loading torch and TenSEAL", enabled=progress):
            check_buyer_task(cfg)
            from tip_fed.buyer_config import prepare_from_config

        with run_progress("tip-fed", 2, enabled=progress):
            step("the buyer's query")
            prepared = prepare_from_config(cfg, progress=progress)
            step(f"saving it to {out}")
            prepared.save(out)
        print(f"prepared the {prepared.task} query of {cfg.source.name}: projection dimension {prepared.spec.dim}, "
              f"{prepared.preconditioner.kind} preconditioner, model {prepared.model_fingerprint[:12]}…")
        from tip_fed.market.glossary import describe_fidelity

        print(describe_fidelity([prepared.fidelity]))
        print(f"saved to {out}/ (owner-only; it is your private objective)\n"
              f"  tip-fed value {args.config} --sellers sellers.toml --out results/ --prepared {out}")
        return
    load_sellers_config(args.sellers)
    if args.prepared and not Path(args.prepared).is_dir():
        raise ConfigError(f"--prepared {args.prepared} is not a directory; make one with "
                          f"'tip-fed buyer prepare {args.config} --out DIR'")
    check_out_dir(out, args.force)
    cfg = load_buyer_config(args.config, check_task=False)
    with waiting("loading torch and TenSEAL", enabled=progress):
        check_buyer_task(cfg)  # last: it loads torch
        from tip_fed.market.summary import summary_lines
        from tip_fed.workflow import value_files

    with run_progress("tip-fed", 3, enabled=progress):
        result = value_files(args.config, args.sellers, out, prepared_dir=args.prepared, progress=progress)
    lines = summary_lines(result.metrics, str(out))
    ranked = sorted(result.valuation.sellers, key=lambda v: v.total, reverse=True)
    scores = ["score       " + ", ".join(f"{v.seller_id} {v.total:.4g}" for v in ranked[:5])
              + (f" (+{len(ranked) - 5} more)" if len(ranked) > 5 else "")]
    note = [f"query       recomputed for the changed data.objective with the preconditioner saved in {args.prepared}"
            ] if result.requeried else []
    rejected = [f"rejected    {sid}: {reason[:120]}" for sid, reason in result.valuation.rejected.items()][:3]
    print("\n".join([*lines[:1], *note, *scores, *_offers_line(result.metrics), *rejected, *lines[1:]][:15]))


def _offers_line(metrics: dict[str, object]) -> list[str]:
    """How many sellers were sent the model's weights (the others held it: Offer by reference)."""
    run = metrics.get("run")
    if not isinstance(run, dict) or run.get("sellers_sent_weights") is None:
        return []
    line = (f"offers      weights sent to {run['sellers_sent_weights']} of {run.get('sellers_offered')} sellers "
            f"(the others hold the model), {int(run.get('offer_bytes') or 0) / 1e6:.3g} MB of Offers in all")
    return [line]
