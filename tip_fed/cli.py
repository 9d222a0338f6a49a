"""The ``tip-fed`` command: value sellers for your own model, run simulations, re-render reports.

Every user-facing failure is a TipError, printed as one line (no traceback) with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tip_fed import __version__, cli_value
from tip_fed.config import SellerBudgetConfig, SellerConfig
from tip_fed.errors import TipError

EXPORT_LISTED = 12  # export-sellers lists at most this many files, then counts the rest


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
    sim.add_argument("--force", action="store_true",
                     help="write into a non-empty --out directory (its old result files are replaced)")

    exp = sub.add_parser("export-sellers", help="write each seller's data of a scenario to DIR/<seller_id>.safetensors")
    exp.add_argument("config", help="TOML config, e.g. configs/causal.toml")
    exp.add_argument("--out", required=True, help="directory for the seller data files")
    exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    exp.add_argument("--replicate", type=int, default=0,
                     help="which market of a replicated scenario (default 0); pass the same to the app's run config")
    exp.add_argument("--force", action="store_true",
                     help="write into a non-empty --out directory (files of the same seller ids are replaced)")
    exp.add_argument("--quiet", action="store_true", help="no progress on stderr")

    rep = sub.add_parser("report", help="re-render report.md and plots from a results directory")
    rep.add_argument("dir", help="results directory written by 'tip-fed simulate'")

    cmp = sub.add_parser("compare", help="put two runs' payouts side by side (markdown on stdout)")
    cmp.add_argument("dirs", nargs=2, metavar="DIR", help="two results directories written by 'tip-fed simulate'")
    cmp.add_argument("--out", help="also write the comparison to this markdown file")

    bench = sub.add_parser("bench", help="measure packing, gradients, seller HE share and scale; write one JSON")
    bench.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes); not for citing")
    bench.add_argument("--out", required=True, help="JSON file to write, e.g. benchmarks/results/cpu2-full.json")
    bench.add_argument("--sections", default="packing,gradients,seller,scale",
                       help="comma-separated subset of packing,gradients,seller,scale (default: all)")
    sts = sub.add_parser("settings", help="list every setting: its key, type, default and meaning")
    sts.add_argument("--markdown", action="store_true", help="as the markdown tables of docs/settings.md")
    _add_grpc_parsers(sub)
    cli_value.add_parsers(sub)
    _add_audit_parser(sub)
    _add_deploy_parser(sub)
    return p


def _add_deploy_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tip-fed deploy up|down``: a local Flower deployment (SuperLink + seller SuperNodes, TLS, node auth)."""
    dep = sub.add_parser("deploy", help="start or stop a local Flower deployment on 127.0.0.1")
    cmds = dep.add_subparsers(dest="deploy_command", required=True)
    dup = cmds.add_parser(
        "up", help="CA, certificates, node keys; SuperLink with TLS + node auth; one SuperNode per seller"
    )
    dup.add_argument("dir", help="deployment directory (certificates, keys, logs, deployment.json)")
    dup.add_argument(
        "--sellers", required=True, help="directory of seller .safetensors files ('tip-fed export-sellers')"
    )
    dup.add_argument("--port", type=int, default=0, help="SuperLink port on 127.0.0.1 (default: a free one)")
    ddn = cmds.add_parser("down", help="stop exactly the processes 'deploy up' started (by PID)")
    ddn.add_argument("dir", help="deployment directory given to 'deploy up'")
    dsg = cmds.add_parser("sign", help="sign the FAB 'flwr run APP' builds; write DIR/run-config.toml for 'flwr run'")
    dsg.add_argument("dir", help="deployment directory (its deployment.json gives the key and the node ids)")
    dsg.add_argument("--app", default=".", help="Flower App directory to sign (default: .)")
    dsg.add_argument("--out", help="where the buyer writes valuation.json (default: DIR/result)")
    dsg.add_argument("--key", help="publisher private key (default: the one 'deploy up' made, DIR/keys/publisher)")
    dsg.add_argument(
        "--sellers", help="SELLER_ID=NODE_ID,... of the registered SuperNode keys (default: from deployment.json)"
    )
    dsg.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="scenario override for the buyer, as for 'tip-fed simulate --set' (repeatable)",
    )
    dkg = cmds.add_parser("keygen", help="Ed25519 publisher key; sellers trust its .trusted.yaml")
    dkg.add_argument("dir", help="directory for publisher, publisher.pub, publisher.trusted.yaml")
    dgd = cmds.add_parser(
        "guard", help="write DIR/flwr-clientapp: put DIR first on a SuperNode's PATH so it runs only signed apps"
    )
    dgd.add_argument("dir", help="directory for the flwr-clientapp guard")
    dgd.add_argument(
        "--max-signature-age",
        type=float,
        default=None,
        metavar="SECONDS",
        help="refuse app signatures older than this (default 3600: sign right before each 'flwr run')",
    )


