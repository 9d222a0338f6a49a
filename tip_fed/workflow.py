"""Value a prepared buyer against real sellers and write the results directory.

The library's answer to "I have a model, an objective set and a list of sellers": fit the query
once (:func:`prepare`, or load a saved one), then :func:`value` it against sellers over any
runtime of :mod:`tip_fed.runtimes` (in-process, gRPC endpoints, Flower simulation, Flower
deployment), as often as needed. :func:`value_files` is what ``tip-fed value`` runs: buyer.toml +
sellers.toml in, the same results directory as ``tip-fed simulate`` out (valuations, payouts,
report, manifest), without the parts only a simulation can know (plaintext reference, ground
truth, baselines).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tip_fed.buyer_config import (
    check_prepared,
    load_buyer_config,
    load_data,
    prepare_from_config,
)
from tip_fed.config import GrpcConfig, PayoutsConfig
from tip_fed.console import phase, step
from tip_fed.core.tasks import Task, get_task
from tip_fed.errors import ConfigError, SellerUnavailableError, TipError
from tip_fed.market import payouts
from tip_fed.market.pooling import run_metrics
from tip_fed.market.report import render_report
from tip_fed.market.results import Session, session_rows, versions, write_run_files
from tip_fed.protocol import Buyer, BuyerSettings, PreparedQuery, Seller, Valuation
from tip_fed.protocol.data import Batch, check_batch
from tip_fed.protocol.records import RawRecords
from tip_fed.sellers_config import SellersConfig, load_sellers_config

DEFAULT_MAX_SAMPLES = 10_000
HEALTH_TIMEOUT_S = 5.0

Sellers = SellersConfig | str | Path | Mapping[str, Batch | RawRecords | Seller] | Sequence[Any]


def prepare(
    model: Any,
    task: str | Task,
    objective: Batch | RawRecords,
    train: Batch | RawRecords | None = None,
    settings: BuyerSettings | None = None,
    input_format: Any = None,
) -> PreparedQuery:
    """Fit the buyer's query once; ``.save(dir)`` keeps it (owner-only files) for later :func:`value` calls."""
    return Buyer.prepare(model, get_task(task), objective, train, settings, input_format)


def value(
    buyer: Buyer | PreparedQuery | str | Path,
    sellers: Sellers,
    *,
    runtime: str | None = None,
    tls: Any = None,
    insecure: bool = False,
    grpc: GrpcConfig | None = None,
    max_samples: int | None = None,
    progress: bool = False,
) -> Valuation:
    """One valuation session of ``buyer`` (a Buyer, a PreparedQuery, or a saved query's directory).

    ``sellers``: a ``sellers.toml`` path or :class:`~tip_fed.sellers_config.SellersConfig` (runtime,
    TLS, timeouts and seller files from the file; any of the four runtimes), ``{seller_id: dataset
    | raw records | Seller}`` (in-process), or a list of :class:`tip_fed.grpc.SellerEndpoint` (gRPC;
    ``tls`` a :class:`tip_fed.grpc.ClientTLS` or ``insecure=True``). Sellers that cannot be reached
    or refuse are listed in ``Valuation.missing`` with their reason in
    ``Valuation.manifest["seller_failures"]``; what each was sent is in
    ``Valuation.manifest["transport"]["offers"]`` (gRPC and in-process). With ``progress`` each
    phase and the sellers' answers are reported on stderr (:mod:`tip_fed.console`).
    """
    saved_dir = Path(buyer) if isinstance(buyer, (str, Path)) else None
    if saved_dir is not None:
        buyer = PreparedQuery.load(saved_dir)
    if isinstance(buyer, PreparedQuery):
        buyer = Buyer.from_prepared(buyer)
    if not isinstance(buyer, Buyer):
        raise ConfigError(f"buyer must be a Buyer, a PreparedQuery or a prepared query's directory, got {type(buyer)}")
    if isinstance(sellers, (str, Path)):
        sellers = load_sellers_config(sellers)
    if isinstance(sellers, SellersConfig):
        valuation = _value_config(buyer, sellers, runtime, max_samples, saved_dir, progress)
    elif isinstance(sellers, Mapping):
        _check_runtime(runtime or "inprocess", "a dict of seller datasets", "inprocess")
        valuation = _inprocess(buyer, sellers, max_samples, progress)
    else:
        _check_runtime(runtime or "grpc", "a list of seller endpoints", "grpc")
        if tls is None and not insecure:
            raise ConfigError("valuing gRPC sellers needs tls=ClientTLS(root_ca=...) or insecure=True")
        valuation = _grpc(buyer, list(sellers), tls, grpc or GrpcConfig(), max_samples, progress)
    valuation.manifest["seller_failures"] = dict(valuation.manifest.get("transport", {}).get("failures", {}))
    return valuation


