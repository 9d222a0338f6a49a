"""Value a prepared buyer against real sellers and write the results directory.

The library's answer to "I have a model, an objective set and a list of sellers": fit the query
once (:func:`prepare`, or load a saved one), then :func:`value` it against sellers reached
in-process or over gRPC, as often as needed. :func:`value_files` is what ``tip-fed value`` runs:
buyer.toml + sellers.toml in, the same results directory as ``tip-fed simulate`` out
(valuations, payouts, report, manifest), without the parts only a simulation can know (plaintext
reference, ground truth, baselines).
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tip_fed import __version__
from tip_fed.buyer_config import (
    WIRED_RUNTIMES,
    SellersConfig,
    check_prepared,
    load_buyer_config,
    load_data,
    load_sellers_config,
    prepare_from_config,
)
from tip_fed.config import GrpcConfig, PayoutsConfig
from tip_fed.core.tasks import Task, get_task
from tip_fed.errors import ConfigError, SellerUnavailableError, TipError
from tip_fed.market import payouts
from tip_fed.market.report import render_report
from tip_fed.market.results import (
    PAYOUT_COLUMNS,
    SAMPLE_COLUMNS,
    VALUATION_COLUMNS,
    write_csv,
    write_json,
)
from tip_fed.protocol import Buyer, BuyerSettings, PreparedQuery, Seller, Valuation
from tip_fed.protocol.data import Batch, check_batch

DEFAULT_MAX_SAMPLES = 10_000
HEALTH_TIMEOUT_S = 5.0

Sellers = SellersConfig | str | Path | Mapping[str, Batch] | Sequence[Any]


def prepare(
    model: Any,
    task: str | Task,
    objective: Batch,
    train: Batch | None = None,
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
) -> Valuation:
    """One valuation session of ``buyer`` (a Buyer, a PreparedQuery, or a saved query's directory).

    ``sellers``: a ``sellers.toml`` path or :class:`~tip_fed.buyer_config.SellersConfig` (runtime,
    TLS and timeouts from the file), ``{seller_id: dataset}`` (in-process), or a list of
    :class:`tip_fed.grpc.SellerEndpoint` (gRPC; ``tls`` a :class:`tip_fed.grpc.ClientTLS` or
    ``insecure=True``). Sellers that cannot be reached or refuse are listed in
    ``Valuation.missing`` with their reason in ``Valuation.manifest["seller_failures"]``.
    """
    if isinstance(buyer, (str, Path)):
        buyer = PreparedQuery.load(buyer)
    if isinstance(buyer, PreparedQuery):
        buyer = Buyer.from_prepared(buyer)
    if isinstance(sellers, (str, Path)):
        sellers = load_sellers_config(sellers)
    if isinstance(sellers, SellersConfig):
        return _value_config(buyer, sellers, runtime, max_samples)
    if isinstance(sellers, Mapping):
        _check_runtime(runtime or "inprocess", "a dict of seller datasets", "inprocess")
        return value_inprocess(buyer, sellers, max_samples)
    _check_runtime(runtime or "grpc", "a list of seller endpoints", "grpc")
    if tls is None and not insecure:
        raise ConfigError("valuing gRPC sellers needs tls=ClientTLS(root_ca=...) or insecure=True")
    return value_grpc(buyer, list(sellers), tls, grpc or GrpcConfig(), max_samples)


def _check_runtime(runtime: str, given: str, expected: str) -> None:
    if runtime != expected:
        raise ConfigError(f"runtime {runtime!r} does not go with {given}; that is runtime {expected!r} "
                          "(or pass a sellers.toml naming the runtime)")


def _value_config(buyer: Buyer, cfg: SellersConfig, runtime: str | None, max_samples: int | None) -> Valuation:
    runtime = runtime or cfg.runtime
    if runtime not in WIRED_RUNTIMES:
        raise ConfigError(f"runtime = {runtime!r} is not wired to valuing a prepared buyer yet; use "
                          f"runtime = 'grpc' (sellers running 'tip-fed seller serve') or 'inprocess'")
    limit = max_samples or cfg.max_samples
    if runtime == "inprocess":
        missing = [s.id for s in cfg.sellers if s.data is None]
        if missing:
            raise ConfigError(f"runtime 'inprocess' needs data = \"path\" for every seller; missing for {missing}")
        return value_inprocess(buyer, {s.id: load_data(s.data, "safetensors") for s in cfg.sellers  # type: ignore[arg-type]
                                       }, limit)
    from tip_fed.grpc import ClientTLS, SellerEndpoint

    endpoints = [SellerEndpoint(s.id, s.endpoint or "", s.ca) for s in cfg.sellers]
    t = cfg.tls
    tls = None
    if not t.insecure:
        root = t.ca or next((s.ca for s in cfg.sellers if s.ca), None)  # without [tls] ca, each seller pins its own
        if root is None:
            raise ConfigError("gRPC sellers need [tls] ca = \"ca.crt\" in sellers.toml, or [tls] insecure = true")
        tls = ClientTLS(root, t.cert, t.key, bind_seller_id=t.bind_seller_id)
    return value_grpc(buyer, endpoints, tls, cfg.grpc, limit)


def value_inprocess(buyer: Buyer, sellers: Mapping[str, Batch], max_samples: int | None = None) -> Valuation:
    """Sellers as objects in this process (default seller policy), exchanging protobuf bytes."""
    offer = buyer.offer(max_samples=max_samples or max(check_batch(d) for d in sellers.values()))
    replies, failures = [], {}
    for sid, data in sellers.items():
        try:
            replies.append(Seller(sid, data).respond(offer))
        except TipError as exc:  # a refusal is this seller's answer, not the session's failure
            failures[sid] = str(exc)
    return _settled(buyer, replies, list(sellers), failures)


def value_grpc(buyer: Buyer, endpoints: Sequence[Any], tls: Any, settings: GrpcConfig,
               max_samples: int | None = None) -> Valuation:
    """Sellers as ``tip-fed seller serve`` services (``tls`` None: plaintext); failures never raise."""
    from tip_fed.grpc import value_sellers
    from tip_fed.grpc.server import MiB

    limit = max_samples or _largest_seller(endpoints, tls)
    replies, failures = value_sellers(endpoints, buyer.offer(max_samples=limit), tls=tls, insecure=tls is None,
                                      timeout_s=settings.timeout_s, retries=settings.retries,
                                      max_message_bytes=settings.max_message_mb * MiB)
    return _settled(buyer, list(replies.values()), [e.name for e in endpoints], failures)


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


def _settled(buyer: Buyer, replies: list[bytes], expected: list[str], failures: dict[str, str]) -> Valuation:
    valuation = buyer.settle(replies, expected=expected)
    valuation.manifest["seller_failures"] = dict(failures)
    return valuation


@dataclass
class ValueResult:
    """What ``tip-fed value`` wrote and the headline metrics."""

    out_dir: Path
    metrics: dict[str, Any]
    valuation: Valuation
    requeried: bool = False  # data.objective changed since prepare: the query was recomputed with the saved P


def value_files(buyer_toml: str | Path, sellers_toml: str | Path, out_dir: str | Path, *,
                prepared_dir: str | Path | None = None) -> ValueResult:
    """``tip-fed value``: read both configs, prepare (or load and check) the query, value, write results."""
    t0 = time.perf_counter()
    cfg = load_buyer_config(buyer_toml)
    sellers = load_sellers_config(sellers_toml)
    requeried = False
    if prepared_dir is not None:
        saved = PreparedQuery.load(prepared_dir)
        prepared = check_prepared(cfg, saved, str(prepared_dir))
        requeried = prepared is not saved
    else:
        prepared = prepare_from_config(cfg)
    buyer = Buyer.from_prepared(prepared)
    t1 = time.perf_counter()
    valuation = value(buyer, sellers)
    if not valuation.sellers:
        reasons = {**valuation.manifest.get("seller_failures", {}), **valuation.rejected}
        raise SellerUnavailableError("no seller was valued: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    metrics = write_results(out_dir, buyer, valuation, cfg.payouts, runtime=sellers.runtime,
                            seconds=time.perf_counter() - t0, valuation_seconds=time.perf_counter() - t1)
    return ValueResult(Path(out_dir), metrics, valuation, requeried)


def write_results(out_dir: str | Path, buyer: Buyer | PreparedQuery, valuation: Valuation,
                  payouts_config: PayoutsConfig | None = None, *, runtime: str = "", seconds: float | None = None,
                  valuation_seconds: float | None = None) -> dict[str, Any]:
    """valuations.csv, samples.csv (per-sample disclosure), payouts.csv, metrics.json, manifest.json and
    report.md for one settled session with no plaintext reference or ground truth; returns the metrics."""
    out = Path(out_dir)
    prepared = buyer.prepared if isinstance(buyer, Buyer) else buyer
    payouts_config = payouts_config or PayoutsConfig()
    ranked = sorted(valuation.sellers, key=lambda v: v.total, reverse=True)
    rank = {v.seller_id: i + 1 for i, v in enumerate(ranked)}
    write_csv(out / "valuations.csv", VALUATION_COLUMNS, [
        {"seller_id": v.seller_id, "n_samples": v.n_samples, "score": v.total, "mean_score": v.mean,
         "rank": rank[v.seller_id], "clipped": v.clipped, "commitment": v.commitment,
         "seconds": v.timings.get("total_s")} for v in valuation.sellers])
    samples = [{"seller_id": v.seller_id, "sample_index": i, "score": float(s)}
               for v in valuation.sellers if v.per_sample is not None for i, s in enumerate(v.per_sample)]
    if samples:
        write_csv(out / "samples.csv", SAMPLE_COLUMNS, samples)
    inputs = payouts.PayoutInputs(seller_ids=[v.seller_id for v in valuation.sellers],
                                  scores={v.seller_id: v.total for v in valuation.sellers},
                                  n_records={v.seller_id: v.n_samples for v in valuation.sellers})
    pay_rows, comparison, reference = payouts.settle(payouts_config, inputs, seed=prepared.spec.seed)
    write_csv(out / "payouts.csv", PAYOUT_COLUMNS, pay_rows)
    n = len(valuation.sellers)
    metrics: dict[str, Any] = {
        "run": {"seconds": seconds, "runtime": runtime, "sellers": n, "missing": valuation.missing,
                "rejected": valuation.rejected, "valuation_seconds": valuation_seconds,
                "valuation_seconds_per_seller": valuation_seconds / n if valuation_seconds is not None and n else None,
                "top_by_score": ranked[0].seller_id if ranked else None},
        "payouts": {"reference": reference, "rules": comparison},
    }
    manifest = {
        "title": "value",
        "task": prepared.task,
        "config": {**prepared.settings.to_dict(), "payouts": _payouts_dict(payouts_config)},
        "sellers": [*[v.seller_id for v in valuation.sellers], *valuation.missing],
        "session": valuation.manifest,
        "seeds": {"projection": prepared.spec.seed},
        "projection_dim": prepared.spec.dim,
        "versions": _versions(),
    }
    write_json(out / "manifest.json", manifest)
    write_json(out / "metrics.json", metrics)
    render_report(out)
    return metrics


def _payouts_dict(cfg: PayoutsConfig) -> dict[str, Any]:
    from tip_fed.config import TipConfig

    return TipConfig(payouts=cfg).to_dict()["payouts"]  # type: ignore[no-any-return]


def _versions() -> dict[str, str]:
    versions = {"tip_fed": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("torch", "tenseal", "numpy", "grpcio"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "?"
    return versions