def _deploy(args: argparse.Namespace) -> None:
    from tip_fed.flower import trust
    from tip_fed.runtimes import deployment as flower_deploy

    if args.deploy_command == "down":
        pids = flower_deploy.down(Path(args.dir))
        print(f"stopped {len(pids)} processes (and their children): {' '.join(map(str, pids))}")
        return
    if args.deploy_command == "sign":
        root = Path(args.dir)
        path = flower_deploy.sign(
            root,
            Path(args.app),
            Path(args.out or root / "result"),
            Path(args.key) if args.key else None,
            args.sellers,
            args.overrides,
        )
        print(
            f"signed the Flower App in {Path(args.app).resolve()}; run config: {path}\n"
            f"  flwr run {args.app} <connection> --stream --run-config {path}\n"
            "(sign again after any change to the app: sellers refuse a FAB that differs from the signed one)"
        )
        return
    if args.deploy_command == "keygen":
        private, public, trusted = trust.create_publisher_key(Path(args.dir))
        print(
            f"publisher key {private} (keep private); give sellers {trusted} "
            f"(--node-config '{trust.PUBLISHERS}=\"/path/{trusted.name}\"'); public key {public}"
        )
        return
    if args.deploy_command == "guard":
        max_age = trust.MAX_AGE_S if args.max_signature_age is None else args.max_signature_age
        guard = trust.install_guard(Path(args.dir), max_age).resolve()
        print(
            f"wrote {guard}/flwr-clientapp and flwr-serverapp; start the SuperNode with PATH={guard}:$PATH and "
            f"--node-config '... {trust.PUBLISHERS}=\"/path/publisher.trusted.yaml\"'"
        )
        return
    d = flower_deploy.up(Path(args.dir), Path(args.sellers), args.port)
    print(
        f"SuperLink https://127.0.0.1:{d.port} (TLS, SuperNode auth); SuperNodes: "
        + ", ".join(f"{name} (node {node})" for name, node in d.nodes.items())
    )
    print(f"state and PIDs: {d.root / flower_deploy.STATE_FILE}; logs: {d.root / 'logs'}")
    print(
        f"sellers run only apps signed by {d.publisher} (trusted: {d.trusted})\n"
        "run a valuation (sign the app, then run it with the signed run config):\n"
        f"  tip-fed deploy sign {d.root} --app .\n"
        f"  FLWR_HOME={d.home} flwr run . {flower_deploy.CONNECTION} --stream "
        f"--run-config {d.root / flower_deploy.RUN_CONFIG_FILE}\n"
        f"stop it: tip-fed deploy down {d.root}"
    )