def _check_runtime(runtime: str, given: str, expected: str) -> None:
    if runtime != expected:
        raise ConfigError(f"runtime {runtime!r} does not go with {given}; that is runtime {expected!r} "
                          "(or pass a sellers.toml naming the runtime)")


def _inprocess(buyer: Buyer, sellers: Mapping[str, Batch | RawRecords | Seller], max_samples: int | None,
               progress: bool = False) -> Valuation:
    from tip_fed.runtimes import value_inprocess

    objects = {sid: s if isinstance(s, Seller) else Seller(sid, s) for sid, s in sellers.items()}
    limit = max_samples or max(s.n_samples for s in objects.values())
    phase(f"the Offer to {len(objects)} sellers in this process", enabled=progress)
    return value_inprocess(buyer, objects, limit, tolerate_refusals=True, progress=progress)


def _grpc(buyer: Buyer, endpoints: list[Any], tls: Any, settings: GrpcConfig, max_samples: int | None,
          progress: bool = False) -> Valuation:
    from tip_fed.runtimes import value_grpc

    if not max_samples:
        phase(f"asking {len(endpoints)} sellers how many records they hold", enabled=progress)
    limit = max_samples or _largest_seller(endpoints, tls)
    return value_grpc(buyer, endpoints, tls, settings, limit, insecure=tls is None, progress=progress)


def _count(path: Path) -> int:
    data = load_data(path)
    return len(data) if isinstance(data, RawRecords) else check_batch(data)


def _value_config(buyer: Buyer, cfg: SellersConfig, runtime: str | None, max_samples: int | None,
                  saved_dir: Path | None, progress: bool = False) -> Valuation:
    runtime = runtime or cfg.runtime
    limit = max_samples or cfg.max_samples
    files = cfg.files()
    if runtime in ("inprocess", "flower-simulation") or (runtime == "flower-deployment" and cfg.superlink is None):
        lacking = [s.id for s in cfg.sellers if s.data is None]
        if lacking:
            raise ConfigError(f"runtime {runtime!r} needs data = \"path\" for every seller; missing for {lacking}")
    if runtime == "inprocess":
        phase(f"reading {len(files)} sellers' data", enabled=progress)
        return _inprocess(buyer, {sid: load_data(path) for sid, path in files.items()}, limit, progress)
    if runtime == "grpc":
        return _grpc(buyer, *_grpc_endpoints(cfg), cfg.grpc, limit, progress)
    if runtime == "flower-simulation":
        from tip_fed.runtimes import value_flower_simulation

        valuation = value_flower_simulation(buyer, files, limit or max(_count(p) for p in files.values()),
                                            flower=cfg.flower, progress=progress)
        valuation.manifest.setdefault("transport", {"runtime": runtime, "failures": {}})
        return valuation
    if cfg.superlink is None:  # with [superlink], sellers.toml has max-samples: the files are not here
        limit = limit or max(_count(p) for p in files.values())
    return _flower_deployment(buyer.prepared, cfg, limit or 0, saved_dir, progress)