def _add_audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tip-fed audit``: check purchased deliveries against commitments and decrypted scores."""
    aud = sub.add_parser("audit", help="verify delivered seller data against its commitment and recompute its scores")
    aud.add_argument("record", help="session record saved by the buyer (Buyer.record(valuation).save(path))")
    aud.add_argument(
        "--delivery",
        action="append",
        default=[],
        required=True,
        metavar="SELLER_ID=PATH",
        help="a seller's delivery (.safetensors records, optionally with its committed gradients); repeatable",
    )
    aud.add_argument("--out", default=".", help="directory for audit.json and audit.md (default: .)")


def _audit(args: argparse.Namespace) -> int:
    """Exit code 0 when every delivery passes, 1 when any seller is flagged."""
    from tip_fed.errors import ConfigError
    from tip_fed.protocol.audit import Delivery, SessionRecord, audit

    deliveries = {}
    for item in args.delivery:
        sid, sep, path = item.partition("=")
        if not sep or not sid or not path:
            raise ConfigError(f"--delivery {item!r} must look like SELLER_ID=PATH, e.g. s1=deliveries/s1.safetensors")
        if sid in deliveries:
            raise ConfigError(f"--delivery names seller {sid!r} twice")
        deliveries[sid] = Delivery.load(path)
    report = audit(SessionRecord.load(args.record), deliveries)
    js, md = report.write(args.out)
    for s in report.sellers:
        print(f"{s.seller_id}: {s.verdict}" + (f" ({'; '.join(s.reasons)})" if s.reasons else ""))
    print(f"wrote {js} and {md}")
    return 0 if report.passed else 1


def _add_grpc_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tip-fed seller serve`` (native gRPC seller service) and ``tip-fed tls init``."""
    seller = sub.add_parser("seller", help="run a seller").add_subparsers(dest="seller_command", required=True)
    srv = seller.add_parser(
        "serve", help="serve one seller's data as a tip.v1.Seller gRPC service (mutual TLS by default)"
    )
    srv.add_argument(
        "--data",
        required=True,
        help="the seller's data: raw records (.csv, .parquet, .jsonl, .txt: one record per "
        "non-empty line) encoded by each buyer's input format, or tensors (.safetensors, see "
        "'tip-fed export-sellers')",
    )
    srv.add_argument(
        "--fields",
        help="comma-separated fields of raw records to sell, e.g. age,bmi,diagnosis; the others are dropped at "
        "loading (default: every field of the file, which a buyer's input format may then read)",
    )
    srv.add_argument("--port", type=int, required=True, help="port to listen on; 0 picks a free one (printed)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    srv.add_argument("--seller-id", help="public seller id (default: the data file's name without extension)")
    srv.add_argument("--tls-cert", help="server certificate (PEM)")
    srv.add_argument("--tls-key", help="server private key (PEM)")
    srv.add_argument(
        "--tls-client-ca",
        help="CA that signed the buyers' client certificates (mutual TLS, required "
        "unless --server-tls-only or --insecure); a buyer makes one with 'tip-fed tls init DIR' (DIR/ca.crt)",
    )
    srv.add_argument(
        "--server-tls-only",
        action="store_true",
        help="TLS without client certificates: any client that trusts the server certificate may call, and the "
        "privacy ledger charges every such buyer, from any address, to one shared anonymous identity",
    )
    srv.add_argument("--insecure", action="store_true", help="serve without TLS (trusted networks and tests only); "
                     "as with --server-tls-only, all buyers share one anonymous identity in the privacy ledger")
    srv.add_argument("--config", help="TOML file whose [seller] and [seller-budget] tables set the flags below "
                     "(a flag given here wins)")
    _add_setting_flags(srv, SellerConfig, "seller")
    _add_setting_flags(srv, SellerBudgetConfig, "seller-budget")

    tls = sub.add_parser("tls", help="TLS material").add_subparsers(dest="tls_command", required=True)
    ini = tls.add_parser("init", help="local CA (reused if DIR/ca.crt exists), a server and a client certificate")
    ini.add_argument("dir", help="directory for ca.crt, <server>.crt/.key and <client>.crt/.key (keys are 0600)")
    ini.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        help="host name or IP the server certificate is valid for (repeatable; default 127.0.0.1, localhost)",
    )
    ini.add_argument("--server-name", default="seller", help="server certificate file name (default seller)")
    ini.add_argument("--client-name", default="buyer", help="client certificate file name (default buyer)")


def _add_setting_flags(parser: argparse.ArgumentParser, cls: type, section: str) -> None:
    """One flag per setting of the config section ``cls``, with its declared default and help."""
    from tip_fed.toml_files import describe

    for f, d in zip(dataclasses.fields(cls), describe(cls, f"{section}."), strict=True):
        allowed = f"{d.allowed}; " if d.allowed else ""
        flag, text = f"--{f.name.replace('_', '-')}", f"{d.help} ({allowed}default {d.default}; config {d.key})"
        if d.type == "bool":
            parser.add_argument(flag, action="store_true", help=text)
        else:
            kind = {"int": int, "float": float}.get(d.type.split(" or ")[0], str)
            parser.add_argument(flag, type=kind, default=None, help=text)


def _section_from_args(cls: type, section: str, args: argparse.Namespace) -> Any:
    """The config section ``cls`` from the flags :func:`_add_setting_flags` made over the same section of
    ``--config`` (unset flags keep those, else the defaults), validated like a config file."""
    from tip_fed.config import load_config
    from tip_fed.errors import ConfigError
    from tip_fed.toml_files import build, toml_key

    base = load_config(args.config).to_dict()[section] if args.config else {}
    given = {toml_key(f.name): getattr(args, f.name) for f in dataclasses.fields(cls)}
    try:
        return build(cls, {**base, **{k: v for k, v in given.items() if v is not None and v is not False}},
                     f"{section}.")
    except ConfigError as exc:  # name the flag, not the config key
        raise ConfigError(str(exc).replace(f"{section}.", "--")) from None


def _seller_serve(args: argparse.Namespace) -> None:
    import logging

    from tip_fed.errors import ConfigError
    from tip_fed.grpc.server import MiB, RunningServer, ServerTLS, serve
    from tip_fed.protocol import Seller, SellerPolicy

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together; give both (or --insecure)")
    if args.tls_client_ca and not args.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS plus client certificates")
    config: SellerConfig = _section_from_args(SellerConfig, "seller", args)
    budget: SellerBudgetConfig = _section_from_args(SellerBudgetConfig, "seller-budget", args)
    tls = (
        ServerTLS(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None)
        if args.tls_cert
        else None
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def announce(running: RunningServer, seller: Seller) -> None:
        print(
            f"tip-fed: seller {seller.seller_id} ({seller.n_samples} samples) ready on {running.address} "
            f"({running.security})",
            flush=True,
        )

    serve(
        args.data,
        seller_id=args.seller_id,
        fields=None if args.fields is None else args.fields.split(","),
        host=args.host,
        port=args.port,
        tls=tls,
        insecure=args.insecure,
        server_tls_only=args.server_tls_only,
        policy=SellerPolicy.from_config(config, budget),
        max_message_bytes=config.max_message_mb * MiB if config.max_message_mb else None,
        announce=announce,
    )


def _tls_init(args: argparse.Namespace) -> None:
    from tip_fed.tls import DEFAULT_HOSTS, CertPaths, create_ca, issue_cert

    out = Path(args.dir)
    ca = CertPaths(out / "ca.crt", out / "ca.key")
    if not (ca.cert.is_file() and ca.key.is_file()):
        ca = create_ca(out)
        print(f"created CA {ca.cert} (keep {ca.key} on the machine that issues certificates only)")
    server = issue_cert(ca, out, args.server_name, tuple(args.hosts) or DEFAULT_HOSTS)
    client = issue_cert(ca, out, args.client_name, client=True)
    print(f"server certificate {server.cert} and key {server.key} for {', '.join(args.hosts or DEFAULT_HOSTS)}")
    print(f"client certificate {client.cert} and key {client.key}")


def _simulate(args: argparse.Namespace) -> None:
    """Check the config and the output directory first (light imports), then run and summarise."""
    from simulations.settings import load_config

    config = load_config(args.config, args.overrides)
    out = Path(args.out)
    cli_value.check_out_dir(out, args.force)
    from tip_fed.console import waiting

    with waiting("loading torch and TenSEAL", enabled=not args.quiet):
        from simulations.runner import run_scenario
        from tip_fed.market.summary import summary_lines

    result = run_scenario(config, out, progress=not args.quiet)
    print("\n".join(summary_lines(result.metrics, str(result.out_dir))))


def _export_sellers(args: argparse.Namespace) -> None:
    """Check the config and --out first, build the market with progress, list what was written."""
    from simulations.settings import load_config

    config = load_config(args.config, args.overrides)
    out = Path(args.out)
    cli_value.check_out_dir(out, args.force, "two markets' sellers would mix (a deployment serves every file there)")
    from tip_fed.console import quiet_third_party, run_progress, step, waiting

    with waiting("loading torch and TenSEAL", enabled=not args.quiet):
        from simulations.scenarios import export_sellers

    quiet_third_party()
    with run_progress("tip-fed", 1, enabled=not args.quiet):
        step(f"building the {config.scenario} market and writing its sellers' files")
        paths = export_sellers(config, out, args.replicate)
    shown = paths if len(paths) <= EXPORT_LISTED else paths[:EXPORT_LISTED - 1]
    print("\n".join(map(str, shown)))
    if len(shown) < len(paths):
        print(f"... and {len(paths) - len(shown)} more: {len(paths)} seller files in {out}/")


SETTINGS_DOC = """# Settings

Every setting tip_fed reads, generated from their declarations (`tip-fed settings --markdown`
writes this file; a test checks it is current). Keys are TOML keys: `[section]` tables of a config
file, `--set section.key=value` on `tip-fed simulate`. buyer.toml takes `seed`, `batch-size`,
`[projection]`, `[preconditioner]`, `[crypto]`, `[protocol]` and `[payouts]`; sellers.toml takes
`runtime`, `[grpc]` and `[flower]`; `tip-fed seller serve` takes `[seller]` and `[seller-budget]`
as flags of the same names (`--max-exact`, `--offer-memory-mb`, ...), and a Flower seller's SuperNode in its
`--node-config` (`max-exact=1`, `seller-budget.offer-memory-mb=512`, `config="seller.toml"`).

## Library

{library}
## Market simulations (`tip-fed simulate`, simulations/settings.py)

{simulations}"""


def settings_text(markdown: bool = False) -> str:
    """Every declared setting: the library's, then what the market simulations add."""
    from simulations.settings import SimulationConfig
    from tip_fed.config import TipConfig
    from tip_fed.toml_files import describe, markdown_table

    library = describe(TipConfig)
    keys = {d.key for d in library}
    scenario = [d for d in describe(SimulationConfig) if d.key not in keys]
    if markdown:
        return SETTINGS_DOC.format(library=markdown_table(library), simulations=markdown_table(scenario))
    return "".join(f"{d.key} = {d.default}  ({d.type}{'; ' + d.allowed if d.allowed else ''})\n    {d.help}\n"
                   for d in [*library, *scenario])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tip-fed`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "simulate":
            _simulate(args)
        elif args.command == "export-sellers":
            _export_sellers(args)
        elif args.command == "report":
            from tip_fed.market.report import render_report

            print(f"wrote {render_report(args.dir)}")
        elif args.command == "compare":
            from tip_fed.market.compare import compare_runs

            text = compare_runs(*args.dirs)
            if args.out:
                from pathlib import Path

                from tip_fed.files import write_private

                write_private(Path(args.out), text)
            print(text, end="")
        elif args.command == "settings":
            print(settings_text(markdown=args.markdown), end="")
        elif args.command == "bench":
            from tip_fed.bench import run_bench

            run_bench(quick=args.quick, out=args.out, sections=args.sections.split(","))
        elif args.command in ("buyer", "value"):
            cli_value.run(args)
        elif args.command == "seller":
            _seller_serve(args)
        elif args.command == "tls":
            _tls_init(args)
        elif args.command == "audit":
            return _audit(args)
        elif args.command == "deploy":
            _deploy(args)
    except TipError as exc:
        print(f"tip-fed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tip-fed: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