def _flower_deployment(prepared: PreparedQuery, cfg: SellersConfig, max_samples: int,
                       saved_dir: Path | None, progress: bool = False) -> Valuation:
    """The library's Flower App on a local deployment of the seller files (SuperLink, one SuperNode per
    file, TLS, node authentication, signed app; all stopped at the end) or on the existing
    ``[superlink]``. The ServerApp loads the query from a directory: ``saved_dir``, or a private copy
    deleted with the run."""
    from tip_fed.runtimes import (
        PrivateRun,
        RemoteSuperLink,
        prepared_app,
        value_flower_deployment,
        value_flower_superlink,
    )

    with PrivateRun("tip-value-flower-") as run:
        directory = saved_dir if saved_dir is not None else prepared.save(run.root / "query")
        app = prepared_app(directory, max_samples, cfg.flower)
        link = cfg.superlink
        if link is None:
            valuation = value_flower_deployment(cfg.files(), app, flower=cfg.flower, run=run, progress=progress)
        else:
            remote = RemoteSuperLink(link.address, {s.id: int(s.node_id or 0) for s in cfg.sellers},
                                     link.publisher_key, run.root / "superlink", link.root_certificates, link.insecure)
            valuation = value_flower_superlink(app, remote, flower=cfg.flower, progress=progress)
    valuation.manifest.setdefault("transport", {"runtime": "flower-deployment", "failures": {},
                                                "superlink": link.address if link else "local"})
    return valuation


def _grpc_endpoints(cfg: SellersConfig) -> tuple[list[Any], Any]:
    """The endpoints of a gRPC sellers.toml and the buyer's TLS (None: plaintext)."""
    from tip_fed.grpc import ClientTLS, SellerEndpoint

    endpoints = [SellerEndpoint(s.id, s.endpoint or "", s.ca) for s in cfg.sellers]
    t = cfg.tls
    if t.insecure:
        return endpoints, None
    root = t.ca or next((s.ca for s in cfg.sellers if s.ca), None)  # without [tls] ca, each seller pins its own
    if root is None:
        raise ConfigError("gRPC sellers need [tls] ca = \"ca.crt\" in sellers.toml, or [tls] insecure = true")
    return endpoints, ClientTLS(root, t.cert, t.key, bind_seller_id=t.bind_seller_id)


def _largest_seller(endpoints: Sequence[Any], tls: Any) -> int:
    """The Offer's max-samples from the sellers' Health answers (sellers that do not answer are skipped)."""
    from tip_fed.grpc.client import health

    def size(endpoint: Any) -> int:
        try:
            return int(health(endpoint, tls=tls, insecure=tls is None, timeout_s=HEALTH_TIMEOUT_S).n_samples)
        except TipError:
            return 0

    with futures.ThreadPoolExecutor(max_workers=min(16, max(1, len(endpoints)))) as pool:
        sizes = list(pool.map(size, endpoints))
    return max([*sizes, 0]) or DEFAULT_MAX_SAMPLES


@dataclass
class ValueResult:
    """What ``tip-fed value`` wrote and the headline metrics."""

    out_dir: Path
    metrics: dict[str, Any]
    valuation: Valuation
    requeried: bool = False  # data.objective changed since prepare: the query was recomputed with the saved P


def value_files(buyer_toml: str | Path, sellers_toml: str | Path, out_dir: str | Path, *,
                prepared_dir: str | Path | None = None, progress: bool = False) -> ValueResult:
    """``tip-fed value``: read both configs, prepare (or load and check) the query, value, write results.

    With ``progress`` (inside a :func:`tip_fed.console.run_progress`) each of the three steps and
    their phases are reported on stderr."""
    t0 = time.perf_counter()
    cfg = load_buyer_config(buyer_toml)
    sellers = load_sellers_config(sellers_toml)
    requeried = False
    query: PreparedQuery | Path
    step("the buyer's query", enabled=progress)
    if prepared_dir is not None:
        phase(f"loading the prepared query in {prepared_dir} and checking it against {cfg.source.name}",
              enabled=progress)
        saved = PreparedQuery.load(prepared_dir)
        prepared = check_prepared(cfg, saved, str(prepared_dir))
        requeried = prepared is not saved
        query = prepared if requeried else Path(prepared_dir)
    else:
        prepared = query = prepare_from_config(cfg, progress=progress)
    t1 = time.perf_counter()
    step(f"{len(sellers.sellers)} sellers scoring under encryption ({sellers.runtime})", enabled=progress)
    valuation = value(query, sellers, progress=progress)
    if not valuation.sellers:
        reasons = {**valuation.manifest.get("seller_failures", {}), **valuation.rejected}
        raise SellerUnavailableError("no seller was valued: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    step(f"writing results to {out_dir}", enabled=progress)
    metrics = write_results(out_dir, prepared, valuation, cfg.payouts, runtime=sellers.runtime,
                            seconds=time.perf_counter() - t0, valuation_seconds=time.perf_counter() - t1)
    return ValueResult(Path(out_dir), metrics, valuation, requeried)


def offers_summary(valuation: Valuation) -> dict[str, Any]:
    """Per seller, the Offer bytes sent and whether they carried the model's weights (where the runtime
    knows: gRPC and in-process), plus totals."""
    offers = dict(valuation.manifest.get("transport", {}).get("offers", {}))
    return {"per_seller": offers, "sellers_sent_weights": sum(bool(o.get("weights_shipped")) for o in offers.values()),
            "offer_bytes": sum(int(o.get("offer_bytes", 0)) for o in offers.values())}


def write_results(out_dir: str | Path, buyer: Buyer | PreparedQuery, valuation: Valuation,
                  payouts_config: PayoutsConfig | None = None, *, runtime: str = "", seconds: float | None = None,
                  valuation_seconds: float | None = None) -> dict[str, Any]:
    """The results files (:mod:`tip_fed.market.results`) and report.md of one settled session, a run of one
    session with no plaintext reference or ground truth; returns the metrics."""
    out = Path(out_dir)
    prepared = buyer.prepared if isinstance(buyer, Buyer) else buyer
    payouts_config = payouts_config or PayoutsConfig()
    rows, samples = session_rows(valuation)
    inputs = payouts.PayoutInputs.from_valuation(valuation, max_records=payouts_config.max_records or None)
    pay_rows, comparison, reference = payouts.apply_payout_rules(payouts_config, inputs, seed=prepared.spec.seed)
    n = len(valuation.sellers)
    offers = offers_summary(valuation)
    session_metrics: dict[str, Any] = {
        "run": {"sellers": n, "missing": valuation.missing, "rejected": valuation.rejected,
                "valuation_seconds": valuation_seconds,
                "top_by_score": max(rows, key=lambda r: r["score"])["seller_id"] if rows else None,
                "offer_bytes": offers["offer_bytes"] if offers["per_seller"] else None,
                "sellers_sent_weights": offers["sellers_sent_weights"] if offers["per_seller"] else None,
                "sellers_offered": len(offers["per_seller"])},
        "payouts": {"reference": reference, "rules": comparison},
    }
    session = Session(rows, {"sellers": [*[v.seller_id for v in valuation.sellers], *valuation.missing],
                             "offers": offers["per_seller"], "valuation": valuation.manifest,
                             "seeds": {"projection": prepared.spec.seed}, "projection_dim": prepared.spec.dim},
                      session_metrics, samples, payouts=pay_rows)
    metrics, _ = run_metrics([session], runtime=runtime, seconds=seconds)
    manifest = {
        "title": "value",
        "task": prepared.task,
        "config": {**prepared.settings.to_dict(), "payouts": _payouts_dict(payouts_config)},
        "input_format": None if prepared.input_format is None else type(prepared.input_format).__name__,
        "versions": versions(),
    }
    write_run_files(out, manifest, [session], metrics)
    render_report(out)
    return metrics


def _payouts_dict(cfg: PayoutsConfig) -> dict[str, Any]:
    from tip_fed.config import TipConfig

    return TipConfig(payouts=cfg).to_dict()["payouts"]
